// Rotary position embedding, in place on x = (n_tok, n_heads * head_dim).
//
// One invocation per rotated pair (token t, head h, pair i < half), linear
// invocation id over workgroups of WG (wid.x + wid.y * nwg.x). Token t is at
// position step.pos0 + t. The pair is (2i, 2i+1) for adjacent RoPE and
// (i, i + half) for the halves kind; cos and sin come from a host-computed
// table, so no trigonometry runs here.

const WG: u32 = 256u;

struct Params {
    n_tok: u32,
    n_heads: u32,
    head_dim: u32,
    // dims / 2: pairs rotated per head.
    half: u32,
    // 0: adjacent pairs, 1: halves.
    halves: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

struct Step {
    pos0: u32,
    n_tok: u32,
    _pad0: u32,
    _pad1: u32,
}

// Shape constants of the dispatch.
@group(0) @binding(0) var<uniform> params: Params;
// Per-step values; only pos0 is read.
@group(0) @binding(1) var<uniform> step_params: Step;
// (cos, sin) per position and pair: shape (positions, half), positions ≥ pos0 + n_tok.
@group(0) @binding(2) var<storage, read> table: array<vec2<f32>>;
// Activations, shape (n_tok, n_heads * head_dim), rotated in place.
@group(0) @binding(3) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(WG)
fn rope(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = (wid.x + wid.y * nwg.x) * WG + lid;
    let half = params.half;
    let per_tok = params.n_heads * half;
    if id >= params.n_tok * per_tok {
        return;
    }
    let t = id / per_tok;
    let rem = id - t * per_tok;
    let h = rem / half;
    let i = rem - h * half;
    let cs = table[(step_params.pos0 + t) * half + i];
    let head = (t * params.n_heads + h) * params.head_dim;
    var a = head + 2u * i;
    var b = a + 1u;
    if params.halves != 0u {
        a = head + i;
        b = a + half;
    }
    let x0 = x[a];
    let x1 = x[b];
    x[a] = x0 * cs.x - x1 * cs.y;
    x[b] = x0 * cs.y + x1 * cs.x;
}
