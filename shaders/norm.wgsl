// RMSNorm over rows: y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w.
//
// One workgroup of WG invocations per row; rows are counted in linear
// workgroup ids (wid.x + wid.y * nwg.x) so that more than 65535 rows fit, and
// workgroups past the last row return at once.
//
// Three entry points share the layout of bindings 0..2:
// - `rms_norm` reads `x` (binding 3) and writes `y` (binding 2);
// - `rms_norm_inplace` reads and writes `y` (binding 2) and never touches
//   binding 3, so that the in-place dispatch binds only three buffers (a
//   buffer may not be bound twice when one of the bindings is writable);
// - `add_rms_norm`, the residual step of a block fused with the next norm:
//   y[r] += (post ? rmsnorm(x[r]) * w2 : x[r]), then h[r] = rmsnorm(y[r]) * w,
//   where y is the residual stream, x a block's output, h the next input.

const WG: u32 = 128u;

struct Params {
    rows: u32,
    n: u32,
    eps: f32,
    // add_rms_norm only: 1 to normalize x (by w2) before adding it.
    post: u32,
}

// rows, row length n, eps.
@group(0) @binding(0) var<uniform> params: Params;
// Weight, shape (n).
@group(0) @binding(1) var<storage, read> w: array<f32>;
// Output, shape (rows, n); in `rms_norm_inplace` also the input.
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
// Input, shape (rows, n); only `rms_norm` uses it.
@group(0) @binding(3) var<storage, read> x: array<f32>;

// add_rms_norm only: the next block's input, shape (rows, n).
@group(0) @binding(4) var<storage, read_write> h: array<f32>;
// add_rms_norm only: weight of the norm applied to x before the add, shape (n)
// (bound to `w` again when params.post is 0; then never read).
@group(0) @binding(5) var<storage, read> w2: array<f32>;

var<workgroup> partial: array<f32, WG>;

// 1 / sqrt(mean + eps) from each invocation's partial sum of squares.
fn inv_rms(lid: u32, ss: f32) -> f32 {
    partial[lid] = ss;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            partial[lid] = partial[lid] + partial[lid + s];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    return 1.0 / sqrt(total / f32(params.n) + params.eps);
}

@compute @workgroup_size(WG)
fn rms_norm(
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
    var ss = 0.0;
    for (var i = lid; i < n; i = i + WG) {
        let v = x[base + i];
        ss = ss + v * v;
    }
    let inv = inv_rms(lid, ss);
    for (var i = lid; i < n; i = i + WG) {
        y[base + i] = x[base + i] * inv * w[i];
    }
}

@compute @workgroup_size(WG)
fn rms_norm_inplace(
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
    var ss = 0.0;
    for (var i = lid; i < n; i = i + WG) {
        let v = y[base + i];
        ss = ss + v * v;
    }
    let inv = inv_rms(lid, ss);
    for (var i = lid; i < n; i = i + WG) {
        y[base + i] = y[base + i] * inv * w[i];
    }
}

@compute @workgroup_size(WG)
fn add_rms_norm(
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
    var inv_x = 1.0;
    if params.post != 0u {
        var ss = 0.0;
        for (var i = lid; i < n; i = i + WG) {
            let v = x[base + i];
            ss = ss + v * v;
        }
        inv_x = inv_rms(lid, ss);
        // Everyone has read partial[0] before it is overwritten below.
        workgroupBarrier();
    }
    var ss = 0.0;
    for (var i = lid; i < n; i = i + WG) {
        var add = x[base + i];
        if params.post != 0u {
            add = add * inv_x * w2[i];
        }
        let v = y[base + i] + add;
        y[base + i] = v;
        ss = ss + v * v;
    }
    let inv = inv_rms(lid, ss);
    // Each invocation reads back only the elements it wrote.
    for (var i = lid; i < n; i = i + WG) {
        h[base + i] = y[base + i] * inv * w[i];
    }
}
