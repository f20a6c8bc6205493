// AdamW, in place on a parameter tensor (src/backend/gpu/train.rs), the
// formula of src/train/optim.rs:
//     m = β1·m + (1−β1)·g
//     v = β2·v + (1−β2)·g²
//     p −= lr·(m·inv_bc1 / (√v·inv_sqrt_bc2 + ε) + wd·p)
// with the bias corrections inv_bc1 = 1/(1−β1^t), inv_sqrt_bc2 = 1/√(1−β2^t)
// computed on the host in f64.
//
// `adamw` applies the gradient as it is; `adamw_clipped` (the optimizer of a
// resident training step, src/backend/gpu/train_step.rs) first reads the
// squared global gradient norm ss and the skip flag that train_grad_norm.wgsl
// wrote into `norm`: a flagged step (ss or the loss not finite) leaves p, m
// and v untouched, otherwise g is scaled by
//     clip = max_norm / √ss   when max_norm > 0 and ss > max_norm², else 1
// (as src/train/optim.rs's clip_scale).
//
// One invocation per element, linear id (wid.x + wid.y * nwg.x) * WG + lid.

const WG: u32 = 256u;

struct Params {
    // Elements.
    n: u32,
    p_off: u32,
    g_off: u32,
    m_off: u32,
    v_off: u32,
    // Index in `norm` of ss (the skip flag follows it); adamw_clipped only.
    ss_at: u32,
    _pad1: u32,
    _pad2: u32,
}

// The step's hyper-parameters (written by the host before each step).
struct Hyper {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    inv_bc1: f32,
    inv_sqrt_bc2: f32,
    // Largest global gradient norm (≤ 0: no clipping); adamw_clipped only.
    max_norm: f32,
}

// params: Params (32 bytes).
@group(0) @binding(0) var<uniform> params: Params;
// hyper: Hyper (32 bytes).
@group(0) @binding(1) var<uniform> hyper: Hyper;
// param: (n), updated in place.
@group(0) @binding(2) var<storage, read_write> param: array<f32>;
// grad: (n), read.
@group(0) @binding(3) var<storage, read_write> grad: array<f32>;
// m, v: (n) each, the moments, updated in place.
@group(0) @binding(4) var<storage, read_write> m: array<f32>;
@group(0) @binding(5) var<storage, read_write> v: array<f32>;
// norm: train_grad_norm.wgsl's partials, then ss and the skip flag at ss_at.
@group(0) @binding(6) var<storage, read_write> norm: array<f32>;

// One element's update with gradient g.
fn update(i: u32, g: f32) {
    let mi = hyper.beta1 * m[params.m_off + i] + (1.0 - hyper.beta1) * g;
    let vi = hyper.beta2 * v[params.v_off + i] + (1.0 - hyper.beta2) * g * g;
    m[params.m_off + i] = mi;
    v[params.v_off + i] = vi;
    let pi = param[params.p_off + i];
    let upd = mi * hyper.inv_bc1 / (sqrt(vi) * hyper.inv_sqrt_bc2 + hyper.eps);
    param[params.p_off + i] = pi - hyper.lr * (upd + hyper.weight_decay * pi);
}

@compute @workgroup_size(WG)
fn adamw(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if i >= params.n {
        return;
    }
    update(i, grad[params.g_off + i]);
}

@compute @workgroup_size(WG)
fn adamw_clipped(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if i >= params.n || norm[params.ss_at + 1u] != 0.0 {
        return;
    }
    let ss = norm[params.ss_at];
    var clip = 1.0;
    if hyper.max_norm > 0.0 && ss > hyper.max_norm * hyper.max_norm {
        clip = hyper.max_norm / sqrt(ss);
    }
    update(i, grad[params.g_off + i] * clip);
}
