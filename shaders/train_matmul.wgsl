// f32 products of the adapters (LoRA), forward and backward
// (src/backend/gpu/train.rs):
//     matmul_t:  y  (N, m) = x  (N, k) · pᵀ, p (m, k)
//     matmul_nn: dx (N, k) = dy (N, m) · p
//     matmul_tn: dp (m, k) = dyᵀ · x, summed over the N tokens
//     matmul_t_add: z (N, m) = y + x · pᵀ (entry product_add)
// all as one strided product c (M, N) = a (M, K) · b (K, N) with
//     a(i, kk) = a[a_off + i * a_rs + kk * a_ks]
//     b(kk, j) = b[b_off + kk * b_ks + j * b_cs]
//     c(i, j)  = c[c_off + i * c_rs + j]
// Each invocation computes a 4 × 4 block of c with the whole reduction in
// its own registers, in order: no workgroup memory, no barriers, no atomics,
// so the result does not depend on scheduling (matmul_tn reduces over
// thousands of tokens this way).
//
// Every f32 binding is read_write: operands may be windows of one buffer.

const WG: u32 = 64u;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    a_off: u32,
    a_rs: u32,
    a_ks: u32,
    b_off: u32,
    b_ks: u32,
    b_cs: u32,
    c_off: u32,
    c_rs: u32,
    // product_add: the addend's first element.
    d_off: u32,
}

// params: Params (48 bytes).
@group(0) @binding(0) var<uniform> p: Params;
// a: (m, k) through the strides above.
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
// b: (k, n) through the strides above.
@group(0) @binding(2) var<storage, read_write> b: array<f32>;
// c: (m, n), rows c_rs apart.
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
// product_add only: addend (m, n), laid out as c.
@group(0) @binding(4) var<storage, read_write> addend: array<f32>;

// The 4 × 4 block of c at (i0, j0): rows i0 .. i0+4, columns j0 .. j0+4.
// Rows/columns past the end are clamped to the last one (read, never stored).
fn block(i0: u32, j0: u32) -> array<vec4<f32>, 4> {
    let ri = min(vec4<u32>(i0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.m - 1u));
    let cj = min(vec4<u32>(j0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.n - 1u));
    let ai = vec4<u32>(p.a_off) + ri * p.a_rs;
    let bj = vec4<u32>(p.b_off) + cj * p.b_cs;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var kk = 0u; kk < p.k; kk++) {
        let ak = ai + kk * p.a_ks;
        let bk = bj + kk * p.b_ks;
        let av = vec4<f32>(a[ak.x], a[ak.y], a[ak.z], a[ak.w]);
        let bv = vec4<f32>(b[bk.x], b[bk.y], b[bk.z], b[bk.w]);
        acc0 += av.x * bv;
        acc1 += av.y * bv;
        acc2 += av.z * bv;
        acc3 += av.w * bv;
    }
    return array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
}

// The block of invocation `id` (row-block-major), or (m, 0) past the end.
fn block_origin(id: u32) -> vec2<u32> {
    let nb = (p.n + 3u) / 4u;
    return vec2<u32>((id / nb) * 4u, (id % nb) * 4u);
}

// Grid: linear workgroup (x + y * nwg.x) × WG invocations over the blocks
// of 4 × 4.
@compute @workgroup_size(WG)
fn product(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let o = block_origin((wid.x + wid.y * nwg.x) * WG + li);
    if (o.x >= p.m) {
        return;
    }
    var accs = block(o.x, o.y);
    for (var r = 0u; r < 4u; r++) {
        if (o.x + r < p.m) {
            let at = p.c_off + (o.x + r) * p.c_rs + o.y;
            for (var e = 0u; e < 4u; e++) {
                if (o.y + e < p.n) {
                    c[at + e] = accs[r][e];
                }
            }
        }
    }
}

// c = addend + a · b (MatmulTAdd: a low-rank term added to a frozen
// product); addend has c's layout, from element d_off.
@compute @workgroup_size(WG)
fn product_add(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let o = block_origin((wid.x + wid.y * nwg.x) * WG + li);
    if (o.x >= p.m) {
        return;
    }
    var accs = block(o.x, o.y);
    for (var r = 0u; r < 4u; r++) {
        if (o.x + r < p.m) {
            let at = (o.x + r) * p.c_rs + o.y;
            for (var e = 0u; e < 4u; e++) {
                if (o.y + e < p.n) {
                    c[p.c_off + at + e] = addend[p.d_off + at + e] + accs[r][e];
                }
            }
        }
    }
}
