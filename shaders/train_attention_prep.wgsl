// The first kernel of the attention backward (src/backend/gpu/train.rs):
// per (query r, head h), (lse, D = Σ_c dO·O) into the first two values of
// the (r, h) slot of dq, where attention_back_dkv and attention_back_dq
// (train_attention.wgsl) read them; dq overwrites them last.
//
// One invocation per (query, head), linear id (wid.x + wid.y * nwg.x) * WG + lid.

const WG: u32 = 64u;

struct Params {
    // (query, head) items: n_tok · n_head.
    n: u32,
    n_head: u32,
    head_dim: u32,
    o_off: u32,
    do_off: u32,
    lse_off: u32,
    dq_off: u32,
    _pad: u32,
}

// params: Params (32 bytes).
@group(0) @binding(0) var<uniform> params: Params;
// o, dO: (n_tok, n_head · d) read.
@group(0) @binding(1) var<storage, read_write> o: array<f32>;
@group(0) @binding(2) var<storage, read_write> d_o: array<f32>;
// lse: (n_tok, n_head) read.
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
// dq: (n_tok, n_head · d); values 0 and 1 of each (r, h) slot written.
@group(0) @binding(4) var<storage, read_write> dq: array<f32>;

@compute @workgroup_size(WG)
fn attention_back_prep(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if i >= params.n {
        return;
    }
    let slot = i * params.head_dim;
    var s = 0.0;
    for (var c = 0u; c < params.head_dim; c++) {
        s += d_o[params.do_off + slot + c] * o[params.o_off + slot + c];
    }
    dq[params.dq_off + slot] = lse[params.lse_off + i];
    dq[params.dq_off + slot + 1u] = s;
}
