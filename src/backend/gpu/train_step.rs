//! Executing a planned training graph on the GPU: [`GpuStep`], the device
//! twin of [`crate::backend::cpu::train::CpuStep`] (the oracle of its tests,
//! `train_step_tests.rs`).
//!
//! - **Buffers.** One arena storage buffer of `plan.arena_len` f32, every
//!   arena tensor at its plan offset ([`View::at`] takes the plan's element
//!   offsets as they are: each binding is widened down to the device's
//!   storage offset alignment and the remainder goes to the shader). Beside
//!   it: one buffer per trainable parameter, the frozen weights the graph
//!   references (matrices as [`GpuWeight`]s in their GGUF blocks, 1-row norm
//!   vectors as f32), one RoPE table per distinct [`Rope`] (`seq`
//!   positions), the u32 step inputs (tokens, targets, positions,
//!   seg_start), the [`TrainStepParams`] uniform (dropout seed, loss scale)
//!   and the loss head's scratch. The arena must fit one buffer
//!   (`max_buffer_size`: 2 GiB on lavapipe, often 4 GiB or more) and each
//!   tensor one binding (`max_storage_buffer_binding_size`, 128 MiB on
//!   lavapipe: the widest are the loss logits, `chunk × vocab`, and the
//!   `(N, ffn)` activations); larger plans need the arena split into
//!   several buffers, which [`View`] already allows (a view names its
//!   buffer).
//! - **Recording.** [`GpuStep::new`] walks `graph.nodes` in order once and
//!   calls each op's function of [`super::train`] with views at the plan's
//!   offsets (`TensorKind::Param(i)` tensors: the parameter buffers). The
//!   bind groups reference the buffers, so the list is valid as long as the
//!   step lives.
//! - **Replay.** [`GpuStep::run`] writes the step inputs, the parameters and
//!   the uniform (`queue.write_buffer`, ordered before the submission),
//!   records the whole list into one compute pass of one encoder (wgpu
//!   orders dispatches that touch the same buffer, so node order is
//!   enough), copies the `(1, 2)` loss tensor out and submits once: the only
//!   host round trip of a step is reading those 8 bytes.
//! - **The optimizer (to come).** With AdamW on the device the parameters
//!   stay resident (no upload per run) beside their moments, and each step
//!   appends one [`super::train::adamw`] dispatch per parameter (its view,
//!   its gradient's view in the arena, `m`, `v`, and an
//!   [`super::train::AdamWHyper`] uniform rewritten per step) to the same
//!   compute pass after the recorded list, so forward, backward and update
//!   are still one submission. Gradient accumulation and clipping need the
//!   gradients outside the arena (or a norm kernel) first.

use super::train::{
    self, AttnSavedViews, PackedRows, QuantMatrix, TrainStepParams, View, loss_scratch_len,
    rope_table,
};
use super::{Dispatch, GpuContext, GpuWeight};
use crate::backend::cpu::train::DEFAULT_LOSS_CHUNK;
use crate::graph::{FrozenId, Graph, MemoryPlan, Op, StepInputs, TensorId, TensorKind};
use crate::model::{Model, Rope};
use crate::{Error, Result};
use std::sync::Arc;
use wgpu::Buffer;

/// A frozen weight on the device.
enum Frozen {
    /// A matrix in its GGUF blocks.
    Matrix(GpuWeight),
    /// A 1-row vector (a norm's weights) as f32.
    Vector(Buffer),
}

/// The u32 step inputs, `batch × seq` each.
struct InputBuffers {
    tokens: Buffer,
    targets: Buffer,
    positions: Buffer,
    seg_start: Buffer,
}

/// A training graph prepared to run on the GPU: its buffers allocated, its
/// frozen weights uploaded and its dispatches recorded once.
pub struct GpuStep {
    ctx: Arc<GpuContext>,
    graph: Graph,
    plan: MemoryPlan,
    arena: Buffer,
    params: Vec<Buffer>,
    inputs: InputBuffers,
    step: Buffer,
    staging: Buffer,
    /// Rows of the embedding table: token ids must be below.
    vocab: usize,
    dispatches: Vec<Dispatch>,
    // The frozen weights, RoPE tables and loss scratch the dispatches bind.
    frozen: Vec<Frozen>,
    ropes: Vec<(Rope, Buffer)>,
    loss_scratch: Option<Buffer>,
}

impl std::fmt::Debug for GpuStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuStep")
            .field("batch", &self.graph.batch)
            .field("seq", &self.graph.seq)
            .field("arena_len", &self.plan.arena_len)
            .field("dispatches", &self.dispatches.len())
            .finish()
    }
}

/// `what` as an error about the graph (not the caller's input).
fn graph_error(what: String) -> Error {
    Error::Invalid(format!("training graph: {what}"))
}

impl GpuStep {
    /// Prepare `graph` (differentiated, planned by `plan`) over `model`'s
    /// weights on `ctx`: upload the frozen weights it references, allocate
    /// the arena and the other buffers, record the dispatches.
    pub fn new(
        ctx: Arc<GpuContext>,
        model: &Model,
        graph: Graph,
        plan: MemoryPlan,
    ) -> Result<GpuStep> {
        if plan.offsets.len() != graph.tensors.len() {
            return Err(graph_error(format!(
                "the plan places {} tensors, the graph has {}",
                plan.offsets.len(),
                graph.tensors.len()
            )));
        }
        let limits = ctx.device.limits();
        let arena_bytes = plan.arena_bytes();
        if arena_bytes > limits.max_buffer_size {
            return Err(Error::Gpu(format!(
                "the activation arena ({arena_bytes} bytes) is larger than the largest buffer \
                 of {} ({} bytes): use a smaller batch or recompute more layers",
                ctx.adapter().name,
                limits.max_buffer_size
            )));
        }
        let frozen = upload_frozen(&ctx, model, &graph)?;
        let n = graph.n_tokens();
        let u32_input = |what: &str| ctx.storage(n as u64 * 4, &format!("step {what}"));
        let inputs = InputBuffers {
            tokens: u32_input("tokens"),
            targets: u32_input("targets"),
            positions: u32_input("positions"),
            seg_start: u32_input("seg_start"),
        };
        let params = graph
            .params
            .iter()
            .map(|p| ctx.storage(p.shape.numel() as u64 * 4, &p.name))
            .collect();
        let mut ropes: Vec<(Rope, Buffer)> = Vec::new();
        for node in &graph.nodes {
            if let Op::Rope { rope, .. } | Op::RopeBack { rope, .. } = node.op
                && !ropes.iter().any(|(r, _)| *r == rope)
            {
                let table = rope_table(&rope, graph.seq);
                ropes.push((rope, ctx.upload(bytemuck::cast_slice(&table), "rope table")));
            }
        }
        let loss_scratch = graph.nodes.iter().find_map(|node| match node.op {
            Op::LossHead { w } => {
                let chunk = DEFAULT_LOSS_CHUNK.min(n);
                let len = loss_scratch_len(n, chunk, graph.frozen[w].rows);
                Some(ctx.storage(len as u64 * 4, "loss scratch"))
            }
            _ => None,
        });
        let vocab = graph
            .nodes
            .iter()
            .find_map(|node| match node.op {
                Op::Embed { w, .. } => Some(graph.frozen[w].rows),
                _ => None,
            })
            .unwrap_or_else(|| graph.frozen.iter().map(|w| w.rows).max().unwrap_or(0));
        let mut step = GpuStep {
            arena: ctx.storage(arena_bytes, "training arena"),
            step: ctx.uniform(&TrainStepParams::default(), "train step params"),
            staging: ctx.staging(8),
            inputs,
            params,
            vocab,
            dispatches: Vec::new(),
            frozen,
            ropes,
            loss_scratch,
            graph,
            plan,
            ctx,
        };
        step.dispatches = step.record()?;
        Ok(step)
    }

    /// The graph being run.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The memory plan in use.
    pub fn plan(&self) -> &MemoryPlan {
        &self.plan
    }

    /// Kernel launches per step.
    pub fn dispatches(&self) -> usize {
        self.dispatches.len()
    }

    /// Run forward, loss and backward in one submission. `params[i]` holds
    /// parameter `i`. Returns (Σ NLL over targets, number of targets); the
    /// gradients stay on the device ([`GpuStep::grad`]).
    pub fn run(&mut self, inp: &StepInputs, params: &[Vec<f32>]) -> Result<(f64, usize)> {
        self.check(inp, params)?;
        let q = &self.ctx.queue;
        let b = &self.inputs;
        q.write_buffer(&b.tokens, 0, bytemuck::cast_slice(inp.tokens));
        q.write_buffer(&b.targets, 0, bytemuck::cast_slice(inp.targets));
        q.write_buffer(&b.positions, 0, bytemuck::cast_slice(inp.positions));
        q.write_buffer(&b.seg_start, 0, bytemuck::cast_slice(inp.seg_start));
        for (buf, v) in self.params.iter().zip(params) {
            q.write_buffer(buf, 0, bytemuck::cast_slice(v));
        }
        let sp = TrainStepParams::new(inp.seed, inp.loss_scale);
        q.write_buffer(&self.step, 0, bytemuck::bytes_of(&sp));
        let mut encoder = self.ctx.encoder();
        GpuContext::record(&mut encoder, &self.dispatches);
        let Some(loss) = self.graph.loss else {
            self.ctx.submit_and_wait(encoder)?;
            return Ok((0.0, 0));
        };
        let off = self.offset(loss)? as u64 * 4;
        let bytes = self
            .ctx
            .submit_and_read_via(encoder, &self.arena, off, 8, &self.staging)?;
        let l: [f32; 2] = bytemuck::pod_read_unaligned(&bytes);
        Ok((f64::from(l[0]), l[1].round() as usize))
    }

    /// Gradient of parameter `i` after [`GpuStep::run`], read back.
    pub fn grad(&self, i: usize) -> Result<Vec<f32>> {
        let t = self
            .graph
            .param_grads
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "parameter {i} has no gradient in the graph ({} parameters, differentiated: {})",
                    self.graph.params.len(),
                    !self.graph.param_grads.is_empty()
                ))
            })?;
        self.tensor(t)
    }

    /// A tensor's values after [`GpuStep::run`] (arena tensors only; what
    /// the plan reused after the tensor's last reader is gone).
    pub fn tensor(&self, t: TensorId) -> Result<Vec<f32>> {
        let n = self
            .graph
            .tensors
            .get(t)
            .ok_or_else(|| Error::Invalid(format!("no tensor {t} in the graph")))?
            .shape
            .numel();
        self.ctx.read_f32(&self.arena, self.offset(t)?, n)
    }

    /// The arena offset of `t`.
    fn offset(&self, t: TensorId) -> Result<usize> {
        self.plan.offsets[t].ok_or_else(|| {
            graph_error(format!(
                "tensor {} has no place in the arena",
                self.graph.tensors[t].name
            ))
        })
    }

    /// The step's inputs as [`crate::backend::cpu::train::CpuStep`] checks
    /// them: the kernels index with them unchecked.
    fn check(&self, inp: &StepInputs, params: &[Vec<f32>]) -> Result<()> {
        let g = &self.graph;
        let n = g.n_tokens();
        for (what, v) in [
            ("tokens", inp.tokens),
            ("targets", inp.targets),
            ("positions", inp.positions),
            ("seg_start", inp.seg_start),
        ] {
            if v.len() != n {
                return Err(Error::Invalid(format!(
                    "step input {what} has {} values, the graph takes {n} ({} × {})",
                    v.len(),
                    g.batch,
                    g.seq
                )));
            }
        }
        if let Some((i, &t)) = inp
            .tokens
            .iter()
            .enumerate()
            .find(|&(_, &t)| t as usize >= self.vocab)
        {
            return Err(Error::Invalid(format!(
                "token {i}: id {t} is outside the vocabulary of {}",
                self.vocab
            )));
        }
        for (i, (&p, &s)) in inp.positions.iter().zip(inp.seg_start).enumerate() {
            if p as usize >= g.seq || s as usize > i % g.seq {
                return Err(Error::Invalid(format!(
                    "token {i}: position {p} or segment start {s} out of range for sequences of {}",
                    g.seq
                )));
            }
        }
        if params.len() != g.params.len() {
            return Err(Error::Invalid(format!(
                "{} parameter tensors given, the graph has {}",
                params.len(),
                g.params.len()
            )));
        }
        for (p, v) in g.params.iter().zip(params) {
            if v.len() != p.shape.numel() {
                return Err(Error::Invalid(format!(
                    "parameter {} has {} values, expected {}",
                    p.name,
                    v.len(),
                    p.shape.numel()
                )));
            }
        }
        Ok(())
    }

    /// The view of tensor `t`: its parameter buffer or its place in the arena.
    fn view(&self, t: TensorId) -> Result<View<'_>> {
        Ok(match self.graph.tensors[t].kind {
            TensorKind::Param(i) => View::whole(&self.params[i]),
            _ => View::at(&self.arena, self.offset(t)?),
        })
    }

    fn matrix(&self, w: FrozenId) -> Result<QuantMatrix<'_>> {
        match &self.frozen[w] {
            Frozen::Matrix(m) => Ok(m.quant_matrix()),
            Frozen::Vector(_) => Err(graph_error(format!(
                "{} is a vector, used as a matrix",
                self.graph.frozen[w].name
            ))),
        }
    }

    fn vector(&self, w: FrozenId) -> Result<&Buffer> {
        match &self.frozen[w] {
            Frozen::Vector(b) => Ok(b),
            Frozen::Matrix(_) => Err(graph_error(format!(
                "{} is a matrix, used as a norm vector",
                self.graph.frozen[w].name
            ))),
        }
    }

    fn rope_table(&self, rope: &Rope) -> &Buffer {
        &self
            .ropes
            .iter()
            .find(|(r, _)| r == rope)
            .expect("a table per rope")
            .1
    }

    /// Every node's dispatches, in order.
    fn record(&self) -> Result<Vec<Dispatch>> {
        let ctx = &*self.ctx;
        let g = &self.graph;
        let rows = PackedRows {
            batch: g.batch,
            seq: g.seq,
            seg_start: &self.inputs.seg_start,
        };
        let mut out = Vec::new();
        for node in &g.nodes {
            let v = |k: usize| self.view(node.inputs[k]);
            let o = |k: usize| self.view(node.outputs[k]);
            let numel = |k: usize| g.shape(node.inputs[k]).numel();
            match &node.op {
                Op::Embed { w, scale } => out.extend(train::embed(
                    ctx,
                    &self.matrix(*w)?,
                    &self.inputs.tokens,
                    o(0)?,
                    g.n_tokens(),
                    *scale,
                )?),
                Op::RmsNorm { w, eps } => {
                    let len = g.frozen[*w].numel();
                    let groups = (numel(0) / len, len);
                    out.push(train::rms_norm(
                        ctx,
                        v(0)?,
                        self.vector(*w)?,
                        o(0)?,
                        groups,
                        *eps,
                    )?);
                }
                Op::RmsNormBack { w, eps } => {
                    let len = g.frozen[*w].numel();
                    let groups = (numel(0) / len, len);
                    let wv = self.vector(*w)?;
                    out.push(train::rms_norm_back(
                        ctx,
                        v(0)?,
                        v(1)?,
                        wv,
                        o(0)?,
                        groups,
                        *eps,
                    )?);
                }
                Op::Linear { w } => {
                    let m = self.matrix(*w)?;
                    let n_tok = numel(0) / m.cols;
                    out.extend(train::linear(ctx, &m, v(0)?, o(0)?, n_tok)?);
                }
                Op::LinearBackX { w } => {
                    let m = self.matrix(*w)?;
                    let n_tok = numel(0) / m.rows;
                    out.extend(train::linear_back_x(ctx, &m, v(0)?, o(0)?, n_tok)?);
                }
                Op::MatmulT => {
                    let p = g.shape(node.inputs[1]);
                    let n_tok = numel(0) / p.cols;
                    let (x, pv) = (v(0)?, v(1)?);
                    out.push(train::matmul_t(ctx, x, pv, o(0)?, n_tok, p.rows, p.cols)?);
                }
                Op::MatmulTAdd => {
                    let p = g.shape(node.inputs[2]);
                    let n_tok = numel(1) / p.cols;
                    let (y, x, pv) = (v(0)?, v(1)?, v(2)?);
                    out.push(train::matmul_t_add(
                        ctx,
                        y,
                        x,
                        pv,
                        o(0)?,
                        n_tok,
                        p.rows,
                        p.cols,
                    )?);
                }
                Op::MatmulNN => {
                    let p = g.shape(node.inputs[1]);
                    let n_tok = numel(0) / p.rows;
                    let (dy, pv) = (v(0)?, v(1)?);
                    out.push(train::matmul_nn(ctx, dy, pv, o(0)?, n_tok, p.rows, p.cols)?);
                }
                Op::MatmulTN => {
                    let (dy, x) = (g.shape(node.inputs[0]), g.shape(node.inputs[1]));
                    let (dyv, xv) = (v(0)?, v(1)?);
                    out.push(train::matmul_tn(
                        ctx,
                        dyv,
                        xv,
                        o(0)?,
                        dy.rows,
                        dy.cols,
                        x.cols,
                    )?);
                }
                Op::AddScaled { s } => {
                    out.push(train::add_scaled(ctx, v(0)?, v(1)?, *s, o(0)?, numel(0))?)
                }
                Op::Add => out.push(train::add(ctx, v(0)?, v(1)?, o(0)?, numel(0))?),
                Op::Scale { s } => out.push(train::scale(ctx, v(0)?, *s, o(0)?, numel(0))?),
                Op::Rope { rope, head_dim } | Op::RopeBack { rope, head_dim } => {
                    let sign = if matches!(node.op, Op::Rope { .. }) {
                        1.0
                    } else {
                        -1.0
                    };
                    let x = g.shape(node.inputs[0]);
                    out.push(train::rope(
                        ctx,
                        v(0)?,
                        o(0)?,
                        &self.inputs.positions,
                        self.rope_table(rope),
                        (x.rows, x.cols / head_dim, *head_dim),
                        rope,
                        sign,
                    )?);
                }
                Op::Attention(geom) => out.push(train::attention_forward(
                    ctx,
                    v(0)?,
                    v(1)?,
                    v(2)?,
                    o(0)?,
                    o(1)?,
                    &rows,
                    geom,
                )?),
                Op::AttentionBack(geom) => {
                    let saved = AttnSavedViews {
                        q: v(0)?,
                        k: v(1)?,
                        v: v(2)?,
                        o: v(3)?,
                        lse: v(4)?,
                    };
                    out.extend(train::attention_backward(
                        ctx,
                        &saved,
                        v(5)?,
                        o(0)?,
                        o(1)?,
                        o(2)?,
                        &rows,
                        geom,
                    )?);
                }
                Op::Gated { act } => {
                    out.push(train::gated(ctx, v(0)?, v(1)?, o(0)?, numel(0), *act)?)
                }
                Op::GatedBack { act } => out.push(train::gated_back(
                    ctx,
                    v(0)?,
                    v(1)?,
                    v(2)?,
                    o(0)?,
                    o(1)?,
                    numel(0),
                    *act,
                )?),
                Op::Dropout { p, site } => out.push(train::dropout(
                    ctx,
                    v(0)?,
                    o(0)?,
                    numel(0),
                    *p,
                    *site,
                    &self.step,
                )?),
                Op::LossHead { w } => {
                    let n = g.n_tokens();
                    let scratch = self.loss_scratch.as_ref().expect("a loss head's scratch");
                    out.extend(train::loss_head(
                        ctx,
                        v(0)?,
                        &self.matrix(*w)?,
                        &self.inputs.targets,
                        &self.step,
                        o(1)?,
                        o(0)?,
                        scratch,
                        n,
                        DEFAULT_LOSS_CHUNK.min(n),
                    )?);
                }
            }
        }
        Ok(out)
    }
}

/// The frozen weights of `graph` on the device: 1-row tensors (norms) as
/// f32 vectors, the others in their GGUF blocks.
fn upload_frozen(ctx: &GpuContext, model: &Model, graph: &Graph) -> Result<Vec<Frozen>> {
    graph
        .frozen
        .iter()
        .map(|w| {
            Ok(if w.rows == 1 {
                let v = model.vector(w)?;
                Frozen::Vector(ctx.upload(bytemuck::cast_slice(&v), &w.name))
            } else {
                Frozen::Matrix(GpuWeight::upload(
                    ctx,
                    &w.name,
                    w.ty,
                    w.rows,
                    w.cols,
                    model.data(w),
                )?)
            })
        })
        .collect()
}

#[cfg(test)]
#[path = "train_step_tests.rs"]
mod tests;
