// y = x · Wᵀ with W quantized in its GGUF block layout, one row part of W per
// dispatch (src/backend/gpu/matmul.rs).
//
// The Rust side prepends quant.wgsl and a line
//     fn dq8(b: u32, k: u32) -> array<f32, 8> { return dq8_<fmt>(b, k); }
// choosing the weight format, so one pipeline exists per format.
//
// Entry points:
// - matmul_tiled (many tokens: prompts, training): a workgroup of 256
//   computes a 64-token × 64-row tile of y, 4 × 4 outputs per invocation,
//   stepping K by 32 with x and the decoded W in workgroup memory (16 KiB).
// - matmul_vec (few tokens: generation): a workgroup of 64 computes 4 rows
//   for up to 4 tokens; its invocations split K, 8 values at a time, and
//   sum in a two-level tree (8 × 8) in workgroup memory.
// - matmul_vec_sg: matmul_vec summing with subgroupAdd; it comes after the
//   subgroup marker line near the end, and the Rust side cuts the source
//   there for devices without subgroups.
// Both handle any number of tokens and rows (the grid's z covers groups of
// tokens), and any `cols` (values past `cols` are zeroed, never multiplied).

struct Params {
    // Rows of W in this part: outputs per token written by this dispatch.
    rows: u32,
    // K: values in a row of W and in a token of x.
    cols: u32,
    // Tokens: rows of x and of y.
    n_tok: u32,
    // Bytes of one row of W (GGUF blocks).
    row_bytes: u32,
    // Token t of x is x[x_off + t * x_stride + k], k < cols (f32 elements).
    x_off: u32,
    x_stride: u32,
    // Output (t, r) is y[y_off + t * y_stride + r], r < rows; y_off already
    // includes the index of this part's first row in the whole matrix.
    y_off: u32,
    y_stride: u32,
}

// Shapes, for both entry points:
// params: Params (32 bytes).
@group(0) @binding(0) var<uniform> p: Params;
// wq: W part, [rows][row_bytes] bytes in GGUF block layout, read as u32 words.
@group(0) @binding(1) var<storage, read> wq: array<u32>;
// x: activations, n_tok vectors of cols f32 at x_off + t * x_stride.
@group(0) @binding(2) var<storage, read> x: array<f32>;
// y: outputs, n_tok vectors of rows f32 at y_off + t * y_stride.
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

// ---- shared helpers ------------------------------------------------------------

// x[i .. i+4], where i is value k of a token: values at k + e >= cols are 0.
fn x4(i: u32, k: u32) -> vec4<f32> {
    if (k + 4u <= p.cols) {
        return vec4<f32>(x[i], x[i + 1u], x[i + 2u], x[i + 3u]);
    }
    var v = vec4<f32>(0.0);
    if (k < p.cols) {
        v.x = x[i];
    }
    if (k + 1u < p.cols) {
        v.y = x[i + 1u];
    }
    if (k + 2u < p.cols) {
        v.z = x[i + 2u];
    }
    return v;
}

// Weights k .. k+8 of the row at byte `rb` as two vec4, those at k + e >= cols
// zeroed (they exist only for the float formats, whose rows need not be
// whole groups of 8).
fn w8(rb: u32, k: u32) -> array<vec4<f32>, 2> {
    let d = dq8(rb, k);
    var a = vec4<f32>(d[0], d[1], d[2], d[3]);
    var b = vec4<f32>(d[4], d[5], d[6], d[7]);
    if (k + 8u > p.cols) {
        let e = vec4<u32>(k) + vec4<u32>(0u, 1u, 2u, 3u);
        let c = vec4<u32>(p.cols);
        a = select(vec4<f32>(0.0), a, e < c);
        b = select(vec4<f32>(0.0), b, e + vec4<u32>(4u) < c);
    }
    return array<vec4<f32>, 2>(a, b);
}

// ---- tiled: 64 tokens × 64 rows per workgroup -------------------------------

const TT: u32 = 64u; // tokens per tile (4 × 16 invocations)
const TR: u32 = 64u; // rows per tile
const TK: u32 = 32u; // K per step

// k-major tiles of vec4 (llvmpipe runs one memory instruction per vector,
// lane by lane, so vec4 accesses matter there): xs[kk * 16 + g] holds
// tokens 4g .. 4g+4 at step kk, ws[kk * 16 + g] rows 4g .. 4g+4.
var<workgroup> xs: array<vec4<f32>, 512>;
var<workgroup> ws: array<vec4<f32>, 512>;

// x values k, k+1 of token t (zero past n_tok and cols).
fn x2(t: u32, k: u32) -> vec2<f32> {
    var v = vec2<f32>(0.0);
    if (t < p.n_tok && k < p.cols) {
        let i = p.x_off + t * p.x_stride + k;
        v.x = x[i];
        if (k + 1u < p.cols) {
            v.y = x[i + 1u];
        }
    }
    return v;
}

// Stores weights k .. k+8 (a, b) of tile row 4g + c at ws[(kk + e) * 16 + g].c
// from o = kk * 16 + g.
fn put8_w(o: u32, c: u32, a: vec4<f32>, b: vec4<f32>) {
    ws[o][c] = a.x;
    ws[o + 16u][c] = a.y;
    ws[o + 32u][c] = a.z;
    ws[o + 48u][c] = a.w;
    ws[o + 64u][c] = b.x;
    ws[o + 80u][c] = b.y;
    ws[o + 96u][c] = b.z;
    ws[o + 112u][c] = b.w;
}

// Grid: (x, y) = row tiles, linear as x + y * nwg.x (it may pass 65535);
// z = token tiles.
@compute @workgroup_size(256)
fn matmul_tiled(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = (wid.x + wid.y * nwg.x) * TR;
    if (row0 >= p.rows) {
        return;
    }
    let tok0 = wid.z * TT;

    // Loading x: invocation li fills steps xk, xk+1 of tokens 4·xg .. 4·xg+4.
    let xg = li >> 4u;
    let xk = (li & 15u) * 2u;
    let xt = tok0 + 4u * xg;
    // Loading W: invocation li decodes steps wk .. wk+8 of row wr.
    let wr = li >> 2u;
    let wk = (li & 3u) * 8u;
    let row_ok = row0 + wr < p.rows;
    let w_base = (row0 + wr) * p.row_bytes;

    // Computing: tokens 4·ty .. 4·ty+4 × rows 4·tx .. 4·tx+4 of the tile.
    let ty = li >> 4u;
    let tx = li & 15u;
    // acc<i>[j]: token 4ty+i, row 4tx+j.
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    for (var k0 = 0u; k0 < p.cols; k0 += TK) {
        let a0 = x2(xt, k0 + xk);
        let a1 = x2(xt + 1u, k0 + xk);
        let a2 = x2(xt + 2u, k0 + xk);
        let a3 = x2(xt + 3u, k0 + xk);
        xs[xk * 16u + xg] = vec4<f32>(a0.x, a1.x, a2.x, a3.x);
        xs[(xk + 1u) * 16u + xg] = vec4<f32>(a0.y, a1.y, a2.y, a3.y);
        let k = k0 + wk;
        var w = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
        if (row_ok && k < p.cols) {
            w = w8(w_base, k);
        }
        put8_w(wk * 16u + (wr >> 2u), wr & 3u, w[0], w[1]);
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let xv = xs[kk * 16u + ty];
            let wv = ws[kk * 16u + tx];
            acc0 += xv.x * wv;
            acc1 += xv.y * wv;
            acc2 += xv.z * wv;
            acc3 += xv.w * wv;
        }
        workgroupBarrier();
    }

    let r = row0 + 4u * tx;
    let t = tok0 + 4u * ty;
    store4(t, r, acc0);
    store4(t + 1u, r, acc1);
    store4(t + 2u, r, acc2);
    store4(t + 3u, r, acc3);
}

// y for token t, rows r .. r+4 (those that exist).
fn store4(t: u32, r: u32, v: vec4<f32>) {
    if (t >= p.n_tok) {
        return;
    }
    let o = p.y_off + t * p.y_stride + r;
    if (r + 4u <= p.rows) {
        y[o] = v.x;
        y[o + 1u] = v.y;
        y[o + 2u] = v.z;
        y[o + 3u] = v.w;
        return;
    }
    if (r < p.rows) {
        y[o] = v.x;
    }
    if (r + 1u < p.rows) {
        y[o + 1u] = v.y;
    }
    if (r + 2u < p.rows) {
        y[o + 2u] = v.z;
    }
}

// ---- matrix-vector: 4 rows × up to 4 tokens per workgroup ---------------

const VR: u32 = 4u;  // rows per workgroup
const VT: u32 = 4u;  // tokens per workgroup
const VL: u32 = 64u; // invocations per workgroup, splitting K

// Partial sums of 4 rows × 4 tokens: red[4 * invocation + row][token].
var<workgroup> red: array<vec4<f32>, 256>;
// Second level: red2[4 * group + row][token], 8 groups of 8 invocations.
var<workgroup> red2: array<vec4<f32>, 32>;

// Σ over 8 values of w · x<t> for the 4 tokens (x<t>: the values of token t).
fn dot4(w: array<vec4<f32>, 2>, x0: array<vec4<f32>, 2>, x1: array<vec4<f32>, 2>,
        x2: array<vec4<f32>, 2>, x3: array<vec4<f32>, 2>) -> vec4<f32> {
    return vec4<f32>(
        dot(w[0], x0[0]) + dot(w[1], x0[1]),
        dot(w[0], x1[0]) + dot(w[1], x1[1]),
        dot(w[0], x2[0]) + dot(w[1], x2[1]),
        dot(w[0], x3[0]) + dot(w[1], x3[1]),
    );
}

// x values k .. k+8 of token t (zero for tokens past n_tok).
fn x8(t: u32, k: u32) -> array<vec4<f32>, 2> {
    if (t >= p.n_tok) {
        return array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
    }
    let i = p.x_off + t * p.x_stride + k;
    return array<vec4<f32>, 2>(x4(i, k), x4(i + 4u, k + 4u));
}

// The products of invocation li: rows r0 .. r0+4 (those below p.rows) times
// tokens t0 .. t0+4, over k = 8·li + 512·n; in red[4 li + r].
fn vec_partial(li: u32, r0: u32, t0: u32) {
    var acc0 = vec4<f32>(0.0); // row r0, one lane per token
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    let rb = r0 * p.row_bytes;
    for (var k = li * 8u; k < p.cols; k += VL * 8u) {
        let x0 = x8(t0, k);
        let x1 = x8(t0 + 1u, k);
        let x2 = x8(t0 + 2u, k);
        let x3 = x8(t0 + 3u, k);
        acc0 += dot4(w8(rb, k), x0, x1, x2, x3);
        if (r0 + 1u < p.rows) {
            acc1 += dot4(w8(rb + p.row_bytes, k), x0, x1, x2, x3);
        }
        if (r0 + 2u < p.rows) {
            acc2 += dot4(w8(rb + 2u * p.row_bytes, k), x0, x1, x2, x3);
        }
        if (r0 + 3u < p.rows) {
            acc3 += dot4(w8(rb + 3u * p.row_bytes, k), x0, x1, x2, x3);
        }
    }
    red[4u * li] = acc0;
    red[4u * li + 1u] = acc1;
    red[4u * li + 2u] = acc2;
    red[4u * li + 3u] = acc3;
}

// Writes row r's sums v (one lane per token) for tokens t0 .. t0+4.
fn store_row(r: u32, t0: u32, v: vec4<f32>) {
    if (r >= p.rows) {
        return;
    }
    let o = p.y_off + t0 * p.y_stride + r;
    y[o] = v.x;
    if (t0 + 1u < p.n_tok) {
        y[o + p.y_stride] = v.y;
    }
    if (t0 + 2u < p.n_tok) {
        y[o + 2u * p.y_stride] = v.z;
    }
    if (t0 + 3u < p.n_tok) {
        y[o + 3u * p.y_stride] = v.w;
    }
}

// Grid: (x, y) = groups of 4 rows, linear as x + y * nwg.x (it may pass
// 65535: a 262144-row vocabulary is 65536 groups); z = groups of 4 tokens.
@compute @workgroup_size(64)
fn matmul_vec(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let r0 = (wid.x + wid.y * nwg.x) * VR;
    if (r0 >= p.rows) {
        return;
    }
    let t0 = wid.z * VT;
    vec_partial(li, r0, t0);
    workgroupBarrier();
    // Two-level tree (fewer barriers than a binary one; llvmpipe pays
    // dearly for each): 32 invocations sum 8 invocations' partials of one
    // row each, then 4 sum the 8 results of their row.
    if (li < 32u) {
        let r = li & 3u;
        let g = li >> 2u;
        var s = vec4<f32>(0.0);
        for (var m = 0u; m < 8u; m++) {
            s += red[4u * (8u * g + m) + r];
        }
        red2[li] = s;
    }
    workgroupBarrier();
    if (li < VR) {
        var s = vec4<f32>(0.0);
        for (var g = 0u; g < 8u; g++) {
            s += red2[4u * g + li];
        }
        store_row(r0 + li, t0, s);
    }
}

// @@subgroups@@
// Everything below is compiled only where the device has subgroup operations
// (naga 30 takes them without an `enable subgroups;` directive, and rejects
// that directive as unimplemented).

// Per-subgroup sums: sred[4 * subgroup + row][token] (64 subgroups at most).
var<workgroup> sred: array<vec4<f32>, 256>;

// As matmul_vec, summing each subgroup with subgroupAdd and then the
// subgroups' sums in workgroup memory (any subgroup size, any layout).
@compute @workgroup_size(64)
fn matmul_vec_sg(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) n_sg: u32,
) {
    let r0 = (wid.x + wid.y * nwg.x) * VR;
    if (r0 >= p.rows) {
        return;
    }
    let t0 = wid.z * VT;
    vec_partial(li, r0, t0);
    // Each invocation reads back only what it wrote: no barrier needed.
    let s0 = subgroupAdd(red[4u * li]);
    let s1 = subgroupAdd(red[4u * li + 1u]);
    let s2 = subgroupAdd(red[4u * li + 2u]);
    let s3 = subgroupAdd(red[4u * li + 3u]);
    if (sg_lane == 0u) {
        sred[4u * sg] = s0;
        sred[4u * sg + 1u] = s1;
        sred[4u * sg + 2u] = s2;
        sred[4u * sg + 3u] = s3;
    }
    workgroupBarrier();
    if (li < VR) {
        var sum = vec4<f32>(0.0);
        for (var g = 0u; g < n_sg; g++) {
            sum += sred[4u * g + li];
        }
        store_row(r0 + li, t0, sum);
    }
}
