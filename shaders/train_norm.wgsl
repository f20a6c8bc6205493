// RMSNorm for training, forward beside backward (src/backend/gpu/train.rs),
// over groups of n = len(w) values (a row, or one head of a row):
//     rms_norm:      y = x·r·w,  r = 1/√(mean(x²) + eps)
//     rms_norm_back: dx = r·(w⊙dy) − x·r³·mean(w⊙dy⊙x)
// One workgroup of WG per group (linear workgroup id wid.x + wid.y * nwg.x);
// its invocations stride over the group and sum in a tree in workgroup memory.

const WG: u32 = 64u;

struct Params {
    // Groups.
    groups: u32,
    // Values per group: len(w).
    n: u32,
    eps: f32,
    x_off: u32,
    // rms_norm: y; rms_norm_back: dy.
    b_off: u32,
    // rms_norm_back: dx.
    c_off: u32,
    _pad0: u32,
    _pad1: u32,
}

// params: Params (32 bytes).
@group(0) @binding(0) var<uniform> params: Params;
// w: (n), the frozen norm weight.
@group(0) @binding(1) var<storage, read> w: array<f32>;
// x: (groups, n), read.
@group(0) @binding(2) var<storage, read_write> x: array<f32>;
// rms_norm: y (groups, n) written; rms_norm_back: dy (groups, n) read.
@group(0) @binding(3) var<storage, read_write> b: array<f32>;
// rms_norm_back only: dx (groups, n) written.
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

var<workgroup> red: array<vec2<f32>, WG>;

// Sum of v over the workgroup, the same in every invocation.
fn workgroup_sum(li: u32, v: vec2<f32>) -> vec2<f32> {
    red[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if li < s {
            red[li] += red[li + s];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(WG)
fn rms_norm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let g = wid.x + wid.y * nwg.x;
    if g >= params.groups {
        return;
    }
    let x0 = params.x_off + g * params.n;
    var ss = 0.0;
    for (var i = li; i < params.n; i += WG) {
        let v = x[x0 + i];
        ss += v * v;
    }
    let r = 1.0 / sqrt(workgroup_sum(li, vec2<f32>(ss, 0.0)).x / f32(params.n) + params.eps);
    let y0 = params.b_off + g * params.n;
    for (var i = li; i < params.n; i += WG) {
        b[y0 + i] = x[x0 + i] * r * w[i];
    }
}

@compute @workgroup_size(WG)
fn rms_norm_back(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let g = wid.x + wid.y * nwg.x;
    if g >= params.groups {
        return;
    }
    let x0 = params.x_off + g * params.n;
    let d0 = params.b_off + g * params.n;
    var s = vec2<f32>(0.0);
    for (var i = li; i < params.n; i += WG) {
        let v = x[x0 + i];
        s += vec2<f32>(v * v, v * b[d0 + i] * w[i]);
    }
    s = workgroup_sum(li, s);
    let r = 1.0 / sqrt(s.x / f32(params.n) + params.eps);
    let k = r * r * r * s.y / f32(params.n);
    let o0 = params.c_off + g * params.n;
    for (var i = li; i < params.n; i += WG) {
        c[o0 + i] = r * b[d0 + i] * w[i] - x[x0 + i] * k;
    }
}
