// Products with a frozen quantized weight W (rows × cols, GGUF block layout),
// forward and backward, for training (src/backend/gpu/train.rs).
//
// The Rust side prepends quant.wgsl and a line
//     fn dq8(b: u32, k: u32) -> array<f32, 8> { return dq8_<fmt>(b, k); }
// choosing the weight format, so one pipeline exists per format.
//
// Entry points (one dispatch per row part of W):
// - linear:        y (N, rows) = x (N, cols) · Wᵀ; the part writes its rows.
// - linear_back_x: y (N, cols) (+)= x (N, rows) · W; x is dy, and a part adds
//   the products over its rows (`accumulate` = 1 for every part but the
//   first), so the sum over all rows builds up in order (deterministic).
// Both compute a 64-token × 64-output tile per workgroup of 256, 4 × 4
// outputs per invocation, stepping the reduction by 32 through workgroup
// memory, as matmul_tiled (matmul.wgsl) does.
//
// x and y are bound read_write so that both may be windows of one buffer
// (the training arena): a buffer bound read-only and writable in the same
// dispatch is a usage conflict.

struct Params {
    // Rows of W in this part.
    rows: u32,
    // Values per row of W.
    cols: u32,
    // Tokens: rows of x and of y.
    n_tok: u32,
    // Bytes of one row of W.
    row_bytes: u32,
    // Token t of x starts at x[x_off + t * x_stride] (for linear_back_x,
    // x_off already points at the part's first row of dy).
    x_off: u32,
    x_stride: u32,
    // Token t of y starts at y[y_off + t * y_stride] (for linear, y_off
    // already includes the part's first row).
    y_off: u32,
    y_stride: u32,
    // linear_back_x: 1 to add to y instead of overwriting it.
    accumulate: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// params: Params (48 bytes).
@group(0) @binding(0) var<uniform> p: Params;
// wq: W part, [rows][row_bytes] bytes in GGUF block layout, read as u32 words.
@group(0) @binding(1) var<storage, read> wq: array<u32>;
// x: (n_tok, cols) for linear, (n_tok, rows of the whole W) for linear_back_x.
@group(0) @binding(2) var<storage, read_write> x: array<f32>;
// y: (n_tok, rows of the whole W) for linear, (n_tok, cols) for linear_back_x.
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const TT: u32 = 64u; // tokens per tile
const TO: u32 = 64u; // outputs per tile
const TK: u32 = 32u; // reduction step

// k-major tiles of vec4: xs[kk * 16 + g] holds tokens 4g .. 4g+4 at step kk,
// ws[kk * 16 + g] outputs 4g .. 4g+4 at step kk.
var<workgroup> xs: array<vec4<f32>, 512>;
var<workgroup> ws: array<vec4<f32>, 512>;

// x values k, k+1 of token t, zero past n_tok and past `kn` (reduction length).
fn x2(t: u32, k: u32, kn: u32) -> vec2<f32> {
    var v = vec2<f32>(0.0);
    if (t < p.n_tok && k < kn) {
        let i = p.x_off + t * p.x_stride + k;
        v.x = x[i];
        if (k + 1u < kn) {
            v.y = x[i + 1u];
        }
    }
    return v;
}

// Weights k .. k+8 of row r, zero past the row's end or past the part.
fn w8(r: u32, k: u32) -> array<vec4<f32>, 2> {
    if (r >= p.rows || k >= p.cols) {
        return array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
    }
    let d = dq8(r * p.row_bytes, k);
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

// Loads x for the step at k0 (reduction length kn) into xs.
fn load_x(li: u32, tok0: u32, k0: u32, kn: u32) {
    let g = li >> 4u;
    let kk = (li & 15u) * 2u;
    let t = tok0 + 4u * g;
    let a0 = x2(t, k0 + kk, kn);
    let a1 = x2(t + 1u, k0 + kk, kn);
    let a2 = x2(t + 2u, k0 + kk, kn);
    let a3 = x2(t + 3u, k0 + kk, kn);
    xs[kk * 16u + g] = vec4<f32>(a0.x, a1.x, a2.x, a3.x);
    xs[(kk + 1u) * 16u + g] = vec4<f32>(a0.y, a1.y, a2.y, a3.y);
}

// acc<i>[j] += x(token 4ty+i) · w(output 4tx+j) over one step.
struct Acc {
    a0: vec4<f32>,
    a1: vec4<f32>,
    a2: vec4<f32>,
    a3: vec4<f32>,
}

fn step(acc: ptr<function, Acc>, ty: u32, tx: u32) {
    for (var kk = 0u; kk < TK; kk++) {
        let xv = xs[kk * 16u + ty];
        let wv = ws[kk * 16u + tx];
        (*acc).a0 += xv.x * wv;
        (*acc).a1 += xv.y * wv;
        (*acc).a2 += xv.z * wv;
        (*acc).a3 += xv.w * wv;
    }
}

// y of token t, outputs o .. o+4 (those below `on`), added to when `acc_in`.
fn store4(t: u32, o: u32, on: u32, v: vec4<f32>, acc_in: bool) {
    if (t >= p.n_tok) {
        return;
    }
    let i = p.y_off + t * p.y_stride + o;
    for (var e = 0u; e < 4u; e++) {
        if (o + e < on) {
            var r = v[e];
            if (acc_in) {
                r += y[i + e];
            }
            y[i + e] = r;
        }
    }
}

fn store(acc: Acc, tok0: u32, out0: u32, ty: u32, tx: u32, on: u32, acc_in: bool) {
    let o = out0 + 4u * tx;
    let t = tok0 + 4u * ty;
    store4(t, o, on, acc.a0, acc_in);
    store4(t + 1u, o, on, acc.a1, acc_in);
    store4(t + 2u, o, on, acc.a2, acc_in);
    store4(t + 3u, o, on, acc.a3, acc_in);
}

// Grid: (x, y) = output tiles, linear as x + y * nwg.x; z = token tiles.
@compute @workgroup_size(256)
fn linear(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = (wid.x + wid.y * nwg.x) * TO;
    if (row0 >= p.rows) {
        return;
    }
    let tok0 = wid.z * TT;
    // Decoding: invocation li decodes values wk .. wk+8 of tile row wr.
    let wr = li >> 2u;
    let wk = (li & 3u) * 8u;
    let ty = li >> 4u;
    let tx = li & 15u;
    var acc = Acc(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k0 = 0u; k0 < p.cols; k0 += TK) {
        load_x(li, tok0, k0, p.cols);
        let w = w8(row0 + wr, k0 + wk);
        let o = wk * 16u + (wr >> 2u);
        let c = wr & 3u;
        for (var e = 0u; e < 4u; e++) {
            ws[o + 16u * e][c] = w[0][e];
            ws[o + 16u * (e + 4u)][c] = w[1][e];
        }
        workgroupBarrier();
        step(&acc, ty, tx);
        workgroupBarrier();
    }
    store(acc, tok0, row0, ty, tx, p.rows, false);
}

// Grid: (x, y) = tiles of W's columns, linear as x + y * nwg.x; z = token tiles.
@compute @workgroup_size(256)
fn linear_back_x(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let col0 = (wid.x + wid.y * nwg.x) * TO;
    if (col0 >= p.cols) {
        return;
    }
    let tok0 = wid.z * TT;
    // Decoding: invocation li decodes columns col0 + wc .. +8 of part row k0 + wr.
    let wr = li >> 3u;
    let wc = (li & 7u) * 8u;
    let ty = li >> 4u;
    let tx = li & 15u;
    var acc = Acc(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k0 = 0u; k0 < p.rows; k0 += TK) {
        load_x(li, tok0, k0, p.rows);
        let w = w8(k0 + wr, col0 + wc);
        ws[wr * 16u + (wc >> 2u)] = w[0];
        ws[wr * 16u + (wc >> 2u) + 1u] = w[1];
        workgroupBarrier();
        step(&acc, ty, tx);
        workgroupBarrier();
    }
    store(acc, tok0, col0, ty, tx, p.cols, p.accumulate != 0u);
}
