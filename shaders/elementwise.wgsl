// Element-wise kernels: gated activations, residual add.
//
// One invocation per element, linear invocation id over workgroups of WG
// (wid.x + wid.y * nwg.x); invocations past the end return. All entry points
// share the bindings below; each uses the ones its comment names.

const WG: u32 = 256u;

struct Params {
    // Elements to process.
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// Element count.
@group(0) @binding(0) var<uniform> params: Params;
// Written operand, shape (n): gate (activations), x (add).
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
// Read operand, shape (n): up (activations), y (add).
@group(0) @binding(2) var<storage, read> b: array<f32>;

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// gate[i] = silu(gate[i]) * up[i]
@compute @workgroup_size(WG)
fn silu_mul(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if i >= params.n {
        return;
    }
    let g = a[i];
    a[i] = g / (1.0 + exp(-g)) * b[i];
}

// gate[i] = gelu_tanh(gate[i]) * up[i]
@compute @workgroup_size(WG)
fn gelu_tanh_mul(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if i >= params.n {
        return;
    }
    let g = a[i];
    // sqrt(2 / pi); tanh is exactly ±1 in f32 past |z| = 10, and some drivers
    // compute it through exp and give NaN for large arguments: clamp.
    let z = clamp(0.7978846 * (g + 0.044715 * g * g * g), -10.0, 10.0);
    a[i] = 0.5 * g * (1.0 + tanh(z)) * b[i];
}

// x[i] += y[i]
@compute @workgroup_size(WG)
fn add(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_id(wid, nwg, lid);
    if i >= params.n {
        return;
    }
    a[i] = a[i] + b[i];
}
