// Element-wise training ops, forward beside backward
// (src/backend/gpu/train.rs):
//     axpby:           c = alpha·a + beta·b (Add, AddScaled; Scale with beta = 0)
//     gated_<act>:      c = act(a)·b                     (a = g, b = u, c = h)
//     gated_back_<act>: d = c·b·act'(a), e = c·act(a)     (c = dh, d = dg, e = du)
// for act = silu and gelu (tanh approximation), with the CPU's formulas
// (src/backend/cpu/train/ops.rs).
//
// One invocation per element, linear id (wid.x + wid.y * nwg.x) * WG + lid;
// invocations past n return. Operand x of element i is x[x_off + i]. Every
// f32 binding is read_write: operands may be windows of one buffer.

const WG: u32 = 256u;

struct Params {
    // Elements.
    n: u32,
    a_off: u32,
    b_off: u32,
    c_off: u32,
    d_off: u32,
    e_off: u32,
    // axpby's coefficients.
    alpha: f32,
    beta: f32,
}

// params: Params (32 bytes).
@group(0) @binding(0) var<uniform> params: Params;
// Shapes (n) each; which are read and written: see each entry point.
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<storage, read_write> d: array<f32>;
@group(0) @binding(5) var<storage, read_write> e: array<f32>;

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// (silu(g), silu'(g)).
fn silu_slope(g: f32) -> vec2<f32> {
    let s = 1.0 / (1.0 + exp(-g));
    return vec2<f32>(g * s, s * (1.0 + g * (1.0 - s)));
}

// (gelu(g), gelu'(g)), tanh approximation. tanh is exactly ±1 in f32 past
// |z| = 10, and some drivers compute it through exp (NaN for large z): clamp.
fn gelu_slope(g: f32) -> vec2<f32> {
    let k = 0.7978846; // √(2/π)
    let cc = 0.044715;
    let t = tanh(clamp(k * (g + cc * g * g * g), -10.0, 10.0));
    let dv = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3.0 * cc * g * g);
    return vec2<f32>(0.5 * g * (1.0 + t), dv);
}

// c = alpha·a + beta·b (b is not read when beta = 0).
@compute @workgroup_size(WG)
fn axpby(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if i >= params.n {
        return;
    }
    var r = params.alpha * a[params.a_off + i];
    if params.alpha == 1.0 {
        r = a[params.a_off + i];
    }
    if params.beta != 0.0 {
        r += params.beta * b[params.b_off + i];
    }
    c[params.c_off + i] = r;
}

@compute @workgroup_size(WG)
fn gated_silu(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if i >= params.n {
        return;
    }
    c[params.c_off + i] = silu_slope(a[params.a_off + i]).x * b[params.b_off + i];
}

@compute @workgroup_size(WG)
fn gated_gelu(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if i >= params.n {
        return;
    }
    c[params.c_off + i] = gelu_slope(a[params.a_off + i]).x * b[params.b_off + i];
}

fn gated_back(i: u32, as_: vec2<f32>) {
    let u = b[params.b_off + i];
    let dh = c[params.c_off + i];
    d[params.d_off + i] = dh * u * as_.y;
    e[params.e_off + i] = dh * as_.x;
}

@compute @workgroup_size(WG)
fn gated_back_silu(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if i >= params.n {
        return;
    }
    gated_back(i, silu_slope(a[params.a_off + i]));
}

@compute @workgroup_size(WG)
fn gated_back_gelu(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if i >= params.n {
        return;
    }
    gated_back(i, gelu_slope(a[params.a_off + i]));
}
