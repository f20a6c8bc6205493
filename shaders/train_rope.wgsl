// RoPE for training at per-token positions (src/backend/gpu/train.rs):
// y = x rotated by +θ (sign = 1, forward) or −θ (sign = −1, backward: the
// transpose of a rotation is the opposite rotation). In each head, pairs
// (2i, 2i+1) (adjacent) or (i, i + half) (halves) for i < half = dims/2 are
// rotated by the (cos, sin) of table[pos · half + i]; the other values of
// the head are copied. The table is the CPU's rope_table (f64 angles), so
// both backends rotate by the same numbers.
//
// One invocation per element of y, linear id (wid.x + wid.y * nwg.x) * WG + lid.

const WG: u32 = 256u;

struct Params {
    // Elements: n_tok · row.
    n: u32,
    // Values per token: heads · head_dim.
    row: u32,
    head_dim: u32,
    half: u32,
    // 0: adjacent pairs, 1: halves.
    halves: u32,
    sign: f32,
    x_off: u32,
    y_off: u32,
}

// params: Params (32 bytes).
@group(0) @binding(0) var<uniform> params: Params;
// table: (positions, half) of (cos, sin).
@group(0) @binding(1) var<storage, read> table: array<vec2<f32>>;
// positions: (n_tok) u32, each below the table's positions.
@group(0) @binding(2) var<storage, read> positions: array<u32>;
// x: (n_tok, row) read; y: (n_tok, row) written.
@group(0) @binding(3) var<storage, read_write> x: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn rope(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if i >= params.n {
        return;
    }
    let t = i / params.row;
    let e = (i % params.row) % params.head_dim;
    let half = params.half;
    if e >= 2u * half {
        y[params.y_off + i] = x[params.x_off + i];
        return;
    }
    // Pair index j and the element offsets (from i) of its two members.
    var j = e / 2u;
    var first = (e & 1u) == 0u;
    var da = e & 1u;
    var db = 1u - (e & 1u);
    if params.halves != 0u {
        first = e < half;
        j = select(e - half, e, first);
        da = select(half, 0u, first);
        db = select(0u, half, first);
    }
    let x0 = x[params.x_off + i - da];
    let x1 = x[params.x_off + i + db];
    let cs = table[positions[t] * half + j];
    let sn = cs.y * params.sign;
    if first {
        y[params.y_off + i] = x0 * cs.x - x1 * sn;
    } else {
        y[params.y_off + i] = x0 * sn + x1 * cs.x;
    }
}
