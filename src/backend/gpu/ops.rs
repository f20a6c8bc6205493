//! The decoder's kernels other than matrix products: RMSNorm, RoPE, the KV
//! cache append, attention, gated activations, residual adds, softmax,
//! negative log-likelihood, argmax and sampling.
//!
//! Each function checks its shapes, compiles (once) its pipeline and returns
//! a `Dispatch` to record; none of them submits. Values that change every
//! step (the first position, the sampling draw) live in small uniform buffers
//! the host rewrites before each submission ([`StepParams`],
//! [`SampleParams`]), so a step's dispatches are recorded once and reused.
//! The shape of every binding is documented in the shaders.

use super::{Dispatch, GpuContext, groups_1d};
use crate::backend::cpu::attention::AttnShape;
use crate::model::{Activation, Rope, RopeKind};
use crate::{Error, Result};
use std::sync::Arc;
use wgpu::Buffer;

const NORM: &str = include_str!("../../../shaders/norm.wgsl");
const ROPE: &str = include_str!("../../../shaders/rope.wgsl");
const ATTENTION: &str = include_str!("../../../shaders/attention.wgsl");
const ELEMENTWISE: &str = include_str!("../../../shaders/elementwise.wgsl");
const SOFTMAX: &str = include_str!("../../../shaders/softmax.wgsl");
const SAMPLE: &str = include_str!("../../../shaders/sample.wgsl");

/// Invocations per workgroup of the one-element-per-invocation kernels
/// (`WG` of elementwise.wgsl and rope.wgsl).
const ELEMENT_WG: usize = 256;
/// Largest head dimension attention.wgsl handles (its `MAX_DIM`).
pub(crate) const MAX_HEAD_DIM: usize = 256;

/// Per-step values the host writes once before each submission (`pos0`
/// changes every generated token; the dispatches are recorded once and
/// reused). The kernels read `pos0` only; `n_tok` is for the host, the
/// kernels use the token count they were recorded with.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StepParams {
    /// Position of the first token of the step.
    pub pos0: u32,
    /// Tokens in the step.
    pub n_tok: u32,
    /// Padding to 16 bytes.
    pub _pad: [u32; 2],
}

/// Sampling parameters, written by the host before each submission.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SampleParams {
    /// Softmax temperature, > 0 (the host uses `argmax` for 0).
    pub temperature: f32,
    /// Keep the tokens whose logit is at least the `top_k`-th largest (`0`: all).
    pub top_k: u32,
    /// Nucleus mass to keep (`≥ 1`: all).
    pub top_p: f32,
    /// Uniform draw in `[0, 1)` from the host's random stream.
    pub u: f32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    rows: u32,
    n: u32,
    eps: f32,
    /// `add_rms_norm`: 1 to normalize the added rows first.
    post: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RopeParams {
    n_tok: u32,
    n_heads: u32,
    head_dim: u32,
    half: u32,
    halves: u32,
    /// `rope_kv` only.
    n_kv_heads: u32,
    _pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ElementParams {
    n: u32,
    _pad: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttnParams {
    n_tok: u32,
    n_head: u32,
    n_kv_head: u32,
    head_dim: u32,
    scale: f32,
    window: u32,
    _pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RowParams {
    rows: u32,
    n: u32,
    out_off: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct PickParams {
    off: u32,
    n: u32,
    _pad: [u32; 2],
}

fn pipeline(
    ctx: &GpuContext,
    key: &str,
    entry: &str,
    source: &'static str,
) -> Result<Arc<wgpu::ComputePipeline>> {
    ctx.pipeline(key, entry, || source.to_string())
}

/// `v` as a `u32` shader parameter.
fn to_u32(v: usize, op: &str, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Invalid(format!("{op}: {what} = {v} exceeds u32")))
}

/// `buf` holds at least `elems` 4-byte elements.
fn check_len(buf: &Buffer, elems: usize, op: &str, what: &str) -> Result<()> {
    let need = elems as u128 * 4;
    if (buf.size() as u128) < need {
        return Err(Error::Invalid(format!(
            "{op}: {what} has {} bytes, needs {need}",
            buf.size()
        )));
    }
    Ok(())
}

/// How a KV cache stores keys and values on the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvFormat {
    /// f32: exact, as the CPU backend.
    #[default]
    F32,
    /// f16 (devices with `shader-f16`): half the memory and bandwidth;
    /// each key and value rounded to 11 significant bits.
    F16,
}

impl KvFormat {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvFormat::F32 => 4,
            KvFormat::F16 => 2,
        }
    }
}

/// `elems` KV-cache elements fit in `buf`.
fn check_kv_len(buf: &Buffer, elems: usize, kv: KvFormat, op: &str, what: &str) -> Result<()> {
    let need = elems as u128 * kv.bytes() as u128;
    if (buf.size() as u128) < need {
        return Err(Error::Invalid(format!(
            "{op}: {what} has {} bytes, needs {need}",
            buf.size()
        )));
    }
    Ok(())
}

/// The pipeline of a kernel that reads or writes a KV cache: the shader's
/// `alias KV = f32;` turned into f16 (with `enable f16;`) for [`KvFormat::F16`].
fn kv_pipeline(
    ctx: &GpuContext,
    key: &str,
    entry: &str,
    source: &'static str,
    kv: KvFormat,
) -> Result<Arc<wgpu::ComputePipeline>> {
    match kv {
        KvFormat::F32 => pipeline(ctx, key, entry, source),
        KvFormat::F16 if !ctx.has_f16() => Err(Error::Gpu(format!(
            "an f16 KV cache needs shader-f16, which {} lacks (or was turned off)",
            ctx.adapter().name
        ))),
        KvFormat::F16 => ctx.pipeline(&format!("{key}-kv16"), entry, || {
            let f16 = source.replace("alias KV = f32;", "alias KV = f16;");
            assert_ne!(f16, source, "{key} declares its KV type");
            format!("enable f16;\n{f16}")
        }),
    }
}

/// Workgroups for `n` elements, one invocation each.
fn element_groups(n: usize, op: &str) -> Result<[u32; 3]> {
    Ok(groups_1d(to_u32(n.div_ceil(ELEMENT_WG), op, "workgroups")?))
}

fn norm_params(ctx: &GpuContext, rows: usize, n: usize, eps: f32) -> Result<Buffer> {
    norm_params_post(ctx, rows, n, eps, false)
}

fn norm_params_post(
    ctx: &GpuContext,
    rows: usize,
    n: usize,
    eps: f32,
    post: bool,
) -> Result<Buffer> {
    let op = "rms_norm";
    if n == 0 {
        return Err(Error::Invalid(format!("{op}: empty rows")));
    }
    to_u32(rows * n, op, "elements")?;
    let p = NormParams {
        rows: to_u32(rows, op, "rows")?,
        n: to_u32(n, op, "n")?,
        eps,
        post: u32::from(post),
    };
    Ok(ctx.uniform(&p, "rms_norm params"))
}

/// `y[r] = x[r] / √(mean(x[r]²) + eps) · w` for rows `r < rows` of length `n`
/// (`x` and `y` distinct buffers).
pub(crate) fn rms_norm(
    ctx: &GpuContext,
    x: &Buffer,
    w: &Buffer,
    y: &Buffer,
    rows: usize,
    n: usize,
    eps: f32,
) -> Result<Dispatch> {
    let params = norm_params(ctx, rows, n, eps)?;
    check_len(x, rows * n, "rms_norm", "x")?;
    check_len(y, rows * n, "rms_norm", "y")?;
    check_len(w, n, "rms_norm", "w")?;
    let p = pipeline(ctx, "ops/norm", "rms_norm", NORM)?;
    Ok(ctx.dispatch(
        &p,
        &[
            params.as_entire_binding(),
            w.as_entire_binding(),
            y.as_entire_binding(),
            x.as_entire_binding(),
        ],
        groups_1d(rows as u32),
    ))
}

/// [`rms_norm`] in place on `x` (per-head q/k norms with `n = head_dim`,
/// post-norms).
pub(crate) fn rms_norm_inplace(
    ctx: &GpuContext,
    x: &Buffer,
    w: &Buffer,
    rows: usize,
    n: usize,
    eps: f32,
) -> Result<Dispatch> {
    let params = norm_params(ctx, rows, n, eps)?;
    check_len(x, rows * n, "rms_norm_inplace", "x")?;
    check_len(w, n, "rms_norm_inplace", "w")?;
    let p = pipeline(ctx, "ops/norm", "rms_norm_inplace", NORM)?;
    Ok(ctx.dispatch(
        &p,
        &[
            params.as_entire_binding(),
            w.as_entire_binding(),
            x.as_entire_binding(),
        ],
        groups_1d(rows as u32),
    ))
}

/// The residual step of a block fused with the next norm, per row `r <
/// rows` of length `n`: `x[r] += post_w.map_or(y[r], |w2| rmsnorm(y[r])·w2)`,
/// then `h[r] = rmsnorm(x[r])·w`. One dispatch for what would be a post-norm,
/// an add and a norm.
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_rms_norm(
    ctx: &GpuContext,
    x: &Buffer,
    y: &Buffer,
    post_w: Option<&Buffer>,
    w: &Buffer,
    h: &Buffer,
    rows: usize,
    n: usize,
    eps: f32,
) -> Result<Dispatch> {
    let op = "add_rms_norm";
    let params = norm_params_post(ctx, rows, n, eps, post_w.is_some())?;
    check_len(x, rows * n, op, "x")?;
    check_len(y, rows * n, op, "y")?;
    check_len(h, rows * n, op, "h")?;
    check_len(w, n, op, "w")?;
    if let Some(w2) = post_w {
        check_len(w2, n, op, "post_w")?;
    }
    let p = pipeline(ctx, "ops/norm", op, NORM)?;
    Ok(ctx.dispatch(
        &p,
        &[
            params.as_entire_binding(),
            w.as_entire_binding(),
            x.as_entire_binding(),
            y.as_entire_binding(),
            h.as_entire_binding(),
            post_w.unwrap_or(w).as_entire_binding(),
        ],
        groups_1d(rows as u32),
    ))
}

/// The `(cos, sin)` table of [`rope`] for positions `0..positions`:
/// `[pos][i]` for `i < r.dims / 2`, interleaved as `cos, sin`, computed in
/// f64 exactly as [`crate::backend::cpu::ops::rope`] computes its angles.
pub(crate) fn rope_table(r: &Rope, positions: usize) -> Vec<f32> {
    let half = r.dims / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| (r.base as f64).powf(-2.0 * i as f64 / r.dims as f64))
        .collect();
    let mut table = Vec::with_capacity(positions * half * 2);
    for pos in 0..positions {
        for f in &inv_freq {
            let (sin, cos) = (pos as f64 * f).sin_cos();
            table.push(cos as f32);
            table.push(sin as f32);
        }
    }
    table
}

/// RoPE in place on `x` = `(n_tok, n_heads · head_dim)`; token `t` is at
/// position `step.pos0 + t`. Pairs `(2i, 2i+1)` ([`RopeKind::Adjacent`]) or
/// `(i, i + dims/2)` ([`RopeKind::Halves`]) for `i < dims/2`, rotated by the
/// `(cos, sin)` of `table` ([`rope_table`], covering every position used).
/// `step` is a uniform [`StepParams`].
#[allow(clippy::too_many_arguments)]
// Standalone op (the decoder uses the fused [`rope_kv`]); kept, with its
// tests, for graphs that rotate without caching.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn rope(
    ctx: &GpuContext,
    x: &Buffer,
    table: &Buffer,
    step: &Buffer,
    n_tok: usize,
    n_heads: usize,
    head_dim: usize,
    kind: RopeKind,
    dims: usize,
) -> Result<Dispatch> {
    let op = "rope";
    if dims > head_dim || !dims.is_multiple_of(2) {
        return Err(Error::Invalid(format!(
            "{op}: {dims} rotated dimensions for heads of {head_dim}"
        )));
    }
    let half = dims / 2;
    check_len(x, n_tok * n_heads * head_dim, op, "x")?;
    check_len(table, n_tok * half * 2, op, "table")?;
    let params = RopeParams {
        n_tok: to_u32(n_tok, op, "n_tok")?,
        n_heads: to_u32(n_heads, op, "n_heads")?,
        head_dim: to_u32(head_dim, op, "head_dim")?,
        half: half as u32,
        halves: u32::from(kind == RopeKind::Halves),
        n_kv_heads: 0,
        _pad: [0; 2],
    };
    let pairs = n_tok * n_heads * half;
    to_u32(n_tok * n_heads * head_dim, op, "elements")?;
    let params = ctx.uniform(&params, "rope params");
    let p = pipeline(ctx, "ops/rope", "rope", ROPE)?;
    Ok(ctx.dispatch(
        &p,
        &[
            params.as_entire_binding(),
            step.as_entire_binding(),
            table.as_entire_binding(),
            x.as_entire_binding(),
        ],
        element_groups(pairs, op)?,
    ))
}

/// The attention inputs of a step in one dispatch: [`rope`] on the queries
/// `q` = `(n_tok, n_head · head_dim)` in place, the keys `k` =
/// `(n_tok, n_kv_head · head_dim)` rotated the same way into `k_cache`, and
/// the values `v` copied into `v_cache`, at rows `step.pos0 + t` of the caches
/// (`(capacity, n_kv_head · head_dim)`). Replaces two `rope` and two
/// KV-cache append dispatches.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_kv(
    ctx: &GpuContext,
    q: &Buffer,
    k: &Buffer,
    v: &Buffer,
    k_cache: &Buffer,
    v_cache: &Buffer,
    table: &Buffer,
    step: &Buffer,
    n_tok: usize,
    heads: (usize, usize),
    head_dim: usize,
    kind: RopeKind,
    dims: usize,
    kv: KvFormat,
) -> Result<Dispatch> {
    let op = "rope_kv";
    let (n_head, n_kv_head) = heads;
    if dims > head_dim || !dims.is_multiple_of(2) || dims == 0 {
        return Err(Error::Invalid(format!(
            "{op}: {dims} rotated dimensions for heads of {head_dim}"
        )));
    }
    let half = dims / 2;
    let kv_n = n_tok * n_kv_head * head_dim;
    check_len(q, n_tok * n_head * head_dim, op, "q")?;
    check_len(k, kv_n, op, "k")?;
    check_len(v, kv_n, op, "v")?;
    check_kv_len(k_cache, kv_n, kv, op, "k_cache")?;
    check_kv_len(v_cache, kv_n, kv, op, "v_cache")?;
    check_len(table, n_tok * half * 2, op, "table")?;
    let total = n_tok * n_head * half + 2 * kv_n;
    to_u32(total, op, "invocations")?;
    let params = RopeParams {
        n_tok: to_u32(n_tok, op, "n_tok")?,
        n_heads: to_u32(n_head, op, "n_heads")?,
        head_dim: to_u32(head_dim, op, "head_dim")?,
        half: half as u32,
        halves: u32::from(kind == RopeKind::Halves),
        n_kv_heads: to_u32(n_kv_head, op, "n_kv_heads")?,
        _pad: [0; 2],
    };
    let params = ctx.uniform(&params, "rope_kv params");
    let p = kv_pipeline(ctx, "ops/rope", op, ROPE, kv)?;
    Ok(ctx.dispatch(
        &p,
        &[
            params.as_entire_binding(),
            step.as_entire_binding(),
            table.as_entire_binding(),
            q.as_entire_binding(),
            k.as_entire_binding(),
            v.as_entire_binding(),
            k_cache.as_entire_binding(),
            v_cache.as_entire_binding(),
        ],
        element_groups(total, op)?,
    ))
}

/// Causal attention with grouped key/value heads and an optional sliding
/// window over a KV cache, as [`crate::backend::cpu::attention::attention`]:
/// `q` is `(n_tok, n_head · head_dim)` for positions `step.pos0 + t`; `k` and
/// `v` are the caches, `(capacity, n_kv_head · head_dim)`, already holding
/// these tokens; `out` is `(n_tok, n_head · head_dim)`. An online softmax over
/// blocks of keys: any number of keys, `head_dim ≤ 256`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    ctx: &GpuContext,
    q: &Buffer,
    k: &Buffer,
    v: &Buffer,
    out: &Buffer,
    step: &Buffer,
    shape: &AttnShape,
    n_tok: usize,
    kv: KvFormat,
) -> Result<Dispatch> {
    let op = "attention";
    let s = shape;
    if s.head_dim == 0 || s.head_dim > MAX_HEAD_DIM {
        return Err(Error::Invalid(format!(
            "{op}: head_dim {} is outside 1..={MAX_HEAD_DIM}",
            s.head_dim
        )));
    }
    if s.n_kv_head == 0 || !s.n_head.is_multiple_of(s.n_kv_head) {
        return Err(Error::Invalid(format!(
            "{op}: {} query heads do not group over {} kv heads",
            s.n_head, s.n_kv_head
        )));
    }
    let q_len = n_tok * s.n_head * s.head_dim;
    check_len(q, q_len, op, "q")?;
    check_len(out, q_len, op, "out")?;
    check_kv_len(k, n_tok * s.n_kv_head * s.head_dim, kv, op, "k")?;
    check_kv_len(v, n_tok * s.n_kv_head * s.head_dim, kv, op, "v")?;
    to_u32(q_len, op, "elements")?;
    let window = match s.window {
        None => 0,
        Some(0) => return Err(Error::Invalid(format!("{op}: a window of 0 keys"))),
        Some(w) => to_u32(w, op, "window")?,
    };
    let params = AttnParams {
        n_tok: n_tok as u32,
        n_head: s.n_head as u32,
        n_kv_head: s.n_kv_head as u32,
        head_dim: s.head_dim as u32,
        scale: s.scale,
        window,
        _pad: [0; 2],
    };
    let params = ctx.uniform(&params, "attention params");
    let p = kv_pipeline(ctx, "ops/attention", "attention", ATTENTION, kv)?;
    Ok(ctx.dispatch(
        &p,
        &[
            params.as_entire_binding(),
            step.as_entire_binding(),
            q.as_entire_binding(),
            k.as_entire_binding(),
            v.as_entire_binding(),
            out.as_entire_binding(),
        ],
        groups_1d(to_u32(n_tok * s.n_head, op, "workgroups")?),
    ))
}

/// A kernel of elementwise.wgsl over `a` (written) and `b` (read), `n` elements.
fn binary(ctx: &GpuContext, entry: &str, a: &Buffer, b: &Buffer, n: usize) -> Result<Dispatch> {
    check_len(a, n, entry, "the written operand")?;
    check_len(b, n, entry, "the read operand")?;
    let params = ElementParams {
        n: to_u32(n, entry, "n")?,
        _pad: [0; 3],
    };
    let params = ctx.uniform(&params, entry);
    let p = pipeline(ctx, "ops/elementwise", entry, ELEMENTWISE)?;
    Ok(ctx.dispatch(
        &p,
        &[
            params.as_entire_binding(),
            a.as_entire_binding(),
            b.as_entire_binding(),
        ],
        element_groups(n, entry)?,
    ))
}

/// `gate[i] = act(gate[i]) · up[i]` for `i < n` (GELU with the tanh
/// approximation, as the CPU).
pub(crate) fn gated_activation(
    ctx: &GpuContext,
    gate: &Buffer,
    up: &Buffer,
    n: usize,
    act: Activation,
) -> Result<Dispatch> {
    let entry = match act {
        Activation::Silu => "silu_mul",
        Activation::GeluTanh => "gelu_tanh_mul",
    };
    binary(ctx, entry, gate, up, n)
}

/// `x[i] += y[i]` for `i < n`.
// Standalone op (the decoder fuses its adds into [`add_rms_norm`]).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn add(ctx: &GpuContext, x: &Buffer, y: &Buffer, n: usize) -> Result<Dispatch> {
    binary(ctx, "add", x, y, n)
}

fn row_params(ctx: &GpuContext, op: &str, rows: usize, n: usize, out_off: usize) -> Result<Buffer> {
    if n == 0 {
        return Err(Error::Invalid(format!("{op}: empty rows")));
    }
    to_u32(rows * n, op, "elements")?;
    let p = RowParams {
        rows: rows as u32,
        n: n as u32,
        out_off: to_u32(out_off, op, "out_off")?,
        _pad: 0,
    };
    Ok(ctx.uniform(&p, op))
}

/// Softmax in place over `rows` rows of length `n`.
// Not called by inference; kept for training's backward pass.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn softmax(ctx: &GpuContext, x: &Buffer, rows: usize, n: usize) -> Result<Dispatch> {
    let params = row_params(ctx, "softmax", rows, n, 0)?;
    check_len(x, rows * n, "softmax", "x")?;
    let p = pipeline(ctx, "ops/softmax", "softmax", SOFTMAX)?;
    Ok(ctx.dispatch(
        &p,
        &[params.as_entire_binding(), x.as_entire_binding()],
        groups_1d(rows as u32),
    ))
}

/// `out[out_off + r] = logsumexp(logits[r]) − logits[r][targets[out_off + r]]`
/// for `r < rows`: the negative log-likelihood of each row's target. `logits`
/// is `(rows, n_vocab)` from element 0 (one chunk of a longer pass);
/// `targets` (`u32`) and `out` are indexed by position in the whole pass.
pub(crate) fn nll(
    ctx: &GpuContext,
    logits: &Buffer,
    targets: &Buffer,
    out: &Buffer,
    out_off: usize,
    rows: usize,
    n_vocab: usize,
) -> Result<Dispatch> {
    let op = "nll";
    let params = row_params(ctx, op, rows, n_vocab, out_off)?;
    check_len(logits, rows * n_vocab, op, "logits")?;
    check_len(targets, out_off + rows, op, "targets")?;
    check_len(out, out_off + rows, op, "out")?;
    let p = pipeline(ctx, "ops/softmax", "nll", SOFTMAX)?;
    Ok(ctx.dispatch(
        &p,
        &[
            params.as_entire_binding(),
            out.as_entire_binding(),
            logits.as_entire_binding(),
            targets.as_entire_binding(),
        ],
        groups_1d(rows as u32),
    ))
}

fn pick_params(
    ctx: &GpuContext,
    op: &str,
    logits: &Buffer,
    off: usize,
    n: usize,
    out_token: &Buffer,
) -> Result<Buffer> {
    if n == 0 {
        return Err(Error::Invalid(format!("{op}: no logits")));
    }
    check_len(logits, off + n, op, "logits")?;
    check_len(out_token, 1, op, "out_token")?;
    let p = PickParams {
        off: to_u32(off, op, "off")?,
        n: to_u32(n, op, "n")?,
        _pad: [0; 2],
    };
    to_u32(off + n, op, "off + n")?;
    Ok(ctx.uniform(&p, op))
}

/// `out_token[0]` (a `u32` buffer) = the index of the largest of
/// `logits[off .. off + n]` (the first on ties).
pub(crate) fn argmax(
    ctx: &GpuContext,
    logits: &Buffer,
    off: usize,
    n: usize,
    out_token: &Buffer,
) -> Result<Dispatch> {
    let params = pick_params(ctx, "argmax", logits, off, n, out_token)?;
    let p = pipeline(ctx, "ops/sample", "argmax", SAMPLE)?;
    Ok(ctx.dispatch(
        &p,
        &[
            params.as_entire_binding(),
            logits.as_entire_binding(),
            out_token.as_entire_binding(),
        ],
        [1, 1, 1],
    ))
}

/// `out_token[0]` (a `u32` buffer) = a token drawn from
/// `softmax(logits[off .. off + n] / temperature)` restricted to the top-k
/// and then to the nucleus, by the threshold algorithm of
/// [`sample_reference`]. `params` is a uniform [`SampleParams`] (positive
/// temperature). One workgroup; no sort of the vocabulary: the top-k
/// threshold is a radix select (four passes over the row), and when at most
/// 1024 tokens reach it the rest runs on those alone in workgroup memory
/// (see sample.wgsl).
pub(crate) fn sample(
    ctx: &GpuContext,
    logits: &Buffer,
    off: usize,
    n: usize,
    params: &Buffer,
    out_token: &Buffer,
) -> Result<Dispatch> {
    let pick = pick_params(ctx, "sample", logits, off, n, out_token)?;
    let p = pipeline(ctx, "ops/sample", "sample", SAMPLE)?;
    Ok(ctx.dispatch(
        &p,
        &[
            pick.as_entire_binding(),
            logits.as_entire_binding(),
            out_token.as_entire_binding(),
            params.as_entire_binding(),
        ],
        [1, 1, 1],
    ))
}

/// The CPU definition of what `sample` draws (in f64):
///
/// 1. `m` = the largest logit; weights `w_i = exp((l_i − m) / temperature)`.
/// 2. Top-k: keep the logits ≥ the `top_k`-th largest (all when `top_k` is
///    0 or ≥ n; ties at the boundary are all kept).
/// 3. Top-p (when `top_p < 1`): of those, keep the logits ≥ `t`, the largest
///    logit value whose kept mass `Σ{w_i : l_i ≥ t}` is at least `top_p` of
///    the step-2 mass.
/// 4. Inverse CDF in vocabulary-index order: the first kept index whose
///    running sum of weights exceeds `u ·` (kept mass); the last kept index
///    if rounding leaves none.
///
/// Logits are compared in IEEE total order ([`f32::total_cmp`]). Because the
/// draw walks the kept tokens in index order, not in order of probability,
/// a given `u` (and so a given seed) does not pick the same token as the CPU
/// sampler ([`crate::infer::Sampler`]), which walks them sorted; the
/// distribution is the same.
pub fn sample_reference(logits: &[f32], p: &SampleParams) -> u32 {
    if logits.is_empty() {
        return 0;
    }
    let (t, weight) = reference_threshold(logits, p);
    let kept = |x: f32| x.total_cmp(&t).is_ge();
    let total: f64 = logits
        .iter()
        .filter(|&&x| kept(x))
        .map(|&x| weight(x))
        .sum();
    let r = p.u as f64 * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &x) in logits.iter().enumerate() {
        if kept(x) {
            acc += weight(x);
            last = i;
            if acc > r {
                return i as u32;
            }
        }
    }
    last as u32
}

/// Steps 1–3 of [`sample_reference`] on a non-empty row: the smallest kept
/// logit and the weight function.
fn reference_threshold(logits: &[f32], p: &SampleParams) -> (f32, impl Fn(f32) -> f64) {
    let n = logits.len();
    let mut sorted = logits.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let m = sorted[0] as f64;
    let temp = p.temperature as f64;
    let weight = move |x: f32| ((x as f64 - m) / temp).exp();
    let k = p.top_k as usize;
    let mut t = if k > 0 && k < n {
        sorted[k - 1]
    } else {
        sorted[n - 1]
    };
    if p.top_p < 1.0 {
        let kept = sorted
            .iter()
            .take_while(|x| x.total_cmp(&t).is_ge())
            .count();
        let cands = &sorted[..kept];
        let want = p.top_p as f64 * cands.iter().map(|&x| weight(x)).sum::<f64>();
        let mut acc = 0.0;
        for (i, &x) in cands.iter().enumerate() {
            acc += weight(x);
            let group_end = cands.get(i + 1).is_none_or(|y| y.total_cmp(&x).is_ne());
            if group_end && acc >= want {
                t = x;
                break;
            }
        }
    }
    (t, weight)
}

#[cfg(test)]
#[path = "ops_tests.rs"]
mod tests;
