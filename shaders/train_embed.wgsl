// The embedding gather of a training step (src/backend/gpu/train.rs,
// graph op Embed), one row part of the frozen table per dispatch:
//     y[y_off + t * cols + c] = scale * W[tokens[t] - row0][c]
// for the tokens whose id lies in this part's rows [row0, row0 + rows);
// outputs of other tokens are left untouched (another part writes them).
// As embed.wgsl, but y is a window of the step's arena (`y_off`).
//
// The Rust side prepends quant.wgsl and a line
//     fn dq8(b: u32, k: u32) -> array<f32, 8> { return dq8_<fmt>(b, k); }
// choosing the weight format.

struct Params {
    // Tokens: entries of `tokens`, rows of y.
    n_tok: u32,
    // Values in a row of W and in a row of y.
    cols: u32,
    // Token id of this part's first row.
    row0: u32,
    // Rows of W in this part.
    rows: u32,
    // Bytes of one row of W (GGUF blocks).
    row_bytes: u32,
    // Factor applied to every value (√d_model for Gemma).
    scale: f32,
    // Groups of 8 values per row: ceil(cols / 8).
    chunks: u32,
    // Element of y where token 0's row starts.
    y_off: u32,
}

// params: Params (32 bytes).
@group(0) @binding(0) var<uniform> p: Params;
// wq: W part, [rows][row_bytes] bytes in GGUF block layout, read as u32 words.
@group(0) @binding(1) var<storage, read> wq: array<u32>;
// tokens: (n_tok) u32 token ids.
@group(0) @binding(2) var<storage, read> tokens: array<u32>;
// y: (n_tok, cols) f32 from y_off.
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

// One invocation per 8 values of one token: invocation i is token
// i / chunks, values 8 * (i % chunks) ..; grid (x, y) linear as
// x + y * nwg.x.
@compute @workgroup_size(64)
fn embed(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 64u + li;
    if i >= p.n_tok * p.chunks {
        return;
    }
    let t = i / p.chunks;
    let c = (i % p.chunks) * 8u;
    let r = tokens[t] - p.row0; // wraps past `rows` for ids below row0
    if r >= p.rows {
        return;
    }
    var w = dq8(r * p.row_bytes, c);
    let base = p.y_off + t * p.cols + c;
    for (var e = 0u; e < 8u; e++) {
        if c + e < p.cols {
            y[base + e] = p.scale * w[e];
        }
    }
}
