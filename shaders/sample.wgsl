// Token choice from one row of logits: argmax, and sampling with
// temperature, top-k and top-p (nucleus).
//
// Both entry points run as a single workgroup of WG invocations over any n,
// with strided passes over the logits and tree reductions in workgroup memory.
//
// Sampling never sorts the vocabulary. Logits are ordered by an
// order-preserving u32 key (the IEEE total order, as f32::total_cmp), and
// thresholds are found by binary search over key values, each step being one
// parallel count or sum:
//   1. m = max logit; weights w_i = exp((l_i - m) / temperature).
//   2. top-k: t_k = the largest key K with #{i : key_i ≥ K} ≥ top_k, i.e. the
//      k-th largest logit (the smallest key when top_k is 0 or ≥ n).
//   3. top-p: t = the largest key K ≥ t_k with
//      Σ{w_i : key_i ≥ K} ≥ top_p · Σ{w_i : key_i ≥ t_k} (t = t_k when top_p ≥ 1).
//   4. inverse CDF in vocabulary order over the kept tokens (key_i ≥ t): the
//      first index whose running sum of weights exceeds u · (kept mass).
// Each invocation owns a contiguous chunk of the vocabulary for step 4: the
// chunk sums are prefix-summed and the invocation whose chunk holds u · mass
// walks it.

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

@compute @workgroup_size(WG)
fn sample(@builtin(local_invocation_index) lid: u32) {
    let n = params.n;
    let off = params.off;
    if n == 0u {
        return;
    }
    let temp = sp.temperature;

    // 1. Extremes of the row.
    var kmax = 0u;
    var kmin = 0xffffffffu;
    for (var i = lid; i < n; i = i + WG) {
        let kx = key(logits[off + i]);
        kmax = max(kmax, kx);
        kmin = min(kmin, kx);
    }
    kmax = max_u(lid, kmax);
    kmin = min_u(lid, kmin);
    let m = unkey(kmax);

    // 2. Top-k: the k-th largest key.
    var t = kmin;
    let top_k = sp.top_k;
    if top_k > 0u && top_k < n {
        var hi = kmax;
        while t < hi {
            let mid = upper_mid(t, hi);
            var c = 0u;
            for (var i = lid; i < n; i = i + WG) {
                c = c + select(0u, 1u, key(logits[off + i]) >= mid);
            }
            if sum_u(lid, c) >= top_k {
                t = mid;
            } else {
                hi = mid - 1u;
            }
        }
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
