// The small ops PEFT methods add around the frozen products
// (src/backend/gpu/train_peft.rs), with the CPU's formulas
// (src/backend/cpu/train/peft_ops.rs):
//     mul_cols:        t3[i] = t1[i]·t2[i % m]                 (d0 = n, d1 = m)
//     mul:             t3[i] = t1[i]·t2[i]                     (d0 = n)
//     col_dot:         t3[j] = Σ_r t1[r·m + j]·t2[r·m + j]     (d0 = rows, d1 = m)
//     kron:            t3 = t1 (p, q) ⊗ t2 (m, n)              (d0..d3 = p, q, m, n)
//     kron_back_a:     t3 (p, q) = ∂ of a from t1 = b, t2 = dy
//     kron_back_b:     t3 (m, n) = ∂ of b from t1 = a, t2 = dy
//     dora_norm:       t5 (out) from c, wa (r, out), b (out, r), gram (r, r) (d0 = out, d1 = r)
//     dora_back_wa:    t3 (r, out) from b (t1), dn2 (t2)
//     dora_back_b:     t5 (out, r) from wa, b, gram, dn2 (t1..t4)
//     dora_back_gram:  t3 (r, r) from b (t1), dn2 (t2)
//     prefix_rows:     t3 = t1 with rows 0..n of each sequence = t2 (n, c)
//                      (d0 = seq, d1 = n, d2 = c)
//     prefix_back_x:   t2 = t1 (dy) with those rows zeroed
//     prefix_back_p:   t2 (n, c) = Σ_b rows 0..n of sequence b of t1 (d3 = batch)
//     rsqrt_mul:       t3 = t1 / √t2
//     rsqrt_mul_back:  t4 = t3 / √t2, t5 = −½·t3·t1·t2^(−3/2)  (t3 = dy)
//
// One invocation per output element, linear id (wid.x + wid.y·nwg.x)·WG +
// lid; invocations past the count return. Operand tK of element i is
// tK[offs[K − 1] + i]. Sums run in f32 in index order. Every binding is
// read_write: operands may be windows of one buffer.

const WG: u32 = 256u;

struct Params {
    d0: u32,
    d1: u32,
    d2: u32,
    d3: u32,
    o1: u32,
    o2: u32,
    o3: u32,
    o4: u32,
    o5: u32,
    s: f32,
    count: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> t1: array<f32>;
@group(0) @binding(2) var<storage, read_write> t2: array<f32>;
@group(0) @binding(3) var<storage, read_write> t3: array<f32>;
@group(0) @binding(4) var<storage, read_write> t4: array<f32>;
@group(0) @binding(5) var<storage, read_write> t5: array<f32>;

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

@compute @workgroup_size(WG)
fn mul_cols(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if i >= params.count {
        return;
    }
    t3[params.o3 + i] = t1[params.o1 + i] * t2[params.o2 + i % params.d1];
}

@compute @workgroup_size(WG)
fn mul(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if i >= params.count {
        return;
    }
    t3[params.o3 + i] = t1[params.o1 + i] * t2[params.o2 + i];
}

@compute @workgroup_size(WG)
fn col_dot(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let j = linear_id(wid, nwg, lid);
    if j >= params.count {
        return;
    }
    let m = params.d1;
    var acc = 0.0;
    for (var r = 0u; r < params.d0; r++) {
        acc += t1[params.o1 + r * m + j] * t2[params.o2 + r * m + j];
    }
    t3[params.o3 + j] = acc;
}

@compute @workgroup_size(WG)
fn kron(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = linear_id(wid, nwg, lid);
    if e >= params.count {
        return;
    }
    let q = params.d1;
    let m = params.d2;
    let n = params.d3;
    let row = e / (q * n);
    let col = e % (q * n);
    let i = row / m;
    let k = row % m;
    let j = col / n;
    let l = col % n;
    t3[params.o3 + e] = t1[params.o1 + i * q + j] * t2[params.o2 + k * n + l];
}

// t3[i, j] = Σ_{k,l} dy[i·m + k, j·n + l]·b[k, l] (t1 = b, t2 = dy).
@compute @workgroup_size(WG)
fn kron_back_a(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = linear_id(wid, nwg, lid);
    if e >= params.count {
        return;
    }
    let q = params.d1;
    let m = params.d2;
    let n = params.d3;
    let i = e / q;
    let j = e % q;
    var acc = 0.0;
    for (var k = 0u; k < m; k++) {
        for (var l = 0u; l < n; l++) {
            acc += t2[params.o2 + (i * m + k) * q * n + j * n + l] * t1[params.o1 + k * n + l];
        }
    }
    t3[params.o3 + e] = acc;
}

// t3[k, l] = Σ_{i,j} dy[i·m + k, j·n + l]·a[i, j] (t1 = a, t2 = dy).
@compute @workgroup_size(WG)
fn kron_back_b(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = linear_id(wid, nwg, lid);
    if e >= params.count {
        return;
    }
    let p = params.d0;
    let q = params.d1;
    let m = params.d2;
    let n = params.d3;
    let k = e / n;
    let l = e % n;
    var acc = 0.0;
    for (var i = 0u; i < p; i++) {
        for (var j = 0u; j < q; j++) {
            acc += t2[params.o2 + (i * m + k) * q * n + j * n + l] * t1[params.o1 + i * q + j];
        }
    }
    t3[params.o3 + e] = acc;
}

// t5[i] = c[i] + 2s·Σ_k b[i,k]·wa[k,i] + s²·Σ_kl b[i,k]·gram[k,l]·b[i,l]
// (t1 = c, t2 = wa, t3 = b, t4 = gram).
@compute @workgroup_size(WG)
fn dora_norm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if i >= params.count {
        return;
    }
    let out = params.d0;
    let r = params.d1;
    var cross = 0.0;
    var quad = 0.0;
    for (var k = 0u; k < r; k++) {
        let bik = t3[params.o3 + i * r + k];
        cross += bik * t2[params.o2 + k * out + i];
        var gk = 0.0;
        for (var l = 0u; l < r; l++) {
            gk += t4[params.o4 + k * r + l] * t3[params.o3 + i * r + l];
        }
        quad += bik * gk;
    }
    let s = params.s;
    t5[params.o5 + i] = t1[params.o1 + i] + 2.0 * s * cross + s * s * quad;
}

// t3[k, i] = 2s·b[i, k]·dn2[i] (t1 = b, t2 = dn2).
@compute @workgroup_size(WG)
fn dora_back_wa(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = linear_id(wid, nwg, lid);
    if e >= params.count {
        return;
    }
    let out = params.d0;
    let r = params.d1;
    let k = e / out;
    let i = e % out;
    t3[params.o3 + e] = 2.0 * params.s * t1[params.o1 + i * r + k] * t2[params.o2 + i];
}

// t5[i, k] = dn2[i]·(2s·wa[k, i] + s²·Σ_l (gram[k, l] + gram[l, k])·b[i, l])
// (t1 = wa, t2 = b, t3 = gram, t4 = dn2).
@compute @workgroup_size(WG)
fn dora_back_b(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = linear_id(wid, nwg, lid);
    if e >= params.count {
        return;
    }
    let out = params.d0;
    let r = params.d1;
    let i = e / r;
    let k = e % r;
    var q = 0.0;
    for (var l = 0u; l < r; l++) {
        let gsym = t3[params.o3 + k * r + l] + t3[params.o3 + l * r + k];
        q += gsym * t2[params.o2 + i * r + l];
    }
    let s = params.s;
    t5[params.o5 + e] = t4[params.o4 + i] * (2.0 * s * t1[params.o1 + k * out + i] + s * s * q);
}

// t3[k, l] = s²·Σ_i dn2[i]·b[i, k]·b[i, l] (t1 = b, t2 = dn2).
@compute @workgroup_size(WG)
fn dora_back_gram(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = linear_id(wid, nwg, lid);
    if e >= params.count {
        return;
    }
    let out = params.d0;
    let r = params.d1;
    let k = e / r;
    let l = e % r;
    var acc = 0.0;
    for (var i = 0u; i < out; i++) {
        acc += t2[params.o2 + i] * t1[params.o1 + i * r + k] * t1[params.o1 + i * r + l];
    }
    t3[params.o3 + e] = params.s * params.s * acc;
}

@compute @workgroup_size(WG)
fn prefix_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = linear_id(wid, nwg, lid);
    if e >= params.count {
        return;
    }
    let c = params.d2;
    let t = (e / c) % params.d0;
    if t < params.d1 {
        t3[params.o3 + e] = t2[params.o2 + t * c + e % c];
    } else {
        t3[params.o3 + e] = t1[params.o1 + e];
    }
}

@compute @workgroup_size(WG)
fn prefix_back_x(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = linear_id(wid, nwg, lid);
    if e >= params.count {
        return;
    }
    let t = (e / params.d2) % params.d0;
    t2[params.o2 + e] = select(t1[params.o1 + e], 0.0, t < params.d1);
}

@compute @workgroup_size(WG)
fn prefix_back_p(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = linear_id(wid, nwg, lid);
    if e >= params.count {
        return;
    }
    let row = params.d0 * params.d2;
    var acc = 0.0;
    for (var b = 0u; b < params.d3; b++) {
        acc += t1[params.o1 + b * row + e];
    }
    t2[params.o2 + e] = acc;
}

@compute @workgroup_size(WG)
fn rsqrt_mul(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if i >= params.count {
        return;
    }
    t3[params.o3 + i] = t1[params.o1 + i] / sqrt(t2[params.o2 + i]);
}

@compute @workgroup_size(WG)
fn rsqrt_mul_back(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if i >= params.count {
        return;
    }
    let inv = 1.0 / sqrt(t2[params.o2 + i]);
    let dy = t3[params.o3 + i];
    t4[params.o4 + i] = dy * inv;
    t5[params.o5 + i] = -0.5 * dy * t1[params.o1 + i] * inv * inv * inv;
}
