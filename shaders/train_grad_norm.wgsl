// The squared global norm of a step's gradients, ss = Σ_tensors Σ_i g², in a
// fixed order (no atomics: the same gradients give the same bits every run),
// for the optimizer of a resident training step (src/backend/gpu/train.rs,
// train_step.rs):
//   sumsq_partial  one dispatch per gradient tensor: workgroup w sums the
//                  squares of elements [w·CHUNK, (w+1)·CHUNK) into
//                  partials[dst + w];
//   sumsq_total    one workgroup: ss = Σ partials[0..n) into partials[dst],
//                  then the skip flag (1 when ss or the loss is not finite,
//                  else 0) into partials[dst + 1] and the loss (Σ NLL,
//                  count) into partials[dst + 2 ..= dst + 3], so that one
//                  copy of 16 bytes brings back all the host needs.
// Each invocation sums PER values in a fixed order, then the workgroup adds
// the WG sums as a tree.
//
// Linear workgroup id wid.x + wid.y * nwg.x.

const WG: u32 = 256u;
const PER: u32 = 16u;
const CHUNK: u32 = 4096u; // WG * PER

struct Params {
    // Elements of src (sumsq_partial) or partials to sum (sumsq_total).
    n: u32,
    // First element of src.
    src_off: u32,
    // Where the result goes in partials.
    dst: u32,
    _pad: u32,
}

// params: Params (16 bytes).
@group(0) @binding(0) var<uniform> params: Params;
// src: (n) a gradient (sumsq_partial), or (2) the loss (Σ NLL, count) (sumsq_total).
@group(0) @binding(1) var<storage, read_write> src: array<f32>;
// partials: one per workgroup of every sumsq_partial, then ss, skip, loss.
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;

var<workgroup> acc: array<f32, WG>;

// Sum acc[0..WG) into acc[0] (a tree: fixed order). Every invocation calls it.
fn reduce(lid: u32) {
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        workgroupBarrier();
        if lid < s {
            acc[lid] = acc[lid] + acc[lid + s];
        }
    }
    workgroupBarrier();
}

// Neither NaN nor ±∞ (bits, since compilers may assume NaN away).
fn finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

@compute @workgroup_size(WG)
fn sumsq_partial(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = wid.x + wid.y * nwg.x;
    let base = w * CHUNK;
    var s = 0.0;
    for (var k = 0u; k < PER; k++) {
        let i = base + k * WG + lid;
        if i < params.n {
            let g = src[params.src_off + i];
            s = s + g * g;
        }
    }
    acc[lid] = s;
    reduce(lid);
    if lid == 0u && base < params.n {
        partials[params.dst + w] = acc[0];
    }
}

@compute @workgroup_size(WG)
fn sumsq_total(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var i = lid; i < params.n; i += WG) {
        s = s + partials[i];
    }
    acc[lid] = s;
    reduce(lid);
    if lid == 0u {
        let ss = acc[0];
        let nll = src[params.src_off];
        partials[params.dst] = ss;
        partials[params.dst + 1u] = select(0.0, 1.0, !finite(ss) || !finite(nll));
        partials[params.dst + 2u] = nll;
        partials[params.dst + 3u] = src[params.src_off + 1u];
    }
}
