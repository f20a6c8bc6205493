// Token choice from one row of logits: argmax, and sampling with
// temperature, top-k and top-p (nucleus).
//
// Both entry points run as a single workgroup of WG invocations over any n,
// with strided passes over the logits and reductions in workgroup memory.
//
// Sampling never sorts the vocabulary. Logits are ordered by an
// order-preserving u32 key (the IEEE total order, as f32::total_cmp):
//   1. m = max logit; weights w_i = exp((l_i - m) / temperature).
//   2. top-k: t_k = the k-th largest key (the smallest key when top_k is 0
//      or ≥ n), found by radix select: four passes over the row, each
//      building a 256-bin histogram of one byte of the keys that match the
//      bytes chosen so far. c = #{i : key_i ≥ t_k} (ties included).
//   3. top-p: t = the largest key K ≥ t_k with
//      Σ{w_i : key_i ≥ K} ≥ top_p · Σ{w_i : key_i ≥ t_k} (t = t_k when top_p ≥ 1).
//   4. inverse CDF in vocabulary order over the kept tokens (key_i ≥ t): the
//      first index whose running sum of weights exceeds u · (kept mass); the
//      last kept index when rounding leaves none.
// Steps 3 and 4 take one of two paths:
//   - small (c ≤ CAP): the c candidates are gathered into workgroup memory
//     (one pass over the row) and sorted into vocabulary order; steps 3 and
//     4 run there with no further pass over the row: step 3 as a binary
//     search whose sums are over the candidates, step 4 as one invocation's
//     running f32 sum in vocabulary order.
//   - large: step 3 is a binary search over key values, each step a parallel
//     sum over the row; in step 4 each invocation owns a contiguous chunk of
//     the vocabulary: the chunk sums are prefix-summed and the invocation
//     whose chunk holds u · mass walks it.
// The two paths round differently (f32 sums in different orders); both
// approximate the f64 definition in sample_reference.

const WG: u32 = 256u;

struct Params {
    // First logit of the row.
    off: u32,
    // Row length.
    n: u32,
    _pad0: u32,
    _pad1: u32,
}

struct SampleParams {
    temperature: f32,
    // 0: all tokens.
    top_k: u32,
    // ≥ 1: all tokens.
    top_p: f32,
    // Uniform draw in [0, 1).
    u: f32,
}

// Where the row lies.
@group(0) @binding(0) var<uniform> params: Params;
// Logits, shape (≥ off + n); the row is logits[off .. off + n].
@group(0) @binding(1) var<storage, read> logits: array<f32>;
// The chosen token, shape (1), u32; only element 0 is written.
@group(0) @binding(2) var<storage, read_write> out_token: array<u32>;
// sample only: the step's sampling parameters.
@group(0) @binding(3) var<uniform> sp: SampleParams;

var<workgroup> part_f: array<f32, WG>;
var<workgroup> part_u: array<u32, WG>;

// sample only; with part_f and part_u about 15 KiB of workgroup memory,
// inside WebGPU's default 16 KiB.
// Largest candidate set of the small path.
const CAP: u32 = 1024u;
// Radix select: one byte's histogram.
var<workgroup> hist: array<atomic<u32>, WG>;
// Radix select: the chosen bin, the keys above it, the keys in it.
var<workgroup> sel: array<u32, 3>;
// Small path: candidates gathered so far.
var<workgroup> g_count: atomic<u32>;
// Small path, candidate j in vocabulary order (j < c): its index in the row
// (g_idx), key (g_key) and weight (g_w). g_key first holds the unordered
// indices while they are sorted.
var<workgroup> g_idx: array<u32, CAP>;
var<workgroup> g_key: array<u32, CAP>;
var<workgroup> g_w: array<f32, CAP>;

// Order-preserving map of f32 to u32.
fn key(f: f32) -> u32 {
    let b = bitcast<u32>(f);
    if (b & 0x80000000u) != 0u {
        return ~b;
    }
    return b | 0x80000000u;
}

fn unkey(k: u32) -> f32 {
    if (k & 0x80000000u) != 0u {
        return bitcast<f32>(k & 0x7fffffffu);
    }
    return bitcast<f32>(~k);
}

// Reductions over the workgroup; the result is uniform, and `part_*` may be
// rewritten as soon as they return.
fn sum_u(lid: u32, v: u32) -> u32 {
    part_u[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            part_u[lid] = part_u[lid] + part_u[lid + s];
        }
        workgroupBarrier();
    }
    let r = workgroupUniformLoad(&part_u[0]);
    workgroupBarrier();
    return r;
}

fn max_u(lid: u32, v: u32) -> u32 {
    part_u[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            part_u[lid] = max(part_u[lid], part_u[lid + s]);
        }
        workgroupBarrier();
    }
    let r = workgroupUniformLoad(&part_u[0]);
    workgroupBarrier();
    return r;
}

fn min_u(lid: u32, v: u32) -> u32 {
    part_u[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            part_u[lid] = min(part_u[lid], part_u[lid + s]);
        }
        workgroupBarrier();
    }
    let r = workgroupUniformLoad(&part_u[0]);
    workgroupBarrier();
    return r;
}

fn sum_f(lid: u32, v: f32) -> f32 {
    part_f[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            part_f[lid] = part_f[lid] + part_f[lid + s];
        }
        workgroupBarrier();
    }
    let r = workgroupUniformLoad(&part_f[0]);
    workgroupBarrier();
    return r;
}

// Index of the largest logit of the row (the first on ties).
@compute @workgroup_size(WG)
fn argmax(@builtin(local_invocation_index) lid: u32) {
    let n = params.n;
    let off = params.off;
    var best_v = bitcast<f32>(0xff800000u);
    var best_i = 0xffffffffu;
    if lid < n {
        best_v = logits[off + lid];
        best_i = lid;
    }
    for (var i = lid + WG; i < n; i = i + WG) {
        let x = logits[off + i];
        if x > best_v {
            best_v = x;
            best_i = i;
        }
    }
    part_f[lid] = best_v;
    part_u[lid] = best_i;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            let v = part_f[lid + s];
            let j = part_u[lid + s];
            let a = part_f[lid];
            if v > a || (v == a && j < part_u[lid]) {
                part_f[lid] = v;
                part_u[lid] = j;
            }
        }
        workgroupBarrier();
    }
    if lid == 0u {
        out_token[0] = min(part_u[0], max(n, 1u) - 1u);
    }
}

// lo + ceil((hi - lo) / 2) without overflow, for lo < hi.
fn upper_mid(lo: u32, hi: u32) -> u32 {
    let d = hi - lo;
    return lo + (d >> 1u) + (d & 1u);
}

// Σ exp((l_i - m) / temperature) over the logits with key ≥ k.
fn mass(lid: u32, k: u32, m: f32) -> f32 {
    let n = params.n;
    let off = params.off;
    let temp = sp.temperature;
    var s = 0.0;
    for (var i = lid; i < n; i = i + WG) {
        let x = logits[off + i];
        if key(x) >= k {
            s = s + exp((x - m) / temp);
        }
    }
    return sum_f(lid, s);
}

// (the k-th largest key of the row (0 < k < n), the number of keys ≥ it,
// the largest key), by radix select from the top byte down; the first pass
// also finds the largest key.
fn kth_largest(lid: u32, k: u32) -> vec3<u32> {
    let n = params.n;
    let off = params.off;
    // Bytes chosen so far, in place.
    var prefix = 0u;
    // Rank of the wanted key among the keys matching `prefix`.
    var rank = k;
    // Keys above the bins chosen so far.
    var above = 0u;
    var in_bin = 0u;
    var kmax = 0u;
    for (var digit = 0u; digit < 4u; digit = digit + 1u) {
        let shift = 24u - 8u * digit;
        let hmask = ~(0xffffffffu >> (8u * digit));
        atomicStore(&hist[lid], 0u);
        workgroupBarrier();
        // Runs of equal bytes are added at once: the top bytes of a row of
        // logits mostly fall in a few bins.
        var cur = 0u;
        var run = 0u;
        for (var i = lid; i < n; i = i + WG) {
            let kx = key(logits[off + i]);
            if digit == 0u {
                kmax = max(kmax, kx);
            }
            if (kx & hmask) == prefix {
                let b = (kx >> shift) & 0xffu;
                if b != cur {
                    if run > 0u {
                        atomicAdd(&hist[cur], run);
                    }
                    cur = b;
                    run = 0u;
                }
                run = run + 1u;
            }
        }
        if run > 0u {
            atomicAdd(&hist[cur], run);
        }
        workgroupBarrier();
        // Suffix sums over the bins: part_u[b] = Σ hist[b ..].
        let h = atomicLoad(&hist[lid]);
        part_u[lid] = h;
        workgroupBarrier();
        for (var d = 1u; d < WG; d = d * 2u) {
            var v = part_u[lid];
            if lid + d < WG {
                v = v + part_u[lid + d];
            }
            workgroupBarrier();
            part_u[lid] = v;
            workgroupBarrier();
        }
        let over = part_u[lid] - h;
        if over < rank && rank <= over + h {
            // The one bin holding the wanted key.
            sel[0] = lid;
            sel[1] = over;
            sel[2] = h;
        }
        let b = workgroupUniformLoad(&sel[0]);
        let o = workgroupUniformLoad(&sel[1]);
        in_bin = workgroupUniformLoad(&sel[2]);
        prefix = prefix | (b << shift);
        rank = rank - o;
        above = above + o;
    }
    kmax = max_u(lid, kmax);
    return vec3<u32>(prefix, above + in_bin, kmax);
}

// Σ g_w[j] over the gathered candidates with g_key[j] ≥ k: per-invocation
// sums over j = lid, lid + WG, … then a tree over the invocations (a fixed
// order, so the mass only shrinks as k grows).
fn small_mass(lid: u32, c: u32, k: u32) -> f32 {
    var s = 0.0;
    for (var j = lid; j < c; j = j + WG) {
        if g_key[j] >= k {
            s = s + g_w[j];
        }
    }
    return sum_f(lid, s);
}

// Steps 3 and 4 when the c ≤ CAP keys ≥ t are few: gathered into workgroup
// memory and sorted into vocabulary order. Writes out_token.
fn sample_small(lid: u32, t: u32, c: u32, kmax: u32, m: f32) {
    let n = params.n;
    let off = params.off;
    let temp = sp.temperature;

    // Gather the candidates' indices into g_key, in any order; pad to a
    // power of two with indices past every candidate.
    var size = 1u;
    while size < c {
        size = size * 2u;
    }
    if lid == 0u {
        atomicStore(&g_count, 0u);
    }
    for (var j = c + lid; j < size; j = j + WG) {
        g_key[j] = 0xffffffffu;
    }
    workgroupBarrier();
    for (var i = lid; i < n; i = i + WG) {
        if key(logits[off + i]) >= t {
            let p = atomicAdd(&g_count, 1u);
            if p < c {
                g_key[p] = i;
            }
        }
    }
    workgroupBarrier();
    // Bitonic sort of g_key[0 .. size] ascending; each pair (j, j ^ d) is
    // compared by the invocation holding its lower position.
    for (var w = 2u; w <= size; w = w * 2u) {
        for (var d = w / 2u; d > 0u; d = d / 2u) {
            for (var j = lid; j < size; j = j + WG) {
                let l = j ^ d;
                if l > j {
                    let a = g_key[j];
                    let b = g_key[l];
                    if (a > b) == ((j & w) == 0u) {
                        g_key[j] = b;
                        g_key[l] = a;
                    }
                }
            }
            workgroupBarrier();
        }
    }
    for (var j = lid; j < c; j = j + WG) {
        let i = g_key[j];
        let x = logits[off + i];
        g_idx[j] = i;
        g_key[j] = key(x);
        g_w[j] = exp((x - m) / temp);
    }
    workgroupBarrier();

    // 3. Top-p: binary search as on the large path, over the candidates.
    var tp = t;
    if sp.top_p < 1.0 {
        let want = sp.top_p * small_mass(lid, c, tp);
        var hi = kmax;
        while tp < hi {
            let mid = upper_mid(tp, hi);
            if small_mass(lid, c, mid) >= want {
                tp = mid;
            } else {
                hi = mid - 1u;
            }
        }
    }

    // 4. Inverse CDF: one invocation walks the candidates in vocabulary
    // order, as sample_reference does in f64.
    if lid == 0u {
        var total = 0.0;
        var last = 0u;
        for (var j = 0u; j < c; j = j + 1u) {
            if g_key[j] >= tp {
                total = total + g_w[j];
                last = j;
            }
        }
        let r = sp.u * total;
        var pick = last;
        var acc = 0.0;
        for (var j = 0u; j < c; j = j + 1u) {
            if g_key[j] >= tp {
                acc = acc + g_w[j];
                if acc > r {
                    pick = j;
                    break;
                }
            }
        }
        out_token[0] = g_idx[pick];
    }
}

@compute @workgroup_size(WG)
fn sample(@builtin(local_invocation_index) lid: u32) {
    let n = params.n;
    let off = params.off;
    if n == 0u {
        return;
    }
    let temp = sp.temperature;

    // 1. The largest key, and 2. top-k: t = the k-th largest key (the
    // smallest key when every token is kept), c = #{keys ≥ t}.
    var kmax = 0u;
    var t = 0xffffffffu;
    var c = n;
    let top_k = sp.top_k;
    if top_k > 0u && top_k < n {
        let r = kth_largest(lid, top_k);
        t = r.x;
        c = r.y;
        kmax = r.z;
    } else {
        for (var i = lid; i < n; i = i + WG) {
            let kx = key(logits[off + i]);
            kmax = max(kmax, kx);
            t = min(t, kx);
        }
        kmax = max_u(lid, kmax);
        t = min_u(lid, t);
    }
    let m = unkey(kmax);
    if c <= CAP {
        sample_small(lid, t, c, kmax, m);
        return;
    }

    // 3. Top-p: the largest threshold keeping at least top_p of the mass.
    if sp.top_p < 1.0 {
        let want = sp.top_p * mass(lid, t, m);
        var hi = kmax;
        while t < hi {
            let mid = upper_mid(t, hi);
            if mass(lid, mid, m) >= want {
                t = mid;
            } else {
                hi = mid - 1u;
            }
        }
    }

    // 4. Inverse CDF over the kept tokens in vocabulary order.
    let chunk = (n + WG - 1u) / WG;
    let begin = min(lid * chunk, n);
    let end = min(begin + chunk, n);
    var c_sum = 0.0;
    var last = 0u; // last kept index + 1 in this chunk, 0: none
    for (var i = begin; i < end; i = i + 1u) {
        let x = logits[off + i];
        if key(x) >= t {
            c_sum = c_sum + exp((x - m) / temp);
            last = i + 1u;
        }
    }
    let last_all = max_u(lid, last);
    part_f[lid] = c_sum;
    workgroupBarrier();
    if lid == 0u {
        var acc = 0.0;
        for (var j = 0u; j < WG; j = j + 1u) {
            acc = acc + part_f[j];
            part_f[j] = acc;
        }
    }
    workgroupBarrier();
    let total = part_f[WG - 1u];
    let r = sp.u * total;
    var before = 0.0;
    if lid > 0u {
        before = part_f[lid - 1u];
    }
    let after = part_f[lid];
    if before <= r && r < after {
        var acc = 0.0;
        var pick = last - 1u;
        for (var i = begin; i < end; i = i + 1u) {
            let x = logits[off + i];
            if key(x) >= t {
                acc = acc + exp((x - m) / temp);
                if before + acc > r {
                    pick = i;
                    break;
                }
            }
        }
        out_token[0] = pick;
    }
    if lid == 0u && !(r < total) {
        out_token[0] = last_all - 1u;
    }
}
