//! The training ops on the GPU, one function per op of [`crate::graph::Op`]
//! (forward beside backward), each checking its shapes, compiling (once) its
//! pipeline and returning the dispatches to record; none submits. The CPU
//! training kernels (`backend::cpu::train`) are the oracle (`train_tests.rs`);
//! [`super::GpuStep`] records a whole planned step from them.
//!
//! This file holds the operands ([`View`], [`QuantMatrix`]), the per-step
//! uniforms, the products (with a frozen quantized weight, and the f32 LoRA
//! products), the embedding gather, the loss head and the optimizer (the
//! global gradient norm and AdamW, with [`GpuOptim`] and [`GpuStepReport`],
//! the inputs and outputs of a resident step: [`super::GpuStep::train_step`]);
//! `train_ops.rs` the element-wise ops, dropout, RMSNorm, RoPE and attention.
//!
//! Operands are [`View`]s: f32 values of a storage buffer from an element
//! offset, so that every tensor of a step can live in one arena buffer. Each
//! view is bound as a window of its buffer (the offset rounded down to the
//! device's storage offset alignment, the length the op reads or writes) and
//! the shader gets the rest of the offset in its parameters: the planner's
//! offsets need no particular alignment, and the arena may exceed the
//! binding limit as long as each tensor fits in one binding. Every f32
//! binding of these kernels is `read_write`, because wgpu refuses a buffer
//! bound both read-only and writable in one dispatch (a usage conflict),
//! and inputs and outputs are windows of the same arena.
//!
//! Frozen weights are [`QuantMatrix`] views of their GGUF blocks, split by
//! rows into parts as [`super::GpuWeight`] uploads them
//! ([`super::GpuWeight::quant_matrix`]).

#[path = "train_ops.rs"]
mod ops;
#[path = "train_peft.rs"]
pub(crate) mod peft;

pub use ops::{AttnSavedViews, MAX_HEAD_DIM, PackedRows, rope_table};
pub(crate) use ops::{
    add, add_scaled, attention_backward, attention_forward, dropout, gated, gated_back, rms_norm,
    rms_norm_back, rope, scale,
};

use super::{Dispatch, GpuContext, groups_1d};
use crate::quant::GgmlType;
use crate::train::optim::AdamWConfig;
use crate::{Error, Result};
use wgpu::Buffer;

const QUANT: &str = include_str!("../../../shaders/quant.wgsl");
const LINEAR: &str = include_str!("../../../shaders/train_linear.wgsl");
const EMBED: &str = include_str!("../../../shaders/train_embed.wgsl");
const MATMUL: &str = include_str!("../../../shaders/train_matmul.wgsl");
const ADAMW: &str = include_str!("../../../shaders/train_adamw.wgsl");
const GRAD_NORM: &str = include_str!("../../../shaders/train_grad_norm.wgsl");
const LOSS: &str = include_str!("../../../shaders/train_loss.wgsl");

/// Tokens × outputs of one workgroup of train_linear.wgsl.
const LINEAR_TILE: usize = 64;
/// Invocations per workgroup of the one-element-per-invocation kernels.
const ELEMENT_WG: usize = 256;
/// Invocations per workgroup of train_matmul.wgsl (4 × 4 outputs each).
const PRODUCT_WG: usize = 64;

/// `len` f32 of a storage buffer from element `offset`: an operand of the
/// training kernels (a tensor of the arena, a parameter, a scratch).
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    /// The buffer (with `STORAGE` usage).
    pub buffer: &'a Buffer,
    /// First element (f32) of the operand.
    pub offset: usize,
}

impl<'a> View<'a> {
    /// The values of `buffer` from element `offset`.
    pub fn at(buffer: &'a Buffer, offset: usize) -> View<'a> {
        View { buffer, offset }
    }

    /// The values of `buffer` from its start.
    pub fn whole(buffer: &'a Buffer) -> View<'a> {
        View { buffer, offset: 0 }
    }

    /// This view moved `elems` further.
    pub fn offset_by(self, elems: usize) -> View<'a> {
        View {
            buffer: self.buffer,
            offset: self.offset + elems,
        }
    }
}

/// One row range of a [`QuantMatrix`] in its own buffer.
#[derive(Clone, Copy, Debug)]
pub struct QuantPart<'a> {
    /// `rows × row_bytes` bytes in GGUF block layout.
    pub buffer: &'a Buffer,
    /// Index of the part's first row in the whole matrix.
    pub row0: usize,
    /// Rows in the part.
    pub rows: usize,
}

/// A frozen quantized matrix (`rows × cols`, GGUF layout) on the device,
/// split by rows into parts that each fit a storage binding.
#[derive(Clone, Debug)]
pub struct QuantMatrix<'a> {
    /// Block format.
    pub ty: GgmlType,
    /// Rows (output features).
    pub rows: usize,
    /// Values per row (input features).
    pub cols: usize,
    /// Row ranges, in order, covering all rows.
    pub parts: Vec<QuantPart<'a>>,
}

impl QuantMatrix<'_> {
    fn row_bytes(&self, op: &str) -> Result<usize> {
        match self.ty.row_bytes(self.cols) {
            Some(b) if b > 0 => Ok(b),
            _ => Err(Error::Invalid(format!(
                "{op}: {} columns is not a whole number of {} blocks",
                self.cols, self.ty
            ))),
        }
    }

    fn check(&self, op: &str) -> Result<usize> {
        let rb = self.row_bytes(op)?;
        let mut next = 0;
        for p in &self.parts {
            if p.row0 != next || (p.buffer.size() as u128) < (p.rows * rb) as u128 {
                return Err(Error::Invalid(format!(
                    "{op}: the parts of the {} × {} {} matrix do not cover its rows in order",
                    self.rows, self.cols, self.ty
                )));
            }
            next += p.rows;
        }
        if next != self.rows {
            return Err(Error::Invalid(format!(
                "{op}: parts cover {next} of {} rows",
                self.rows
            )));
        }
        Ok(rb)
    }
}

/// The values that change every step, in a uniform the host rewrites before
/// each submission (`dropout` reads the seed, `loss_head` the scale).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct TrainStepParams {
    /// Low 32 bits of the dropout seed.
    pub seed_lo: u32,
    /// High 32 bits of the dropout seed.
    pub seed_hi: u32,
    /// Multiplier of the summed NLL in the gradient.
    pub loss_scale: f32,
    /// Padding to 16 bytes.
    pub _pad: u32,
}

impl TrainStepParams {
    /// The values of a step with dropout seed `seed` and loss scale `loss_scale`.
    pub fn new(seed: u64, loss_scale: f32) -> TrainStepParams {
        TrainStepParams {
            seed_lo: seed as u32,
            seed_hi: (seed >> 32) as u32,
            loss_scale,
            _pad: 0,
        }
    }
}

/// One AdamW step's hyper-parameters for one tensor, in a uniform the host
/// rewrites before each step (`train_adamw.wgsl`'s `Hyper`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamWHyper {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator offset.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// `1 / (1 − β1^t)`.
    pub inv_bc1: f32,
    /// `1 / √(1 − β2^t)`.
    pub inv_sqrt_bc2: f32,
    /// Largest global gradient norm before clipping (≤ 0: no clipping);
    /// only `adamw_clipped` reads it.
    pub max_norm: f32,
}

impl AdamWHyper {
    /// Step `t` (1-based) with learning rate `lr`: the bias corrections in
    /// f64, as [`crate::train::optim::AdamWState::step`] computes them.
    pub fn new(cfg: &AdamWConfig, lr: f32, t: u64) -> AdamWHyper {
        let t = t.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - f64::from(cfg.beta1).powi(t);
        let bc2 = 1.0 - f64::from(cfg.beta2).powi(t);
        AdamWHyper {
            lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            inv_bc1: (1.0 / bc1) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
            max_norm: 0.0,
        }
    }
}

/// The optimizer of one resident training step
/// ([`super::GpuStep::train_step`]): AdamW after clipping the global
/// gradient norm, as the host trainer does with
/// [`crate::train::optim::AdamWState::step`] and
/// [`crate::train::optim::clip_scale`].
#[derive(Clone, Debug, PartialEq)]
pub struct GpuOptim {
    /// β1, β2, ε and the weight decay.
    pub cfg: AdamWConfig,
    /// Learning rate of each parameter tensor, in the graph's order.
    pub lrs: Vec<f32>,
    /// Largest global gradient norm (≤ 0: no clipping).
    pub max_grad_norm: f32,
    /// AdamW's step number, 1-based: the bias corrections' `t`. The caller
    /// counts applied steps (a skipped step does not advance it).
    pub t: u64,
}

/// What a resident training step reports: all it reads back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuStepReport {
    /// Σ NLL over the step's targets.
    pub nll_sum: f64,
    /// Targets of the step.
    pub count: usize,
    /// Global gradient norm before clipping, `√ss` (NaN or ∞ when a
    /// gradient was not finite).
    pub grad_norm: f32,
    /// The update was not applied (parameters and moments untouched)
    /// because the squared norm `ss` or the loss was not finite. `ss` is
    /// summed in f32: gradients of norm past ~1.8e19 skip the step here
    /// where the host (f64) would clip.
    pub skipped: bool,
}

// ---- parameters of the shaders (their `Params`) ----------------------------

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LinearParams {
    rows: u32,
    cols: u32,
    n_tok: u32,
    row_bytes: u32,
    x_off: u32,
    x_stride: u32,
    y_off: u32,
    y_stride: u32,
    accumulate: u32,
    _pad: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ProductParams {
    m: u32,
    n: u32,
    k: u32,
    a_off: u32,
    a_rs: u32,
    a_ks: u32,
    b_off: u32,
    b_ks: u32,
    b_cs: u32,
    c_off: u32,
    c_rs: u32,
    d_off: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AdamWParams {
    n: u32,
    offs: [u32; 4],
    ss_at: u32,
    _pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GradNormParams {
    n: u32,
    src_off: u32,
    dst: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct EmbedParams {
    n_tok: u32,
    cols: u32,
    row0: u32,
    rows: u32,
    row_bytes: u32,
    scale: f32,
    chunks: u32,
    y_off: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LossParams {
    rows: u32,
    vocab: u32,
    tok0: u32,
    out_off: u32,
}

const _: () = assert!(
    size_of::<LinearParams>() == 48
        && size_of::<ProductParams>() == 48
        && size_of::<AdamWParams>() == 32
        && size_of::<EmbedParams>() == 32
        && size_of::<LossParams>() == 16
        && size_of::<GradNormParams>() == 16
        && size_of::<AdamWHyper>() == 32
        && size_of::<TrainStepParams>() == 16
);

// ---- helpers ---------------------------------------------------------------

/// `v` as a `u32` shader parameter.
fn to_u32(v: usize, op: &str, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Invalid(format!("{op}: {what} = {v} exceeds u32")))
}

/// The binding of `len` f32 of `v`: the window of its buffer from the
/// offset rounded down to the storage offset alignment, and the element
/// offset of `v` inside that window (for the shader).
fn bind<'a>(
    ctx: &GpuContext,
    v: View<'a>,
    len: usize,
    op: &str,
    what: &str,
) -> Result<(wgpu::BindingResource<'a>, u32)> {
    let limits = ctx.device.limits();
    let align = u64::from(limits.min_storage_buffer_offset_alignment).max(4);
    let start = v.offset as u64 * 4;
    let end = start + len.max(1) as u64 * 4;
    if end > v.buffer.size() {
        return Err(Error::Invalid(format!(
            "{op}: {what}: {len} f32 from element {} pass the end of a {}-byte buffer",
            v.offset,
            v.buffer.size()
        )));
    }
    let base = start / align * align;
    let size = end - base;
    if size > limits.max_storage_buffer_binding_size {
        return Err(Error::Gpu(format!(
            "{op}: {what} ({size} bytes) is larger than the storage binding limit of {} ({} bytes)",
            ctx.adapter().name,
            limits.max_storage_buffer_binding_size
        )));
    }
    let resource = wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer: v.buffer,
        offset: base,
        size: std::num::NonZeroU64::new(size),
    });
    Ok((resource, ((start - base) / 4) as u32))
}

/// `buf` holds at least `elems` 4-byte values.
fn check_len(buf: &Buffer, elems: usize, op: &str, what: &str) -> Result<()> {
    if (buf.size() as u128) < elems as u128 * 4 {
        return Err(Error::Invalid(format!(
            "{op}: {what} has {} bytes, needs {}",
            buf.size(),
            elems * 4
        )));
    }
    Ok(())
}

fn nonempty(n: usize, op: &str) -> Result<()> {
    if n == 0 {
        return Err(Error::Invalid(format!("{op}: no elements")));
    }
    Ok(())
}

/// Workgroups for `n` items of work, `per_group` each.
fn groups(n: usize, per_group: usize, op: &str) -> Result<[u32; 3]> {
    Ok(groups_1d(to_u32(n.div_ceil(per_group), op, "workgroups")?))
}

fn plain(ctx: &GpuContext, key: &str, entry: &str, src: &'static str) -> Result<PipelineRef> {
    ctx.pipeline(key, entry, || src.to_string())
}

type PipelineRef = std::sync::Arc<wgpu::ComputePipeline>;

/// The pipeline of `entry` of `src` (train_linear.wgsl or train_embed.wgsl,
/// cached under `key`) for weights of type `ty`.
fn quant_pipeline(
    ctx: &GpuContext,
    key: &str,
    src: &str,
    ty: GgmlType,
    entry: &str,
) -> Result<PipelineRef> {
    ctx.pipeline(&format!("train/{key}-{ty}"), entry, || {
        format!(
            "{QUANT}\nfn dq8(b: u32, k: u32) -> array<f32, 8> {{ return dq8_{}(b, k); }}\n{src}",
            ty.name().to_lowercase()
        )
    })
}

/// The pipeline of `entry` of train_linear.wgsl for weights of type `ty`.
fn linear_pipeline(ctx: &GpuContext, ty: GgmlType, entry: &str) -> Result<PipelineRef> {
    quant_pipeline(ctx, "linear", LINEAR, ty, entry)
}

/// Invocations per workgroup of train_embed.wgsl (8 values each).
const EMBED_WG: usize = 64;

/// `x (n_tok, C) = scale · W[tokens]` ([`crate::graph::Op::Embed`]): rows
/// of the frozen table `w (V, C)` gathered by the u32 token ids in `tokens`
/// (each below `V`: an id past the table writes nothing), one dispatch per
/// part of `w`, each writing the tokens whose rows it holds.
pub(crate) fn embed(
    ctx: &GpuContext,
    w: &QuantMatrix,
    tokens: &Buffer,
    y: View,
    n_tok: usize,
    scale: f32,
) -> Result<Vec<Dispatch>> {
    let op = "embed";
    let rb = w.check(op)?;
    nonempty(n_tok * w.cols, op)?;
    check_len(tokens, n_tok, op, "tokens")?;
    let (yb, y_off) = bind(ctx, y, n_tok * w.cols, op, "y")?;
    let chunks = w.cols.div_ceil(8);
    let pipeline = quant_pipeline(ctx, "embed", EMBED, w.ty, op)?;
    let g = groups(n_tok * chunks, EMBED_WG, op)?;
    let mut out = Vec::with_capacity(w.parts.len());
    for part in &w.parts {
        let params = EmbedParams {
            n_tok: to_u32(n_tok, op, "tokens")?,
            cols: to_u32(w.cols, op, "cols")?,
            row0: to_u32(part.row0, op, "rows")?,
            rows: to_u32(part.rows, op, "rows")?,
            row_bytes: to_u32(rb, op, "row bytes")?,
            scale,
            chunks: to_u32(chunks, op, "chunks")?,
            y_off,
        };
        let u = ctx.uniform(&params, "embed params");
        out.push(ctx.dispatch(
            &pipeline,
            &[
                u.as_entire_binding(),
                part.buffer.as_entire_binding(),
                tokens.as_entire_binding(),
                yb.clone(),
            ],
            g,
        ));
    }
    Ok(out)
}

// ---- products with a frozen quantized weight -------------------------------

/// `y (n_tok, rows) = x (n_tok, cols) · Wᵀ` ([`crate::graph::Op::Linear`]):
/// one dispatch per part of `w`, each writing its rows.
pub(crate) fn linear(
    ctx: &GpuContext,
    w: &QuantMatrix,
    x: View,
    y: View,
    n_tok: usize,
) -> Result<Vec<Dispatch>> {
    frozen_product(ctx, w, x, y, n_tok, false)
}

/// `dx (n_tok, cols) = dy (n_tok, rows) · W` ([`crate::graph::Op::LinearBackX`]):
/// one dispatch per part of `w`; the first writes `dx`, the others add their
/// rows' products to it, in order.
pub(crate) fn linear_back_x(
    ctx: &GpuContext,
    w: &QuantMatrix,
    dy: View,
    dx: View,
    n_tok: usize,
) -> Result<Vec<Dispatch>> {
    frozen_product(ctx, w, dy, dx, n_tok, true)
}

/// The dispatches of [`linear`] (`back` false: `a = x`, `b = y`) and
/// [`linear_back_x`] (`back` true: `a = dy`, `b = dx`): the entry point of
/// train_linear.wgsl of the same name, once per part of `w`.
fn frozen_product(
    ctx: &GpuContext,
    w: &QuantMatrix,
    a: View,
    b: View,
    n_tok: usize,
    back: bool,
) -> Result<Vec<Dispatch>> {
    let (op, a_name, b_name) = if back {
        ("linear_back_x", "dy", "dx")
    } else {
        ("linear", "x", "y")
    };
    let rb = w.check(op)?;
    let (n_in, n_out) = if back {
        (w.rows, w.cols)
    } else {
        (w.cols, w.rows)
    };
    nonempty(n_tok * n_out, op)?;
    let (ab, a_off) = bind(ctx, a, n_tok * n_in, op, a_name)?;
    let (bb, b_off) = bind(ctx, b, n_tok * n_out, op, b_name)?;
    let pipeline = linear_pipeline(ctx, w.ty, op)?;
    let tok_groups = to_u32(n_tok.div_ceil(LINEAR_TILE), op, "token tiles")?;
    if tok_groups > 65_535 {
        return Err(Error::Invalid(format!(
            "{op}: {n_tok} tokens in one dispatch"
        )));
    }
    let mut out = Vec::with_capacity(w.parts.len());
    for (i, part) in w.parts.iter().enumerate() {
        let row0 = to_u32(part.row0, op, "rows")?;
        // Forward: each part writes its own output columns. Backward: each
        // part reads its columns of dy and adds into all of dx.
        let (x_off, y_off) = if back {
            (a_off + row0, b_off)
        } else {
            (a_off, b_off + row0)
        };
        let params = LinearParams {
            rows: to_u32(part.rows, op, "rows")?,
            cols: to_u32(w.cols, op, "cols")?,
            n_tok: to_u32(n_tok, op, "tokens")?,
            row_bytes: to_u32(rb, op, "row bytes")?,
            x_off,
            x_stride: to_u32(n_in, op, "input width")?,
            y_off,
            y_stride: to_u32(n_out, op, "output width")?,
            accumulate: u32::from(back && i > 0),
            _pad: [0; 3],
        };
        let u = ctx.uniform(&params, op);
        let mut g = groups(if back { w.cols } else { part.rows }, LINEAR_TILE, op)?;
        g[2] = tok_groups;
        out.push(ctx.dispatch(
            &pipeline,
            &[
                u.as_entire_binding(),
                part.buffer.as_entire_binding(),
                ab.clone(),
                bb.clone(),
            ],
            g,
        ));
    }
    Ok(out)
}

// ---- f32 products (LoRA) ---------------------------------------------------

/// `c (m, n) = [addend +] a (m, k) · b (k, n)` through strides
/// (train_matmul.wgsl; `addend` laid out as `c`).
#[allow(clippy::too_many_arguments)]
fn product(
    ctx: &GpuContext,
    op: &str,
    (m, n, k): (usize, usize, usize),
    (a, a_len, a_rs, a_ks): (View, usize, usize, usize),
    (b, b_len, b_ks, b_cs): (View, usize, usize, usize),
    c: View,
    addend: Option<View>,
) -> Result<Dispatch> {
    nonempty(m * n * k, op)?;
    let (ab, a_off) = bind(ctx, a, a_len, op, "a")?;
    let (bb, b_off) = bind(ctx, b, b_len, op, "b")?;
    let (cb, c_off) = bind(ctx, c, m * n, op, "c")?;
    let addend = addend
        .map(|d| bind(ctx, d, m * n, op, "addend"))
        .transpose()?;
    let params = ProductParams {
        m: to_u32(m, op, "m")?,
        n: to_u32(n, op, "n")?,
        k: to_u32(k, op, "k")?,
        a_off,
        a_rs: to_u32(a_rs, op, "stride")?,
        a_ks: to_u32(a_ks, op, "stride")?,
        b_off,
        b_ks: to_u32(b_ks, op, "stride")?,
        b_cs: to_u32(b_cs, op, "stride")?,
        c_off,
        c_rs: n as u32,
        d_off: addend.as_ref().map_or(0, |d| d.1),
    };
    let u = ctx.uniform(&params, "product params");
    let blocks = m.div_ceil(4) * n.div_ceil(4);
    let mut bindings = vec![u.as_entire_binding(), ab, bb, cb];
    let entry = match addend {
        Some((db, _)) => {
            bindings.push(db);
            "product_add"
        }
        None => "product",
    };
    let p = plain(ctx, "train/matmul", entry, MATMUL)?;
    Ok(ctx.dispatch(&p, &bindings, groups(blocks, PRODUCT_WG, op)?))
}

/// `y (n_tok, m) = x (n_tok, k) · pᵀ` with `p (m, k)` ([`crate::graph::Op::MatmulT`]).
pub(crate) fn matmul_t(
    ctx: &GpuContext,
    x: View,
    p: View,
    y: View,
    n_tok: usize,
    m: usize,
    k: usize,
) -> Result<Dispatch> {
    product(
        ctx,
        "matmul_t",
        (n_tok, m, k),
        (x, n_tok * k, k, 1),
        (p, m * k, 1, k),
        y,
        None,
    )
}

/// `z (n_tok, m) = y + x (n_tok, k) · pᵀ` with `p (m, k)`
/// ([`crate::graph::Op::MatmulTAdd`]): a low-rank term added to a frozen
/// product in one pass.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_t_add(
    ctx: &GpuContext,
    y: View,
    x: View,
    p: View,
    z: View,
    n_tok: usize,
    m: usize,
    k: usize,
) -> Result<Dispatch> {
    product(
        ctx,
        "matmul_t_add",
        (n_tok, m, k),
        (x, n_tok * k, k, 1),
        (p, m * k, 1, k),
        z,
        Some(y),
    )
}

/// `dx (n_tok, k) = dy (n_tok, m) · p (m, k)` ([`crate::graph::Op::MatmulNN`]).
pub(crate) fn matmul_nn(
    ctx: &GpuContext,
    dy: View,
    p: View,
    dx: View,
    n_tok: usize,
    m: usize,
    k: usize,
) -> Result<Dispatch> {
    product(
        ctx,
        "matmul_nn",
        (n_tok, k, m),
        (dy, n_tok * m, m, 1),
        (p, m * k, k, 1),
        dx,
        None,
    )
}

/// `dp (m, k) = dyᵀ · x` with `dy (n_tok, m)`, `x (n_tok, k)`
/// ([`crate::graph::Op::MatmulTN`]): each output sums its `n_tok` products
/// in order in one invocation (deterministic, no atomics).
pub(crate) fn matmul_tn(
    ctx: &GpuContext,
    dy: View,
    x: View,
    dp: View,
    n_tok: usize,
    m: usize,
    k: usize,
) -> Result<Dispatch> {
    product(
        ctx,
        "matmul_tn",
        (m, k, n_tok),
        (dy, n_tok * m, 1, m),
        (x, n_tok * k, k, 1),
        dp,
        None,
    )
}

// ---- loss head ---------------------------------------------------------------

/// f32 elements of the scratch `loss_head` needs: per-token (NLL, count)
/// and one chunk of logits.
pub fn loss_scratch_len(n_tok: usize, chunk: usize, vocab: usize) -> usize {
    2 * n_tok + chunk.min(n_tok) * vocab
}

/// The loss head ([`crate::graph::Op::LossHead`]) over `h (n_tok, C)` and
/// the frozen output matrix `w (V, C)`, in chunks of `chunk` tokens: per
/// chunk, logits `= h·Wᵀ` ([`linear`]), softmax and NLL turning them into
/// `dlogits = loss_scale·(softmax − onehot)`, and `dx = dlogits·W`
/// ([`linear_back_x`]); then `loss (1, 2)` = (Σ NLL, targets). A row
/// without a target (`u32::MAX`, or an id past `V`) gets zero dlogits, so
/// exactly zero `dx` and no NLL, as on the CPU (which leaves such rows out
/// of its chunks; here they still cost their share of the two products,
/// since the rows with targets change every step and the dispatches are
/// recorded once). `targets`:
/// u32 buffer of `n_tok`, `u32::MAX` for none; `step`: a [`TrainStepParams`]
/// uniform; `scratch`: [`loss_scratch_len`] f32. Only `chunk × V` logits
/// exist at a time.
#[allow(clippy::too_many_arguments)]
pub(crate) fn loss_head(
    ctx: &GpuContext,
    h: View,
    w: &QuantMatrix,
    targets: &Buffer,
    step: &Buffer,
    dx: View,
    loss: View,
    scratch: &Buffer,
    n_tok: usize,
    chunk: usize,
) -> Result<Vec<Dispatch>> {
    let op = "loss_head";
    nonempty(n_tok * chunk, op)?;
    let (c, v) = (w.cols, w.rows);
    let chunk = chunk.min(n_tok);
    check_len(targets, n_tok, op, "targets")?;
    check_len(scratch, loss_scratch_len(n_tok, chunk, v), op, "scratch")?;
    let stats = View::whole(scratch);
    let logits = View::at(scratch, 2 * n_tok);
    let rows_p = plain(ctx, "train/loss", "loss_rows", LOSS)?;
    let sum_p = plain(ctx, "train/loss", "loss_sum", LOSS)?;
    let (sb, s_off) = bind(ctx, stats, 2 * n_tok, op, "stats")?;
    debug_assert_eq!(s_off, 0, "the stats start the scratch buffer");
    let mut out = Vec::new();
    for c0 in (0..n_tok).step_by(chunk) {
        let rows = chunk.min(n_tok - c0);
        out.extend(linear(ctx, w, h.offset_by(c0 * c), logits, rows)?);
        let (lb, l_off) = bind(ctx, logits, rows * v, op, "logits")?;
        let params = LossParams {
            rows: rows as u32,
            vocab: to_u32(v, op, "vocabulary")?,
            tok0: to_u32(c0, op, "tokens")?,
            out_off: l_off,
        };
        let u = ctx.uniform(&params, "loss_rows params");
        out.push(ctx.dispatch(
            &rows_p,
            &[
                u.as_entire_binding(),
                sb.clone(),
                lb,
                step.as_entire_binding(),
                targets.as_entire_binding(),
            ],
            groups_1d(rows as u32),
        ));
        out.extend(linear_back_x(ctx, w, logits, dx.offset_by(c0 * c), rows)?);
    }
    let (lb, l_off) = bind(ctx, loss, 2, op, "loss")?;
    let params = LossParams {
        rows: to_u32(n_tok, op, "tokens")?,
        vocab: v as u32,
        tok0: 0,
        out_off: l_off,
    };
    let u = ctx.uniform(&params, "loss_sum params");
    out.push(ctx.dispatch(&sum_p, &[u.as_entire_binding(), sb, lb], [1, 1, 1]));
    Ok(out)
}

// ---- optimizer ---------------------------------------------------------------

/// Elements of a gradient one workgroup of `sumsq_partial` sums
/// (train_grad_norm.wgsl's `CHUNK`).
const SUMSQ_CHUNK: usize = 4096;

/// Partial sums [`grad_sumsq`] writes for a tensor of `n` elements.
pub(crate) fn sumsq_partials(n: usize) -> usize {
    n.div_ceil(SUMSQ_CHUNK)
}

/// `partials[first ..][..sumsq_partials(n)]` = the sums of squares of
/// `grad`'s `n` elements, by chunks of 4096 (train_grad_norm.wgsl).
pub(crate) fn grad_sumsq(
    ctx: &GpuContext,
    grad: View,
    n: usize,
    partials: &Buffer,
    first: usize,
) -> Result<Dispatch> {
    let op = "grad_sumsq";
    nonempty(n, op)?;
    let parts = sumsq_partials(n);
    check_len(partials, first + parts, op, "partials")?;
    let (gb, g_off) = bind(ctx, grad, n, op, "grad")?;
    let params = GradNormParams {
        n: to_u32(n, op, "elements")?,
        src_off: g_off,
        dst: to_u32(first, op, "partials")?,
        _pad: 0,
    };
    let u = ctx.uniform(&params, "grad_sumsq params");
    let pl = plain(ctx, "train/grad_norm", "sumsq_partial", GRAD_NORM)?;
    Ok(ctx.dispatch(
        &pl,
        &[u.as_entire_binding(), gb, partials.as_entire_binding()],
        groups(n, SUMSQ_CHUNK, op)?,
    ))
}

/// `partials[count]` = ss = Σ `partials[..count]` (in a fixed order), then
/// `partials[count + 1]` = 1 when ss or the loss's Σ NLL is not finite
/// (else 0) and `partials[count + 2 ..= count + 3]` = the `(1, 2)` loss
/// (Σ NLL, targets): what [`adamw_clipped`] and the host read.
pub(crate) fn grad_sumsq_total(
    ctx: &GpuContext,
    partials: &Buffer,
    count: usize,
    loss: View,
) -> Result<Dispatch> {
    let op = "grad_sumsq_total";
    check_len(partials, count + 4, op, "partials")?;
    let (lb, l_off) = bind(ctx, loss, 2, op, "loss")?;
    let params = GradNormParams {
        n: to_u32(count, op, "partials")?,
        src_off: l_off,
        dst: to_u32(count, op, "partials")?,
        _pad: 0,
    };
    let u = ctx.uniform(&params, "grad_sumsq_total params");
    let pl = plain(ctx, "train/grad_norm", "sumsq_total", GRAD_NORM)?;
    Ok(ctx.dispatch(
        &pl,
        &[u.as_entire_binding(), lb, partials.as_entire_binding()],
        [1, 1, 1],
    ))
}

/// AdamW in place on `param` (`n` elements) with its gradient and moments;
/// `hyper` is an [`AdamWHyper`] uniform the host writes each step.
// The trainer's optimizer is the host's or adamw_clipped: only the tests call it.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn adamw(
    ctx: &GpuContext,
    param: View,
    grad: View,
    m: View,
    v: View,
    n: usize,
    hyper: &Buffer,
) -> Result<Dispatch> {
    adamw_entry(
        ctx,
        "adamw",
        [param, grad, m, v],
        n,
        hyper.as_entire_binding(),
        None,
    )
}

/// [`adamw`] with the gradient clipped to the global norm: reads ss and the
/// skip flag that [`grad_sumsq_total`] wrote at `norm[ss_at ..= ss_at + 1]`
/// and leaves `param`, `m` and `v` untouched when the flag is set. `hyper`:
/// 32 bytes of a uniform buffer holding an [`AdamWHyper`] (`max_norm` set).
#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw_clipped<'a>(
    ctx: &GpuContext,
    param: View<'a>,
    grad: View<'a>,
    m: View<'a>,
    v: View<'a>,
    n: usize,
    hyper: wgpu::BufferBinding<'a>,
    norm: &'a Buffer,
    ss_at: usize,
) -> Result<Dispatch> {
    check_len(norm, ss_at + 2, "adamw_clipped", "norm")?;
    adamw_entry(
        ctx,
        "adamw_clipped",
        [param, grad, m, v],
        n,
        wgpu::BindingResource::Buffer(hyper),
        Some((norm, ss_at)),
    )
}

/// A dispatch of `entry` of train_adamw.wgsl over `[param, grad, m, v]`.
fn adamw_entry(
    ctx: &GpuContext,
    entry: &str,
    views: [View; 4],
    n: usize,
    hyper: wgpu::BindingResource,
    norm: Option<(&Buffer, usize)>,
) -> Result<Dispatch> {
    let op = entry;
    nonempty(n, op)?;
    let mut offs = [0u32; 4];
    let mut bound = Vec::with_capacity(4);
    for (k, (view, what)) in views
        .into_iter()
        .zip(["param", "grad", "m", "v"])
        .enumerate()
    {
        let (b, off) = bind(ctx, view, n, op, what)?;
        offs[k] = off;
        bound.push(b);
    }
    let params = AdamWParams {
        n: to_u32(n, op, "elements")?,
        offs,
        ss_at: to_u32(norm.map_or(0, |(_, at)| at), op, "norm")?,
        _pad: [0; 2],
    };
    let u = ctx.uniform(&params, "adamw params");
    let mut bindings = vec![u.as_entire_binding(), hyper];
    bindings.extend(bound);
    if let Some((nb, _)) = norm {
        bindings.push(nb.as_entire_binding());
    }
    let pl = plain(ctx, "train/adamw", entry, ADAMW)?;
    Ok(ctx.dispatch(&pl, &bindings, groups(n, ELEMENT_WG, op)?))
}
