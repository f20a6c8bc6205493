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
//! - **Resident parameters and the optimizer.** [`GpuStep::load_params`]
//!   uploads the parameters once and allocates AdamW's moments `m`, `v`
//!   (zeros) beside them, and records a second list after the graph's: one
//!   [`super::train::grad_sumsq`] per gradient (the sums of squares of its
//!   chunks of 4096 into a small `norm` buffer), one
//!   [`super::train::grad_sumsq_total`] (ss = the sum of those partials in
//!   a fixed order, a skip flag when ss or the loss is not finite, and the
//!   loss, side by side in `norm`), and one [`super::train::adamw_clipped`]
//!   per parameter (clip to `max_grad_norm`, skip on the flag). Each
//!   [`GpuStep::train_step`] writes the inputs, the dropout/loss-scale
//!   uniform and the AdamW hyper-parameters of every tensor (one uniform
//!   buffer, one slot per tensor at the uniform offset alignment, bias
//!   corrections in f64 by [`super::train::AdamWHyper::new`]) with
//!   `queue.write_buffer`, records both lists into one encoder, copies
//!   `norm`'s last 16 bytes (ss, skip, Σ NLL, count) out and submits once:
//!   forward, backward, norm, clipping and update are one submission with
//!   one 16-byte read back. Without gradient accumulation nothing else
//!   crosses the bus; [`GpuStep::params`] and [`GpuStep::moments`] read the
//!   state back for checkpoints, [`GpuStep::set_moments`] restores it.
//!   [`GpuStep::run`] still uploads the parameters it is given (replacing
//!   the resident ones); [`GpuStep::run_resident`] runs the graph on the
//!   resident ones (evaluation).

use super::train::peft;
use super::train::{
    self, AdamWHyper, AttnSavedViews, GpuOptim, GpuStepReport, PackedRows, QuantMatrix,
    TrainStepParams, View, loss_scratch_len, rope_table,
};
use super::{Dispatch, GpuContext, GpuWeight};
use crate::backend::cpu::train::DEFAULT_LOSS_CHUNK;
use crate::graph::{FrozenId, Graph, MemoryPlan, Op, StepInputs, TensorId, TensorKind};
use crate::model::{Model, Rope};
use crate::{Error, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// The optimizer's state and dispatches while the parameters are resident
/// ([`GpuStep::load_params`]).
struct Resident {
    /// AdamW's first and second moments, one buffer per parameter.
    m: Vec<Buffer>,
    v: Vec<Buffer>,
    /// One [`AdamWHyper`] per parameter, `hyper_stride` bytes apart.
    hypers: Buffer,
    hyper_stride: usize,
    /// The partial sums of squares, then ss, the skip flag, Σ NLL and the
    /// target count from element `ss_at`.
    norm: Buffer,
    ss_at: usize,
    /// Sums of squares, their total, the updates: recorded after the graph.
    dispatches: Vec<Dispatch>,
}

/// AdamW moments (first or second) of every parameter, in graph order.
pub type Moments = Vec<Vec<f32>>;

/// A training graph prepared to run on the GPU: its buffers allocated, its
/// frozen weights uploaded and its dispatches recorded once.
pub struct GpuStep {
    ctx: Arc<GpuContext>,
    graph: Graph,
    plan: MemoryPlan,
    arena: Buffer,
    params: Vec<Buffer>,
    /// The graph's constants, uploaded once.
    consts: Vec<Buffer>,
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
    resident: Option<Resident>,
    /// Queue submissions so far (runs, steps and read-backs).
    submissions: AtomicU64,
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
        let consts = graph
            .consts
            .iter()
            .map(|c| ctx.upload(bytemuck::cast_slice(&c.data), &c.name))
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
            staging: ctx.staging(16),
            inputs,
            params,
            consts,
            vocab,
            dispatches: Vec::new(),
            frozen,
            ropes,
            loss_scratch,
            resident: None,
            submissions: AtomicU64::new(0),
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

    /// Kernel launches of the optimizer appended to each
    /// [`GpuStep::train_step`] (0 before [`GpuStep::load_params`]).
    pub fn optimizer_dispatches(&self) -> usize {
        self.resident.as_ref().map_or(0, |r| r.dispatches.len())
    }

    /// Queue submissions since the step was made: each run and each
    /// [`GpuStep::train_step`] is one, and so is each read-back.
    pub fn submissions(&self) -> u64 {
        self.submissions.load(Ordering::Relaxed)
    }

    /// Run forward, loss and backward in one submission. `params[i]` holds
    /// parameter `i` (uploaded into the parameter buffers, replacing
    /// resident parameters, if any). Returns (Σ NLL over targets, number of
    /// targets); the gradients stay on the device ([`GpuStep::grad`]).
    pub fn run(&mut self, inp: &StepInputs, params: &[Vec<f32>]) -> Result<(f64, usize)> {
        self.check_inputs(inp)?;
        self.check_params(params, "parameter")?;
        for (buf, v) in self.params.iter().zip(params) {
            self.ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(v));
        }
        self.run_resident(inp)
    }

    /// [`GpuStep::run`] with the parameters on the device as they are (those
    /// of [`GpuStep::load_params`] and the updates since, or of the last
    /// run): evaluation of a resident model.
    pub fn run_resident(&mut self, inp: &StepInputs) -> Result<(f64, usize)> {
        self.check_inputs(inp)?;
        self.write_inputs(inp);
        let mut encoder = self.ctx.encoder();
        GpuContext::record(&mut encoder, &self.dispatches);
        self.submissions.fetch_add(1, Ordering::Relaxed);
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

    /// Upload `params` (parameter `i` at `params[i]`) to stay on the device,
    /// with zeroed AdamW moments, and record the optimizer's dispatches:
    /// what [`GpuStep::train_step`] needs. The graph must be differentiated
    /// (a gradient for every parameter) and end in a loss. Calling it again
    /// replaces the parameters and zeroes the moments.
    pub fn load_params(&mut self, params: &[Vec<f32>]) -> Result<()> {
        self.check_params(params, "parameter")?;
        let g = &self.graph;
        let loss = g
            .loss
            .ok_or_else(|| graph_error("no loss: nothing to optimize".into()))?;
        let grads = (0..g.params.len())
            .map(|i| {
                g.param_grads.get(i).copied().flatten().ok_or_else(|| {
                    graph_error(format!("parameter {} has no gradient", g.params[i].name))
                })
            })
            .collect::<Result<Vec<TensorId>>>()?;
        for (buf, v) in self.params.iter().zip(params) {
            self.ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(v));
        }
        let ctx = &*self.ctx;
        let sizes: Vec<usize> = g.params.iter().map(|p| p.shape.numel()).collect();
        let zeros = |what: &str| -> Vec<Buffer> {
            g.params
                .iter()
                .zip(&sizes)
                .map(|(p, &n)| ctx.storage(n as u64 * 4, &format!("{} {what}", p.name)))
                .collect()
        };
        let (m, v) = (zeros("adamw m"), zeros("adamw v"));
        let align = ctx.device.limits().min_uniform_buffer_offset_alignment as usize;
        let hyper_stride = size_of::<AdamWHyper>().next_multiple_of(align.max(1));
        let hypers = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("adamw hyper-parameters"),
            size: (hyper_stride * sizes.len().max(1)) as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let firsts: Vec<usize> = sizes
            .iter()
            .scan(0, |acc, &n| {
                let first = *acc;
                *acc += train::sumsq_partials(n);
                Some(first)
            })
            .collect();
        let ss_at = firsts
            .last()
            .map_or(0, |f| f + train::sumsq_partials(sizes[sizes.len() - 1]));
        let norm = ctx.storage((ss_at + 4) as u64 * 4, "gradient norm");
        let mut dispatches = Vec::with_capacity(2 * sizes.len() + 1);
        for ((&t, &n), &first) in grads.iter().zip(&sizes).zip(&firsts) {
            if n > 0 {
                dispatches.push(train::grad_sumsq(ctx, self.view(t)?, n, &norm, first)?);
            }
        }
        dispatches.push(train::grad_sumsq_total(
            ctx,
            &norm,
            ss_at,
            View::at(&self.arena, self.offset(loss)?),
        )?);
        for (i, (&t, &n)) in grads.iter().zip(&sizes).enumerate() {
            if n == 0 {
                continue;
            }
            let hyper = wgpu::BufferBinding {
                buffer: &hypers,
                offset: (i * hyper_stride) as u64,
                size: std::num::NonZeroU64::new(size_of::<AdamWHyper>() as u64),
            };
            dispatches.push(train::adamw_clipped(
                ctx,
                View::whole(&self.params[i]),
                self.view(t)?,
                View::whole(&m[i]),
                View::whole(&v[i]),
                n,
                hyper,
                &norm,
                ss_at,
            )?);
        }
        self.resident = Some(Resident {
            m,
            v,
            hypers,
            hyper_stride,
            norm,
            ss_at,
            dispatches,
        });
        Ok(())
    }

    /// One whole training step on the resident parameters, in one
    /// submission: forward, loss and backward, the global gradient norm,
    /// clipping to `opt.max_grad_norm` and AdamW with `opt.lrs` at step
    /// `opt.t`, skipped (parameters and moments untouched) when the squared
    /// norm or the loss is not finite. Reads back 16 bytes.
    pub fn train_step(&mut self, inp: &StepInputs, opt: &GpuOptim) -> Result<GpuStepReport> {
        self.check_inputs(inp)?;
        let n = self.graph.params.len();
        if opt.lrs.len() != n {
            return Err(Error::Invalid(format!(
                "{} learning rates for {n} parameter tensors",
                opt.lrs.len()
            )));
        }
        if opt.t == 0 {
            return Err(Error::Invalid(
                "AdamW's step number is 1-based, got 0".into(),
            ));
        }
        let r = self.resident.as_ref().ok_or_else(|| {
            Error::Invalid("train_step: no resident parameters (call load_params first)".into())
        })?;
        self.write_inputs(inp);
        let mut hypers = vec![0u8; r.hyper_stride * n];
        for (slot, &lr) in hypers.chunks_exact_mut(r.hyper_stride).zip(&opt.lrs) {
            let h = AdamWHyper {
                max_norm: opt.max_grad_norm,
                ..AdamWHyper::new(&opt.cfg, lr, opt.t)
            };
            slot[..size_of::<AdamWHyper>()].copy_from_slice(bytemuck::bytes_of(&h));
        }
        if n > 0 {
            self.ctx.queue.write_buffer(&r.hypers, 0, &hypers);
        }
        let mut encoder = self.ctx.encoder();
        GpuContext::record(&mut encoder, &self.dispatches);
        GpuContext::record(&mut encoder, &r.dispatches);
        self.submissions.fetch_add(1, Ordering::Relaxed);
        let bytes = self.ctx.submit_and_read_via(
            encoder,
            &r.norm,
            r.ss_at as u64 * 4,
            16,
            &self.staging,
        )?;
        let [ss, skip, nll, count]: [f32; 4] = bytemuck::pod_read_unaligned(&bytes);
        Ok(GpuStepReport {
            nll_sum: f64::from(nll),
            count: count.round() as usize,
            grad_norm: ss.sqrt(),
            skipped: skip != 0.0,
        })
    }

    /// The parameters on the device, read back in one submission.
    pub fn params(&self) -> Result<Vec<Vec<f32>>> {
        self.read_all(&self.params)
    }

    /// AdamW's moments `(m, v)` on the device, one vector per parameter.
    pub fn moments(&self) -> Result<(Moments, Moments)> {
        let r = self.resident()?;
        Ok((self.read_all(&r.m)?, self.read_all(&r.v)?))
    }

    /// Replace AdamW's moments (a checkpoint's) after [`GpuStep::load_params`].
    /// The step number is the caller's: it passes it in each [`GpuOptim`].
    pub fn set_moments(&mut self, m: &[Vec<f32>], v: &[Vec<f32>]) -> Result<()> {
        self.check_params(m, "first moment")?;
        self.check_params(v, "second moment")?;
        let r = self.resident()?;
        for (bufs, vals) in [(&r.m, m), (&r.v, v)] {
            for (buf, x) in bufs.iter().zip(vals) {
                self.ctx.queue.write_buffer(buf, 0, bytemuck::cast_slice(x));
            }
        }
        Ok(())
    }

    fn resident(&self) -> Result<&Resident> {
        self.resident
            .as_ref()
            .ok_or_else(|| Error::Invalid("no resident parameters (call load_params first)".into()))
    }

    /// One f32 vector per parameter from `bufs` (laid out as the
    /// parameters): gathered into one buffer, read in one submission.
    fn read_all(&self, bufs: &[Buffer]) -> Result<Vec<Vec<f32>>> {
        let lens: Vec<usize> = self.graph.params.iter().map(|p| p.shape.numel()).collect();
        let total: usize = lens.iter().sum();
        if total == 0 {
            return Ok(vec![Vec::new(); lens.len()]);
        }
        let gather = self.ctx.storage(total as u64 * 4, "read-back gather");
        let mut encoder = self.ctx.encoder();
        let mut off = 0u64;
        for (buf, &n) in bufs.iter().zip(&lens) {
            if n > 0 {
                encoder.copy_buffer_to_buffer(buf, 0, &gather, off, n as u64 * 4);
            }
            off += n as u64 * 4;
        }
        let staging = self.ctx.staging(off);
        self.submissions.fetch_add(1, Ordering::Relaxed);
        let bytes = self
            .ctx
            .submit_and_read_via(encoder, &gather, 0, off, &staging)?;
        let all: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
        let mut rest = &all[..];
        Ok(lens
            .iter()
            .map(|&n| {
                let (head, tail) = rest.split_at(n);
                rest = tail;
                head.to_vec()
            })
            .collect())
    }

    /// Write the step inputs and the [`TrainStepParams`] uniform (ordered
    /// before the next submission).
    fn write_inputs(&self, inp: &StepInputs) {
        let q = &self.ctx.queue;
        let b = &self.inputs;
        q.write_buffer(&b.tokens, 0, bytemuck::cast_slice(inp.tokens));
        q.write_buffer(&b.targets, 0, bytemuck::cast_slice(inp.targets));
        q.write_buffer(&b.positions, 0, bytemuck::cast_slice(inp.positions));
        q.write_buffer(&b.seg_start, 0, bytemuck::cast_slice(inp.seg_start));
        let sp = TrainStepParams::new(inp.seed, inp.loss_scale);
        q.write_buffer(&self.step, 0, bytemuck::bytes_of(&sp));
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
        self.submissions.fetch_add(1, Ordering::Relaxed);
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
    fn check_inputs(&self, inp: &StepInputs) -> Result<()> {
        self.graph.check_inputs(inp, self.vocab)
    }

    fn check_params(&self, params: &[Vec<f32>], what: &str) -> Result<()> {
        self.graph.check_params(params, what)
    }

    /// The view of tensor `t`: its parameter buffer or its place in the arena.
    fn view(&self, t: TensorId) -> Result<View<'_>> {
        Ok(match self.graph.tensors[t].kind {
            TensorKind::Param(i) => View::whole(&self.params[i]),
            TensorKind::Const(i) => View::whole(&self.consts[i]),
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
                Op::MatmulNNAdd => {
                    return Err(Error::Invalid(
                        "matmul_nn_add is fused for the CPU; plan GPU steps without it".into(),
                    ));
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
                Op::Mul => out.push(peft::mul(ctx, v(0)?, v(1)?, o(0)?, numel(0))?),
                Op::MulCols => {
                    let m = numel(1);
                    out.push(peft::mul_cols(ctx, v(0)?, v(1)?, o(0)?, numel(0), m)?);
                }
                Op::ColDot => {
                    let m = g.shape(node.outputs[0]).numel();
                    let rows = numel(0) / m;
                    out.push(peft::col_dot(ctx, v(0)?, v(1)?, o(0)?, rows, m)?);
                }
                Op::Kron | Op::KronBack => {
                    let (a, b) = (g.shape(node.inputs[0]), g.shape(node.inputs[1]));
                    let (ad, bd) = ((a.rows, a.cols), (b.rows, b.cols));
                    if matches!(node.op, Op::Kron) {
                        out.push(peft::kron(ctx, v(0)?, v(1)?, o(0)?, ad, bd)?);
                    } else {
                        let (da, db) = (o(0)?, o(1)?);
                        out.extend(peft::kron_back(ctx, v(0)?, v(1)?, v(2)?, da, db, ad, bd)?);
                    }
                }
                Op::DoraNorm { s } => {
                    let b = g.shape(node.inputs[2]);
                    let dims = (b.rows, b.cols);
                    let (c, wa, bv, gram) = (v(0)?, v(1)?, v(2)?, v(3)?);
                    out.push(peft::dora_norm(ctx, c, wa, bv, gram, o(0)?, dims, *s)?);
                }
                Op::DoraNormBack { s } => {
                    let b = g.shape(node.inputs[1]);
                    let dims = (b.rows, b.cols);
                    let ins = [v(0)?, v(1)?, v(2)?, v(3)?];
                    let outs = [o(0)?, o(1)?, o(2)?];
                    out.extend(peft::dora_norm_back(ctx, ins, outs, dims, *s)?);
                }
                Op::RsqrtMul => out.push(peft::rsqrt_mul(ctx, v(0)?, v(1)?, o(0)?, numel(0))?),
                Op::PrefixRows { n, seq } => {
                    let c = g.shape(node.inputs[1]).cols;
                    let dims = (*n, *seq, c, g.shape(node.inputs[0]).rows / seq);
                    out.push(peft::prefix_rows(ctx, v(0)?, v(1)?, o(0)?, dims)?);
                }
                Op::PrefixRowsBack { n, seq } => {
                    let c = g.shape(node.outputs[1]).cols;
                    let dims = (*n, *seq, c, g.shape(node.inputs[0]).rows / seq);
                    out.extend(peft::prefix_rows_back(ctx, v(0)?, o(0)?, o(1)?, dims)?);
                }
                Op::RsqrtMulBack => {
                    let (dm, dn2) = (o(0)?, o(1)?);
                    out.push(peft::rsqrt_mul_back(
                        ctx,
                        v(0)?,
                        v(1)?,
                        v(2)?,
                        dm,
                        dn2,
                        numel(0),
                    )?);
                }
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
