// Inverted dropout for training (src/backend/gpu/train.rs): y = x·keep where
// the mask keeps element i, else 0. The mask is the CPU's
// (src/backend/cpu/train/ops.rs, mask_uniform) bit for bit: SplitMix64 of
// (step seed, site, i) in 64-bit integers emulated with pairs of u32, the
// top 24 bits as a uniform u in [0, 1), dropped where u < p. Linear in x, so
// the same dispatch on dy gives dx.
//
// One invocation per element, linear id (wid.x + wid.y * nwg.x) * WG + lid.

const WG: u32 = 256u;

struct Params {
    // Elements.
    n: u32,
    x_off: u32,
    y_off: u32,
    // The dropout site (which op of the graph).
    site: u32,
    // Drop probability.
    p: f32,
    // 1 / (1 − p), computed in f32 on the host as the CPU does.
    keep: f32,
    _pad0: u32,
    _pad1: u32,
}

// The values that change every step (written by the host before each
// submission); only the seed is read here.
struct Step {
    seed_lo: u32,
    seed_hi: u32,
    loss_scale: f32,
    _pad: u32,
}

// params: Params (32 bytes).
@group(0) @binding(0) var<uniform> params: Params;
// step: Step (16 bytes).
@group(0) @binding(1) var<uniform> step: Step;
// x: (n) read.
@group(0) @binding(2) var<storage, read_write> x: array<f32>;
// y: (n) written.
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

// 64-bit values are vec2<u32>(low word, high word).

// High 32 bits of the 64-bit product a·b.
fn mul_hi(a: u32, b: u32) -> u32 {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let mid = (p00 >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
    return a1 * b1 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u);
}

// a·b mod 2⁶⁴.
fn mul64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    return vec2<u32>(a.x * b.x, mul_hi(a.x, b.x) + a.x * b.y + a.y * b.x);
}

// z ^ (z >> s) for 0 < s < 32.
fn xorshr(z: vec2<u32>, s: u32) -> vec2<u32> {
    return z ^ vec2<u32>((z.x >> s) | (z.y << (32u - s)), z.y >> s);
}

// The CPU's mask_uniform(seed, site, i).
fn mask_uniform(i: u32) -> f32 {
    var z = vec2<u32>(step.seed_lo, step.seed_hi ^ (params.site << 8u));
    z ^= mul64(vec2<u32>(i, 0u), vec2<u32>(0x7f4a7c15u, 0x9e3779b9u));
    z = mul64(xorshr(z, 30u), vec2<u32>(0x1ce4e5b9u, 0xbf58476du));
    z = mul64(xorshr(z, 27u), vec2<u32>(0x133111ebu, 0x94d049bbu));
    z = xorshr(z, 31u);
    return f32(z.y >> 8u) / 16777216.0;
}

@compute @workgroup_size(WG)
fn dropout(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if i >= params.n {
        return;
    }
    var r = 0.0;
    if !(mask_uniform(i) < params.p) {
        r = x[params.x_off + i] * params.keep;
    }
    y[params.y_off + i] = r;
}
