// Causal attention for training over packed rows, FlashAttention-2 style
// (src/backend/gpu/train.rs): no (seq × seq) buffer; the forward keeps the
// output and the log-sum-exp of each (token, head), the backward recomputes
// the probabilities from them.
//
// Tokens are `batch` rows of `seq`; token r = b·seq + t. Query t sees the
// keys j of its row with lo ≤ j ≤ t, lo = max(seg_start[r], t + 1 − window)
// (the CPU's Rows::lo, src/backend/cpu/train/attention.rs), and the row's
// first `sink` keys (prompt and prefix tuning's virtual tokens) below lo:
// keys are taken by index i over the ns = min(sink, lo) sink keys then
// lo..=t. Head h reads key/value head h / (n_head / n_kv_head) (GQA).
//
// Entry points, all with workgroups of WG = 64, one workgroup per item
// (linear workgroup id wid.x + wid.y * nwg.x), keys or queries taken in
// blocks of 64 (one per invocation), and the head's values split over the
// invocations (value c is owned by invocation c % 64, d ≤ MAX_DIM):
// - attention:          per (query, head): o and lse by online softmax.
// - attention_back_dkv: per (key, kv head): dk, dv, summed over every
//   query of the group's heads that sees the key (no atomics).
// - attention_back_dq:  per (query, head): dq.
// The backward needs lse and D = rowsum(dO ⊙ O) per (query, head): the
// kernel of train_attention_prep.wgsl stores them in the first two values
// of the query's own slot of dq, (lse, D), before both run; dkv runs before
// dq, and dq reads them before overwriting the slot.

const WG: u32 = 64u;
const MAX_DIM: u32 = 256u;
// A finite "minus infinity": exp(NEG - m) is 0 without inf − inf.
const NEG: f32 = -1.0e30;

struct Params {
    // Tokens: batch · seq.
    n_tok: u32,
    seq: u32,
    n_head: u32,
    n_kv_head: u32,
    head_dim: u32,
    scale: f32,
    // Keys a query sees back from itself, itself included (≥ 1); 0xffffffff: all.
    window: u32,
    q_off: u32,
    k_off: u32,
    v_off: u32,
    x5_off: u32,
    x6_off: u32,
    x7_off: u32,
    x8_off: u32,
    // Virtual tokens at the start of each row, seen by every query.
    sink: u32,
    _pad1: u32,
}

// params: Params (64 bytes).
@group(0) @binding(0) var<uniform> params: Params;
// seg_start: (n_tok) u32, the index in its row of each token's first key.
@group(0) @binding(1) var<storage, read> seg_start: array<u32>;
// q: (n_tok, n_head · d); k, v: (n_tok, n_kv_head · d). Read.
@group(0) @binding(2) var<storage, read_write> q: array<f32>;
@group(0) @binding(3) var<storage, read_write> k: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
// attention: o (n_tok, n_head · d) written. Backward: dO (n_tok, n_head · d) read.
@group(0) @binding(5) var<storage, read_write> x5: array<f32>;
// attention: lse (n_tok, n_head) written. Backward: dq (n_tok, n_head · d),
// holding (lse, D) at the start of each (query, head) slot; written by dq.
@group(0) @binding(6) var<storage, read_write> x6: array<f32>;
// attention_back_dkv only: dk, dv (n_tok, n_kv_head · d) written.
@group(0) @binding(7) var<storage, read_write> x7: array<f32>;
@group(0) @binding(8) var<storage, read_write> x8: array<f32>;

// The query (or dO) of the workgroup's item.
var<workgroup> qs: array<f32, MAX_DIM>;
// dO of the item (dq), or the key's values (dkv: ks holds the key).
var<workgroup> os: array<f32, MAX_DIM>;
// Per block: the probability / score gradient of each invocation's key or query.
var<workgroup> ss: array<f32, WG>;
var<workgroup> ps: array<f32, WG>;
var<workgroup> ds: array<f32, WG>;
// Loop bounds, made uniform through workgroupUniformLoad.
var<workgroup> bound: u32;

// First key query t of token r sees.
fn first_key(r: u32, t: u32) -> u32 {
    var lo = seg_start[r];
    if params.window != 0xffffffffu && t + 1u > params.window {
        lo = max(lo, t + 1u - params.window);
    }
    return min(lo, t);
}

// Key i of a query whose keys are ns sink keys then lo, lo + 1, ….
fn key_at(i: u32, ns: u32, lo: u32) -> u32 {
    return select(lo + i - ns, i, i < ns);
}

// Σ_c a[ao + c] · shared[c] over the head (shared: qs or os).
fn dot_q(ao: u32) -> f32 {
    var s = 0.0;
    for (var c = 0u; c < params.head_dim; c++) {
        s += k[ao + c] * qs[c];
    }
    return s;
}

@compute @workgroup_size(WG)
fn attention(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let item = wid.x + wid.y * nwg.x;
    if item >= params.n_tok * params.n_head {
        return;
    }
    let d = params.head_dim;
    let r = item / params.n_head;
    let h = item % params.n_head;
    let t = r % params.seq;
    let row0 = r - t;
    let kvh = h / (params.n_head / params.n_kv_head);
    let qd = params.n_head * d;
    let kvd = params.n_kv_head * d;
    for (var c = li; c < d; c += WG) {
        qs[c] = q[params.q_off + r * qd + h * d + c];
    }
    if li == 0u {
        bound = first_key(r, t);
    }
    let lo = workgroupUniformLoad(&bound);
    let ns = min(params.sink, lo);
    let total = ns + t + 1u - lo;
    var m = NEG;
    var l = 0.0;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var i0 = 0u; i0 < total; i0 += WG) {
        let nb = min(WG, total - i0);
        var s = NEG;
        if li < nb {
            let j = key_at(i0 + li, ns, lo);
            s = dot_q(params.k_off + (row0 + j) * kvd + kvh * d) * params.scale;
        }
        ss[li] = s;
        workgroupBarrier();
        var bm = NEG;
        for (var jj = 0u; jj < nb; jj++) {
            bm = max(bm, ss[jj]);
        }
        let m_new = max(m, bm);
        ps[li] = select(0.0, exp(s - m_new), li < nb);
        workgroupBarrier();
        let corr = exp(m - m_new);
        var sum = 0.0;
        for (var jj = 0u; jj < nb; jj++) {
            sum += ps[jj];
        }
        l = l * corr + sum;
        for (var e = 0u; e < 4u; e++) {
            let c = li + e * WG;
            if c < d {
                var a = acc[e] * corr;
                let vo = params.v_off + row0 * kvd + kvh * d + c;
                for (var jj = 0u; jj < nb; jj++) {
                    a += ps[jj] * v[vo + key_at(i0 + jj, ns, lo) * kvd];
                }
                acc[e] = a;
            }
        }
        m = m_new;
    }
    for (var e = 0u; e < 4u; e++) {
        let c = li + e * WG;
        if c < d {
            x5[params.x5_off + r * qd + h * d + c] = acc[e] / l;
        }
    }
    if li == 0u {
        x6[params.x6_off + r * params.n_head + h] = m + log(l);
    }
}

@compute @workgroup_size(WG)
fn attention_back_dq(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let item = wid.x + wid.y * nwg.x;
    if item >= params.n_tok * params.n_head {
        return;
    }
    let d = params.head_dim;
    let r = item / params.n_head;
    let h = item % params.n_head;
    let t = r % params.seq;
    let row0 = r - t;
    let kvh = h / (params.n_head / params.n_kv_head);
    let qd = params.n_head * d;
    let kvd = params.n_kv_head * d;
    let slot = r * qd + h * d;
    for (var c = li; c < d; c += WG) {
        qs[c] = q[params.q_off + slot + c];
        os[c] = x5[params.x5_off + slot + c];
    }
    let lse = x6[params.x6_off + slot];
    let dd = x6[params.x6_off + slot + 1u];
    if li == 0u {
        bound = first_key(r, t);
    }
    // (Also orders the reads of lse and D before any write of dq.)
    let lo = workgroupUniformLoad(&bound);
    let ns = min(params.sink, lo);
    let total = ns + t + 1u - lo;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var i0 = 0u; i0 < total; i0 += WG) {
        let nb = min(WG, total - i0);
        var g = 0.0;
        if li < nb {
            let kr = (row0 + key_at(i0 + li, ns, lo)) * kvd + kvh * d;
            let p = exp(dot_q(params.k_off + kr) * params.scale - lse);
            var dp = 0.0;
            for (var c = 0u; c < d; c++) {
                dp += os[c] * v[params.v_off + kr + c];
            }
            g = p * (dp - dd) * params.scale;
        }
        ds[li] = g;
        workgroupBarrier();
        for (var e = 0u; e < 4u; e++) {
            let c = li + e * WG;
            if c < d {
                var a = acc[e];
                let ko = params.k_off + row0 * kvd + kvh * d + c;
                for (var jj = 0u; jj < nb; jj++) {
                    a += ds[jj] * k[ko + key_at(i0 + jj, ns, lo) * kvd];
                }
                acc[e] = a;
            }
        }
        workgroupBarrier();
    }
    for (var e = 0u; e < 4u; e++) {
        let c = li + e * WG;
        if c < d {
            x6[params.x6_off + slot + c] = acc[e];
        }
    }
}

@compute @workgroup_size(WG)
fn attention_back_dkv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let item = wid.x + wid.y * nwg.x;
    if item >= params.n_tok * params.n_kv_head {
        return;
    }
    let d = params.head_dim;
    let r = item / params.n_kv_head;
    let kvh = item % params.n_kv_head;
    let j = r % params.seq;
    let row0 = r - j;
    let group = params.n_head / params.n_kv_head;
    let qd = params.n_head * d;
    let kvd = params.n_kv_head * d;
    let kr = r * kvd + kvh * d;
    // qs: the key; os: its values.
    for (var c = li; c < d; c += WG) {
        qs[c] = k[params.k_off + kr + c];
        os[c] = v[params.v_off + kr + c];
    }
    if li == 0u {
        // Queries j .. end see key j: the window's reach, up to the end of
        // j's segment (segments are runs of a row, their starts ascending).
        var end = params.seq;
        if params.window != 0xffffffffu {
            end = min(end, j + params.window);
        }
        var t = j + 1u;
        if j < params.sink {
            // Every later query of the row sees a sink key.
            t = end;
        }
        while t < end && seg_start[row0 + t] <= j {
            t++;
        }
        bound = t;
    }
    let end = workgroupUniformLoad(&bound);
    var acc_k = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    var acc_v = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var t0 = j; t0 < end; t0 += WG) {
        let nb = min(WG, end - t0);
        for (var hh = 0u; hh < group; hh++) {
            let h = kvh * group + hh;
            var p = 0.0;
            var g = 0.0;
            if li < nb {
                let slot = (row0 + t0 + li) * qd + h * d;
                let lse = x6[params.x6_off + slot];
                let dd = x6[params.x6_off + slot + 1u];
                var s = 0.0;
                var dp = 0.0;
                for (var c = 0u; c < d; c++) {
                    s += q[params.q_off + slot + c] * qs[c];
                    dp += x5[params.x5_off + slot + c] * os[c];
                }
                p = exp(s * params.scale - lse);
                g = p * (dp - dd) * params.scale;
            }
            ps[li] = p;
            ds[li] = g;
            workgroupBarrier();
            for (var e = 0u; e < 4u; e++) {
                let c = li + e * WG;
                if c < d {
                    var ak = acc_k[e];
                    var av = acc_v[e];
                    let o = (row0 + t0) * qd + h * d + c;
                    for (var tt = 0u; tt < nb; tt++) {
                        ak += ds[tt] * q[params.q_off + o + tt * qd];
                        av += ps[tt] * x5[params.x5_off + o + tt * qd];
                    }
                    acc_k[e] = ak;
                    acc_v[e] = av;
                }
            }
            workgroupBarrier();
        }
    }
    for (var e = 0u; e < 4u; e++) {
        let c = li + e * WG;
        if c < d {
            x7[params.x7_off + kr + c] = acc_k[e];
            x8[params.x8_off + kr + c] = acc_v[e];
        }
    }
}
