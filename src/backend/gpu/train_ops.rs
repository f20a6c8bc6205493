//! The element-wise training ops, dropout, RMSNorm, RoPE and attention on
//! the GPU (a part of [`super`]: the same conventions, operands and
//! helpers; the CPU oracle is `backend::cpu::train::{ops, attention}`).

use super::{ELEMENT_WG, View, bind, check_len, groups, nonempty, plain, to_u32};
use crate::backend::gpu::{Dispatch, GpuContext, groups_1d};
use crate::graph::AttnGeom;
use crate::model::{Activation, Rope, RopeKind};
use crate::{Error, Result};
use wgpu::Buffer;

const ELEMENTWISE: &str = include_str!("../../../shaders/train_elementwise.wgsl");
const DROPOUT: &str = include_str!("../../../shaders/train_dropout.wgsl");
const NORM: &str = include_str!("../../../shaders/train_norm.wgsl");
const ROPE: &str = include_str!("../../../shaders/train_rope.wgsl");
const ATTENTION: &str = include_str!("../../../shaders/train_attention.wgsl");
const ATTENTION_PREP: &str = include_str!("../../../shaders/train_attention_prep.wgsl");

/// Invocations per workgroup of train_attention_prep.wgsl.
const PREP_WG: usize = 64;
/// Largest head dimension of train_attention.wgsl (its `MAX_DIM`).
pub const MAX_HEAD_DIM: usize = 256;

// ---- parameters of the shaders (their `Params`) ----------------------------

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ElementParams {
    n: u32,
    offs: [u32; 5],
    alpha: f32,
    beta: f32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct DropoutParams {
    n: u32,
    x_off: u32,
    y_off: u32,
    site: u32,
    p: f32,
    keep: f32,
    _pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    groups: u32,
    n: u32,
    eps: f32,
    offs: [u32; 3],
    _pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RopeParams {
    n: u32,
    row: u32,
    head_dim: u32,
    half: u32,
    halves: u32,
    sign: f32,
    x_off: u32,
    y_off: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttnParams {
    n_tok: u32,
    seq: u32,
    n_head: u32,
    n_kv_head: u32,
    head_dim: u32,
    scale: f32,
    window: u32,
    /// q, k, v, then bindings 5 … 8.
    offs: [u32; 7],
    /// Virtual tokens at the start of each row ([`AttnGeom::sink`]).
    sink: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct PrepParams {
    n: u32,
    n_head: u32,
    head_dim: u32,
    offs: [u32; 4],
    _pad: u32,
}

const _: () = assert!(
    size_of::<ElementParams>() == 32
        && size_of::<DropoutParams>() == 32
        && size_of::<NormParams>() == 32
        && size_of::<RopeParams>() == 32
        && size_of::<AttnParams>() == 64
        && size_of::<PrepParams>() == 32
);

// ---- element-wise ------------------------------------------------------------

/// An entry of train_elementwise.wgsl over `n` elements with operands
/// `views` bound at 1, 2, … .
fn elementwise(
    ctx: &GpuContext,
    op: &str,
    entry: &str,
    n: usize,
    views: &[View],
    (alpha, beta): (f32, f32),
) -> Result<Dispatch> {
    nonempty(n, op)?;
    let mut offs = [0u32; 5];
    let mut bindings = Vec::with_capacity(views.len() + 1);
    for (i, v) in views.iter().enumerate() {
        let (b, off) = bind(ctx, *v, n, op, "operand")?;
        offs[i] = off;
        bindings.push(b);
    }
    let params = ElementParams {
        n: to_u32(n, op, "elements")?,
        offs,
        alpha,
        beta,
    };
    let u = ctx.uniform(&params, "elementwise params");
    bindings.insert(0, u.as_entire_binding());
    let p = plain(ctx, "train/elementwise", entry, ELEMENTWISE)?;
    Ok(ctx.dispatch(&p, &bindings, groups(n, ELEMENT_WG, op)?))
}

/// `y = a + b` over `n` elements ([`crate::graph::Op::Add`]).
pub(crate) fn add(ctx: &GpuContext, a: View, b: View, y: View, n: usize) -> Result<Dispatch> {
    elementwise(ctx, "add", "axpby", n, &[a, b, y], (1.0, 1.0))
}

/// `y = a + s·b` over `n` elements ([`crate::graph::Op::AddScaled`]).
pub(crate) fn add_scaled(
    ctx: &GpuContext,
    a: View,
    b: View,
    s: f32,
    y: View,
    n: usize,
) -> Result<Dispatch> {
    elementwise(ctx, "add_scaled", "axpby", n, &[a, b, y], (1.0, s))
}

/// `y = s·x` over `n` elements ([`crate::graph::Op::Scale`]).
pub(crate) fn scale(ctx: &GpuContext, x: View, s: f32, y: View, n: usize) -> Result<Dispatch> {
    elementwise(ctx, "scale", "axpby", n, &[x, x, y], (s, 0.0))
}

fn act_name(act: Activation) -> &'static str {
    match act {
        Activation::Silu => "silu",
        Activation::GeluTanh => "gelu",
    }
}

/// `h = act(g)·u` over `n` elements ([`crate::graph::Op::Gated`]).
pub(crate) fn gated(
    ctx: &GpuContext,
    g: View,
    u: View,
    h: View,
    n: usize,
    act: Activation,
) -> Result<Dispatch> {
    let entry = format!("gated_{}", act_name(act));
    elementwise(ctx, "gated", &entry, n, &[g, u, h], (0.0, 0.0))
}

/// `dg = dh·u·act'(g)`, `du = dh·act(g)` ([`crate::graph::Op::GatedBack`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gated_back(
    ctx: &GpuContext,
    g: View,
    u: View,
    dh: View,
    dg: View,
    du: View,
    n: usize,
    act: Activation,
) -> Result<Dispatch> {
    let entry = format!("gated_back_{}", act_name(act));
    elementwise(
        ctx,
        "gated_back",
        &entry,
        n,
        &[g, u, dh, dg, du],
        (0.0, 0.0),
    )
}

/// Inverted dropout of `n` elements ([`crate::graph::Op::Dropout`], its
/// own backward): `y = x / (1 − p)` where the mask of (step seed, `site`,
/// index) keeps, else 0 — the CPU's mask bit for bit. `step` is a
/// [`super::TrainStepParams`] uniform.
pub(crate) fn dropout(
    ctx: &GpuContext,
    x: View,
    y: View,
    n: usize,
    p: f32,
    site: u32,
    step: &Buffer,
) -> Result<Dispatch> {
    let op = "dropout";
    nonempty(n, op)?;
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Invalid(format!(
            "{op}: probability {p} is not in [0, 1)"
        )));
    }
    let (xb, x_off) = bind(ctx, x, n, op, "x")?;
    let (yb, y_off) = bind(ctx, y, n, op, "y")?;
    let params = DropoutParams {
        n: to_u32(n, op, "elements")?,
        x_off,
        y_off,
        site,
        p,
        keep: 1.0 / (1.0 - p),
        _pad: [0; 2],
    };
    let u = ctx.uniform(&params, "dropout params");
    let pl = plain(ctx, "train/dropout", op, DROPOUT)?;
    Ok(ctx.dispatch(
        &pl,
        &[u.as_entire_binding(), step.as_entire_binding(), xb, yb],
        groups(n, ELEMENT_WG, op)?,
    ))
}

// ---- RMSNorm -------------------------------------------------------------------

/// `y = x / √(mean(x²) + eps) · w` over each of `groups` groups of
/// `n = len(w)` values ([`crate::graph::Op::RmsNorm`]; per-head norms have
/// `groups = tokens · heads`).
pub(crate) fn rms_norm(
    ctx: &GpuContext,
    x: View,
    w: &Buffer,
    y: View,
    groups_n: (usize, usize),
    eps: f32,
) -> Result<Dispatch> {
    let op = "rms_norm";
    let (g, n) = groups_n;
    nonempty(g * n, op)?;
    check_len(w, n, op, "w")?;
    let (xb, x_off) = bind(ctx, x, g * n, op, "x")?;
    let (yb, y_off) = bind(ctx, y, g * n, op, "y")?;
    let params = NormParams {
        groups: to_u32(g, op, "groups")?,
        n: to_u32(n, op, "n")?,
        eps,
        offs: [x_off, y_off, 0],
        _pad: [0; 2],
    };
    let u = ctx.uniform(&params, "rms_norm params");
    let p = plain(ctx, "train/norm", op, NORM)?;
    Ok(ctx.dispatch(
        &p,
        &[u.as_entire_binding(), w.as_entire_binding(), xb, yb],
        groups_1d(to_u32(g, op, "groups")?),
    ))
}

/// `dx` of [`rms_norm`] from `x` and `dy` ([`crate::graph::Op::RmsNormBack`]).
pub(crate) fn rms_norm_back(
    ctx: &GpuContext,
    x: View,
    dy: View,
    w: &Buffer,
    dx: View,
    groups_n: (usize, usize),
    eps: f32,
) -> Result<Dispatch> {
    let op = "rms_norm_back";
    let (g, n) = groups_n;
    nonempty(g * n, op)?;
    check_len(w, n, op, "w")?;
    let (xb, x_off) = bind(ctx, x, g * n, op, "x")?;
    let (db, dy_off) = bind(ctx, dy, g * n, op, "dy")?;
    let (ob, dx_off) = bind(ctx, dx, g * n, op, "dx")?;
    let params = NormParams {
        groups: to_u32(g, op, "groups")?,
        n: to_u32(n, op, "n")?,
        eps,
        offs: [x_off, dy_off, dx_off],
        _pad: [0; 2],
    };
    let u = ctx.uniform(&params, "rms_norm_back params");
    let p = plain(ctx, "train/norm", op, NORM)?;
    Ok(ctx.dispatch(
        &p,
        &[u.as_entire_binding(), w.as_entire_binding(), xb, db, ob],
        groups_1d(to_u32(g, op, "groups")?),
    ))
}

// ---- RoPE ------------------------------------------------------------------------

/// The RoPE table for positions `0..max_pos` as the shader reads it:
/// the CPU's [`crate::backend::cpu::train::ops::rope_table`] flattened to
/// `cos, sin` pairs.
pub fn rope_table(r: &Rope, max_pos: usize) -> Vec<f32> {
    crate::backend::cpu::train::ops::rope_table(r, max_pos)
        .into_iter()
        .flat_map(|(c, s)| [c, s])
        .collect()
}

/// RoPE of `x (n_tok, heads · head_dim)` into `y` at each token's position
/// (`positions`: u32 buffer of `n_tok`, each below the table's positions),
/// rotating by `+θ` (`sign` 1, [`crate::graph::Op::Rope`]) or `−θ`
/// (`sign` −1, [`crate::graph::Op::RopeBack`]). `table` is [`rope_table`] of
/// `r`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope(
    ctx: &GpuContext,
    x: View,
    y: View,
    positions: &Buffer,
    table: &Buffer,
    (n_tok, heads, head_dim): (usize, usize, usize),
    r: &Rope,
    sign: f32,
) -> Result<Dispatch> {
    let op = "rope";
    let n = n_tok * heads * head_dim;
    nonempty(n, op)?;
    if r.dims > head_dim || !r.dims.is_multiple_of(2) || r.dims == 0 {
        return Err(Error::Invalid(format!(
            "{op}: {} rotated dimensions for heads of {head_dim}",
            r.dims
        )));
    }
    check_len(positions, n_tok, op, "positions")?;
    check_len(table, r.dims, op, "table")?;
    let (xb, x_off) = bind(ctx, x, n, op, "x")?;
    let (yb, y_off) = bind(ctx, y, n, op, "y")?;
    let params = RopeParams {
        n: to_u32(n, op, "elements")?,
        row: (heads * head_dim) as u32,
        head_dim: head_dim as u32,
        half: (r.dims / 2) as u32,
        halves: u32::from(r.kind == RopeKind::Halves),
        sign,
        x_off,
        y_off,
    };
    let u = ctx.uniform(&params, "rope params");
    let p = plain(ctx, "train/rope", op, ROPE)?;
    Ok(ctx.dispatch(
        &p,
        &[
            u.as_entire_binding(),
            table.as_entire_binding(),
            positions.as_entire_binding(),
            xb,
            yb,
        ],
        groups(n, ELEMENT_WG, op)?,
    ))
}

// ---- attention -------------------------------------------------------------

/// How the tokens of a step are laid out: `batch` rows of `seq` tokens, and
/// the u32 buffer of each token's segment start (index in its row of the
/// first key it may see).
#[derive(Clone, Copy, Debug)]
pub struct PackedRows<'a> {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// `batch · seq` u32: per token, its segment's first index in the row.
    pub seg_start: &'a Buffer,
}

fn attn_params(op: &str, rows: &PackedRows, geom: &AttnGeom, offs: [u32; 7]) -> Result<AttnParams> {
    let d = geom.head_dim;
    if !(2..=MAX_HEAD_DIM).contains(&d) {
        return Err(Error::Invalid(format!(
            "{op}: head dimension {d} is outside 2..={MAX_HEAD_DIM}"
        )));
    }
    if geom.n_kv_head == 0 || !geom.n_head.is_multiple_of(geom.n_kv_head) {
        return Err(Error::Invalid(format!(
            "{op}: {} query heads over {} key/value heads",
            geom.n_head, geom.n_kv_head
        )));
    }
    check_len(rows.seg_start, rows.batch * rows.seq, op, "seg_start")?;
    Ok(AttnParams {
        n_tok: to_u32(rows.batch * rows.seq, op, "tokens")?,
        seq: to_u32(rows.seq, op, "seq")?,
        n_head: to_u32(geom.n_head, op, "heads")?,
        n_kv_head: to_u32(geom.n_kv_head, op, "kv heads")?,
        head_dim: d as u32,
        scale: geom.scale,
        // A window of 0 still shows each query itself (the CPU's lo.min(t)).
        window: geom
            .window
            .map_or(u32::MAX, |w| w.clamp(1, u32::MAX as usize - 1) as u32),
        offs,
        sink: to_u32(geom.sink, op, "sink")?,
        _pad: 0,
    })
}

/// Causal attention over packed rows ([`crate::graph::Op::Attention`]):
/// `o (N, H·d)` and `lse (N, H)` from `q (N, H·d)`, `k`, `v (N, Hkv·d)`, one
/// workgroup per (query, head) with an online softmax over blocks of keys.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_forward(
    ctx: &GpuContext,
    q: View,
    k: View,
    v: View,
    o: View,
    lse: View,
    rows: &PackedRows,
    geom: &AttnGeom,
) -> Result<Dispatch> {
    let op = "attention";
    let n = rows.batch * rows.seq;
    nonempty(n, op)?;
    let (qd, kvd) = (geom.n_head * geom.head_dim, geom.n_kv_head * geom.head_dim);
    let (qb, q_off) = bind(ctx, q, n * qd, op, "q")?;
    let (kb, k_off) = bind(ctx, k, n * kvd, op, "k")?;
    let (vb, v_off) = bind(ctx, v, n * kvd, op, "v")?;
    let (ob, o_off) = bind(ctx, o, n * qd, op, "o")?;
    let (lb, l_off) = bind(ctx, lse, n * geom.n_head, op, "lse")?;
    let params = attn_params(op, rows, geom, [q_off, k_off, v_off, o_off, l_off, 0, 0])?;
    let u = ctx.uniform(&params, "attention params");
    let p = plain(ctx, "train/attention", op, ATTENTION)?;
    Ok(ctx.dispatch(
        &p,
        &[
            u.as_entire_binding(),
            rows.seg_start.as_entire_binding(),
            qb,
            kb,
            vb,
            ob,
            lb,
        ],
        groups_1d(to_u32(n * geom.n_head, op, "items")?),
    ))
}

/// The forward's saved tensors, read by `attention_backward`.
#[derive(Clone, Copy, Debug)]
pub struct AttnSavedViews<'a> {
    /// Queries (after RoPE), `(N, H·d)`.
    pub q: View<'a>,
    /// Keys (after RoPE), `(N, Hkv·d)`.
    pub k: View<'a>,
    /// Values, `(N, Hkv·d)`.
    pub v: View<'a>,
    /// Forward output, `(N, H·d)`.
    pub o: View<'a>,
    /// Forward log-sum-exp, `(N, H)`.
    pub lse: View<'a>,
}

/// `dq`, `dk`, `dv` from `d_o` ([`crate::graph::Op::AttentionBack`]), three
/// dispatches: (lse, D = rowsum(dO ⊙ O)) into each (query, head) slot of
/// `dq`; dk and dv per (key, kv head), looping over the queries that see
/// the key; dq per (query, head). Probabilities are recomputed from lse.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    ctx: &GpuContext,
    s: &AttnSavedViews,
    d_o: View,
    dq: View,
    dk: View,
    dv: View,
    rows: &PackedRows,
    geom: &AttnGeom,
) -> Result<Vec<Dispatch>> {
    let op = "attention_back";
    let n = rows.batch * rows.seq;
    nonempty(n, op)?;
    let (qd, kvd) = (geom.n_head * geom.head_dim, geom.n_kv_head * geom.head_dim);
    let (qb, q_off) = bind(ctx, s.q, n * qd, op, "q")?;
    let (kb, k_off) = bind(ctx, s.k, n * kvd, op, "k")?;
    let (vb, v_off) = bind(ctx, s.v, n * kvd, op, "v")?;
    let (ob, o_off) = bind(ctx, s.o, n * qd, op, "o")?;
    let (lb, l_off) = bind(ctx, s.lse, n * geom.n_head, op, "lse")?;
    let (dob, do_off) = bind(ctx, d_o, n * qd, op, "dO")?;
    let (dqb, dq_off) = bind(ctx, dq, n * qd, op, "dq")?;
    let (dkb, dk_off) = bind(ctx, dk, n * kvd, op, "dk")?;
    let (dvb, dv_off) = bind(ctx, dv, n * kvd, op, "dv")?;
    let params = attn_params(
        op,
        rows,
        geom,
        [q_off, k_off, v_off, do_off, dq_off, dk_off, dv_off],
    )?;
    let items = n * geom.n_head;
    let prep = PrepParams {
        n: to_u32(items, op, "items")?,
        n_head: geom.n_head as u32,
        head_dim: geom.head_dim as u32,
        offs: [o_off, do_off, l_off, dq_off],
        _pad: 0,
    };
    let pu = ctx.uniform(&prep, "attention prep params");
    let u = ctx.uniform(&params, "attention_back params");
    let pp = plain(
        ctx,
        "train/attention_prep",
        "attention_back_prep",
        ATTENTION_PREP,
    )?;
    let pkv = plain(ctx, "train/attention", "attention_back_dkv", ATTENTION)?;
    let pq = plain(ctx, "train/attention", "attention_back_dq", ATTENTION)?;
    let common = [
        u.as_entire_binding(),
        rows.seg_start.as_entire_binding(),
        qb,
        kb,
        vb,
        dob.clone(),
        dqb.clone(),
    ];
    let mut with_dkv = common.to_vec();
    with_dkv.extend([dkb, dvb]);
    Ok(vec![
        ctx.dispatch(
            &pp,
            &[pu.as_entire_binding(), ob, dob, lb, dqb],
            groups(items, PREP_WG, op)?,
        ),
        ctx.dispatch(
            &pkv,
            &with_dkv,
            groups_1d(to_u32(n * geom.n_kv_head, op, "items")?),
        ),
        ctx.dispatch(&pq, &common, groups_1d(to_u32(items, op, "items")?)),
    ])
}
