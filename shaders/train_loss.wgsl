// The loss head's softmax cross-entropy (src/backend/gpu/train.rs), between
// the two products with the frozen output matrix (train_linear.wgsl):
//     logits (chunk, V) = h · Wᵀ  →  loss_rows  →  dx = dlogits · W
// - loss_rows: per token of the chunk with a target (< V), its NLL
//   lse − logit[target] and the logits turned in place into
//   dlogits = loss_scale·(softmax − onehot(target)); a token without a target
//   (u32::MAX) gets zero dlogits. stats[token] = (NLL, 1) or (0, 0).
//   One workgroup per token (linear id wid.x + wid.y * nwg.x).
// - loss_sum: one workgroup sums stats over every token, in a fixed order,
//   into loss = (Σ NLL, targets).

const WG: u32 = 64u;

struct Params {
    // loss_rows: tokens in the chunk; loss_sum: tokens in all.
    rows: u32,
    // Vocabulary: values per row of logits.
    vocab: u32,
    // loss_rows: index of the chunk's first token (in targets and stats).
    tok0: u32,
    // loss_rows: logits' first element; loss_sum: the loss's.
    out_off: u32,
}

// The values that change every step; loss_scale is read here.
struct Step {
    seed_lo: u32,
    seed_hi: u32,
    loss_scale: f32,
    _pad: u32,
}

// params: Params (16 bytes).
@group(0) @binding(0) var<uniform> params: Params;
// stats: (tokens, 2): written by loss_rows, read by loss_sum.
@group(0) @binding(1) var<storage, read_write> stats: array<f32>;
// loss_rows: logits (rows, vocab), turned into dlogits. loss_sum: loss (2).
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
// step: Step (16 bytes); loss_rows only.
@group(0) @binding(3) var<uniform> step: Step;
// targets: (tokens) u32, u32::MAX for none; loss_rows only.
@group(0) @binding(4) var<storage, read> targets: array<u32>;

var<workgroup> red: array<vec2<f32>, WG>;
var<workgroup> target_of_row: u32;

fn reduce_max(li: u32, v: f32) -> f32 {
    red[li].x = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if li < s {
            red[li].x = max(red[li].x, red[li + s].x);
        }
        workgroupBarrier();
    }
    let r = red[0].x;
    workgroupBarrier();
    return r;
}

fn reduce_sum(li: u32, v: vec2<f32>) -> vec2<f32> {
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
fn loss_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row = wid.x + wid.y * nwg.x;
    if row >= params.rows {
        return;
    }
    let tok = params.tok0 + row;
    if li == 0u {
        target_of_row = targets[tok];
    }
    // The same for every invocation, but read from storage: made uniform for
    // the barriers below.
    let tgt = workgroupUniformLoad(&target_of_row);
    let x0 = params.out_off + row * params.vocab;
    let v = params.vocab;
    if tgt >= v {
        for (var i = li; i < v; i += WG) {
            out[x0 + i] = 0.0;
        }
        if li == 0u {
            stats[2u * tok] = 0.0;
            stats[2u * tok + 1u] = 0.0;
        }
        return;
    }
    let xt = out[x0 + tgt];
    var m = -3.4e38;
    for (var i = li; i < v; i += WG) {
        m = max(m, out[x0 + i]);
    }
    m = reduce_max(li, m);
    var s = 0.0;
    for (var i = li; i < v; i += WG) {
        s += exp(out[x0 + i] - m);
    }
    let lse = m + log(reduce_sum(li, vec2<f32>(s, 0.0)).x);
    let scale = step.loss_scale;
    for (var i = li; i < v; i += WG) {
        var g = exp(out[x0 + i] - lse) * scale;
        if i == tgt {
            g -= scale;
        }
        out[x0 + i] = g;
    }
    if li == 0u {
        stats[2u * tok] = lse - xt;
        stats[2u * tok + 1u] = 1.0;
    }
}

@compute @workgroup_size(WG)
fn loss_sum(@builtin(local_invocation_index) li: u32) {
    var s = vec2<f32>(0.0);
    for (var i = li; i < params.rows; i += WG) {
        s += vec2<f32>(stats[2u * i], stats[2u * i + 1u]);
    }
    s = reduce_sum(li, s);
    if li == 0u {
        out[params.out_off] = s.x;
        out[params.out_off + 1u] = s.y;
    }
}
