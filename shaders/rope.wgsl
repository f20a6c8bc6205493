// Rotary position embedding, in place on x = (n_tok, n_heads * head_dim).
//
// One invocation per rotated pair (token t, head h, pair i < half), linear
// invocation id over workgroups of WG (wid.x + wid.y * nwg.x). Token t is at
// position step.pos0 + t. The pair is (2i, 2i+1) for adjacent RoPE and
// (i, i + half) for the halves kind; cos and sin come from a host-computed
// table, so no trigonometry runs here.

// Element type of the KV cache written by rope_kv; the f16 variant is made
// by the host replacing this line and adding `enable f16;`.
alias KV = f32;

const WG: u32 = 256u;

struct Params {
    n_tok: u32,
    n_heads: u32,
    head_dim: u32,
    // dims / 2: pairs rotated per head.
    half: u32,
    // 0: adjacent pairs, 1: halves.
    halves: u32,
    // rope_kv only: heads of the keys and values.
    n_kv_heads: u32,
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
// Activations, shape (n_tok, n_heads * head_dim), rotated in place (the
// queries, in rope_kv).
@group(0) @binding(3) var<storage, read_write> x: array<f32>;
// rope_kv only: this step's keys and values, shape (n_tok, n_kv_heads * head_dim).
@group(0) @binding(4) var<storage, read> kb: array<f32>;
@group(0) @binding(5) var<storage, read> vb: array<f32>;
// rope_kv only: the KV cache, shape (capacity, n_kv_heads * head_dim); rows
// pos0 .. pos0 + n_tok are written (keys rotated).
@group(0) @binding(6) var<storage, read_write> k_cache: array<KV>;
@group(0) @binding(7) var<storage, read_write> v_cache: array<KV>;

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

// The attention inputs of a step in one dispatch: the queries rotated in
// place (one invocation per pair, as `rope`), then one invocation per key
// element (rotated from this step's keys into the cache) and per value
// element (copied into the cache). Linear ids: [0, q pairs) queries,
// [q pairs, + kv elements) keys, [.., + kv elements) values.
@compute @workgroup_size(WG)
fn rope_kv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = (wid.x + wid.y * nwg.x) * WG + lid;
    let half = params.half;
    let d = params.head_dim;
    let per_tok = params.n_heads * half;
    let q_pairs = params.n_tok * per_tok;
    let kv_row = params.n_kv_heads * d;
    let kv_n = params.n_tok * kv_row;
    let pos0 = step_params.pos0;
    if id < q_pairs {
        let t = id / per_tok;
        let rem = id - t * per_tok;
        let h = rem / half;
        let i = rem - h * half;
        let cs = table[(pos0 + t) * half + i];
        let head = (t * params.n_heads + h) * d;
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
        return;
    }
    if id < q_pairs + kv_n {
        let e = id - q_pairs;
        let t = e / kv_row;
        let j = (e - t * kv_row) % d;
        var v = kb[e];
        if j < 2u * half {
            // Which pair j belongs to, its index i, and whether j is its first.
            var i = j / 2u;
            var first = (j % 2u) == 0u;
            var partner = e ^ 1u;
            if params.halves != 0u {
                first = j < half;
                i = select(j - half, j, first);
                partner = select(e - half, e + half, first);
            }
            let cs = table[(pos0 + t) * half + i];
            let other = kb[partner];
            if first {
                v = v * cs.x - other * cs.y;
            } else {
                v = other * cs.y + v * cs.x;
            }
        }
        k_cache[pos0 * kv_row + e] = KV(v);
        return;
    }
    if id < q_pairs + 2u * kv_n {
        let e = id - q_pairs - kv_n;
        v_cache[pos0 * kv_row + e] = KV(vb[e]);
    }
}
