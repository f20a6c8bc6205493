// Causal attention with grouped key/value heads and an optional sliding
// window, over a KV cache.
//
// One workgroup of WG invocations per (query token t, query head h), linear
// workgroup id (wid.x + wid.y * nwg.x) = t * n_head + h; workgroups past the
// end return. The query at position pos = pos0 + t sees the keys j with
// lo ≤ j ≤ pos, lo = max(0, pos + 1 - window) (lo = 0 without a window),
// and query head h reads kv head h / (n_head / n_kv_head).
//
// The keys are visited in blocks of WG with an online softmax: per block,
// invocation j scores key lo + block * WG + j against the query (held in
// workgroup memory), every invocation takes the block's maximum, rescales its
// running output and sum, and adds the block's exp-weighted values for the
// output dimensions it owns (c = lid + WG * r, r < MAX_DIM / WG). Memory is
// O(head_dim + WG) per workgroup whatever the number of keys.

// Element type of the KV cache; the f16 variant (SHADER_F16 devices, asked
// for) is made by the host replacing this line and adding `enable f16;`.
alias KV = f32;

const WG: u32 = 64u;
// Largest head_dim supported.
const MAX_DIM: u32 = 256u;
// Output dimensions per invocation.
const PER: u32 = MAX_DIM / WG;
// Score of a masked key: exp(MASKED - m) is 0 for any real maximum m.
const MASKED: f32 = -1e30;

struct Params {
    n_tok: u32,
    n_head: u32,
    n_kv_head: u32,
    head_dim: u32,
    scale: f32,
    // Sliding window in keys; 0: none.
    window: u32,
    _pad0: u32,
    _pad1: u32,
}

struct Step {
    pos0: u32,
    n_tok: u32,
    _pad0: u32,
    _pad1: u32,
}

// Shapes, score scale and window.
@group(0) @binding(0) var<uniform> params: Params;
// Per-step values; only pos0 is read.
@group(0) @binding(1) var<uniform> step_params: Step;
// Queries, shape (n_tok, n_head * head_dim).
@group(0) @binding(2) var<storage, read> q: array<f32>;
// Key cache, shape (capacity, n_kv_head * head_dim), capacity ≥ pos0 + n_tok.
@group(0) @binding(3) var<storage, read> k: array<KV>;
// Value cache, shape (capacity, n_kv_head * head_dim).
@group(0) @binding(4) var<storage, read> v: array<KV>;
// Output, shape (n_tok, n_head * head_dim).
@group(0) @binding(5) var<storage, read_write> out_buf: array<f32>;

var<workgroup> q_s: array<f32, MAX_DIM>;
var<workgroup> scores: array<f32, WG>;
var<workgroup> probs: array<f32, WG>;

@compute @workgroup_size(WG)
fn attention(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let item = wid.x + wid.y * nwg.x;
    let n_head = params.n_head;
    if item >= params.n_tok * n_head {
        return;
    }
    let t = item / n_head;
    let h = item - t * n_head;
    let d = params.head_dim;
    let g = h / (n_head / params.n_kv_head);
    let kv_row = params.n_kv_head * d;
    let q_base = item * d;
    let kv_off = g * d;
    let pos = step_params.pos0 + t;
    var lo = 0u;
    if params.window != 0u && pos + 1u > params.window {
        lo = pos + 1u - params.window;
    }
    let n_keys = pos + 1u - lo;

    for (var c = lid; c < d; c = c + WG) {
        q_s[c] = q[q_base + c];
    }
    workgroupBarrier();

    var acc: array<f32, PER>;
    for (var r = 0u; r < PER; r = r + 1u) {
        acc[r] = 0.0;
    }
    var m = MASKED;
    var l = 0.0;
    let n_blocks = (n_keys + WG - 1u) / WG;
    for (var blk = 0u; blk < n_blocks; blk = blk + 1u) {
        let start = lo + blk * WG;
        // Keys in this block (≥ 1: the block starts at or before pos).
        let len = min(WG, pos + 1u - start);
        var s = MASKED;
        if lid < len {
            let kb = (start + lid) * kv_row + kv_off;
            var sc = 0.0;
            for (var c = 0u; c < d; c = c + 1u) {
                sc = sc + q_s[c] * f32(k[kb + c]);
            }
            s = sc * params.scale;
        }
        scores[lid] = s;
        workgroupBarrier();
        var m_blk = MASKED;
        for (var j = 0u; j < len; j = j + 1u) {
            m_blk = max(m_blk, scores[j]);
        }
        let m_new = max(m, m_blk);
        let alpha = exp(m - m_new);
        m = m_new;
        probs[lid] = exp(s - m_new);
        workgroupBarrier();
        // `scores` may be rewritten from here on: everyone has read it.
        var p_sum = 0.0;
        for (var r = 0u; r < PER; r = r + 1u) {
            acc[r] = acc[r] * alpha;
        }
        for (var j = 0u; j < len; j = j + 1u) {
            let p = probs[j];
            p_sum = p_sum + p;
            let vb = (start + j) * kv_row + kv_off;
            for (var r = 0u; r < PER; r = r + 1u) {
                let c = lid + r * WG;
                if c < d {
                    acc[r] = acc[r] + p * f32(v[vb + c]);
                }
            }
        }
        l = l * alpha + p_sum;
        // The next block writes `probs` only after its first barrier, which
        // every invocation reaches after finishing this block's reads.
    }

    let inv = 1.0 / l;
    for (var r = 0u; r < PER; r = r + 1u) {
        let c = lid + r * WG;
        if c < d {
            out_buf[q_base + c] = acc[r] * inv;
        }
    }
}
