// Row-wise softmax (in place) and per-row negative log-likelihood.
//
// One workgroup of WG invocations per row; rows are counted in linear
// workgroup ids (wid.x + wid.y * nwg.x), workgroups past the last row return.

const WG: u32 = 256u;

struct Params {
    rows: u32,
    // Row length (the vocabulary for nll).
    n: u32,
    // nll: element of `data` receiving row 0's value.
    out_off: u32,
    _pad: u32,
}

// Row count, row length, output offset.
@group(0) @binding(0) var<uniform> params: Params;
// softmax: the rows, shape (rows, n), normalised in place.
// nll: the output, shape (≥ out_off + rows); element out_off + r is row r's value.
@group(0) @binding(1) var<storage, read_write> data: array<f32>;
// nll only: logits, shape (rows, n).
@group(0) @binding(2) var<storage, read> logits: array<f32>;
// nll only: target token of each row, shape (rows), u32.
@group(0) @binding(3) var<storage, read> targets: array<u32>;

var<workgroup> partial: array<f32, WG>;

fn reduce_max(lid: u32, v: f32) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            partial[lid] = max(partial[lid], partial[lid + s]);
        }
        workgroupBarrier();
    }
    let r = partial[0];
    // Every invocation has read the result before `partial` is reused.
    workgroupBarrier();
    return r;
}

fn reduce_sum(lid: u32, v: f32) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            partial[lid] = partial[lid] + partial[lid + s];
        }
        workgroupBarrier();
    }
    let r = partial[0];
    workgroupBarrier();
    return r;
}

// Lowest finite f32: the start of a running maximum.
const LOWEST: f32 = -3.4028235e38;

@compute @workgroup_size(WG)
fn softmax(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * nwg.x;
    if row >= params.rows {
        return;
    }
    let n = params.n;
    let base = row * n;
    var m = LOWEST;
    for (var i = lid; i < n; i = i + WG) {
        m = max(m, data[base + i]);
    }
    m = reduce_max(lid, m);
    var s = 0.0;
    for (var i = lid; i < n; i = i + WG) {
        let e = exp(data[base + i] - m);
        data[base + i] = e;
        s = s + e;
    }
    let inv = 1.0 / reduce_sum(lid, s);
    for (var i = lid; i < n; i = i + WG) {
        data[base + i] = data[base + i] * inv;
    }
}

// data[out_off + r] = logsumexp(logits[r]) - logits[r][targets[out_off + r]]
@compute @workgroup_size(WG)
fn nll(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * nwg.x;
    if row >= params.rows {
        return;
    }
    let n = params.n;
    let base = row * n;
    var m = LOWEST;
    for (var i = lid; i < n; i = i + WG) {
        m = max(m, logits[base + i]);
    }
    m = reduce_max(lid, m);
    var s = 0.0;
    for (var i = lid; i < n; i = i + WG) {
        s = s + exp(logits[base + i] - m);
    }
    s = reduce_sum(lid, s);
    if lid == 0u {
        let target_logit = logits[base + min(targets[params.out_off + row], n - 1u)];
        data[params.out_off + row] = (m - target_logit) + log(s);
    }
}
