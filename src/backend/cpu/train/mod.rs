//! Executing a planned training graph on the CPU.
//!
//! [`CpuStep`] holds the arena the [`MemoryPlan`] sized, the decoded norm
//! vectors, RoPE tables and the scratch of the quantized products; `run`
//! executes every node in order, reading parameters from the caller and
//! leaving the loss and the parameter gradients in the arena.

pub mod attention;
pub mod fastmath;
pub mod loss;
pub mod ops;
pub mod peft_ops;
#[cfg(test)]
mod tests;

use super::gemm::{Operand, matmul_into};
use super::matmul::QMatrix;
use crate::Result;
use crate::graph::{Graph, MemoryPlan, Op, StepInputs, TensorId, TensorKind};
use crate::model::{Model, Rope};
use crate::quant::q4_gemm::{self, PackedQ4, Q8Rows};
use attention::{AttnSaved, Rows};
use rayon::prelude::*;
use std::sync::Arc;
use std::time::Instant;

/// Tokens per chunk of the loss head (bounds its logits to `chunk × vocab`).
pub const DEFAULT_LOSS_CHUNK: usize = 512;

/// Time spent per op kind in one or more steps.
#[derive(Debug, Clone, Default)]
pub struct StepProfile {
    /// (op name, calls, seconds), in first-seen order.
    pub ops: Vec<(&'static str, usize, f64)>,
}

impl StepProfile {
    fn add(&mut self, name: &'static str, secs: f64) {
        match self.ops.iter_mut().find(|e| e.0 == name) {
            Some(e) => {
                e.1 += 1;
                e.2 += secs;
            }
            None => self.ops.push((name, 1, secs)),
        }
    }
}

/// A training graph prepared to run on the CPU.
pub struct CpuStep<'m> {
    graph: Graph,
    plan: MemoryPlan,
    arena: Vec<f32>,
    vectors: Vec<Option<Vec<f32>>>,
    matrices: Vec<Option<QMatrix<'m>>>,
    ropes: Vec<(Rope, Vec<(f32, f32)>)>,
    wscratch: Vec<f32>,
    logits: Vec<f32>,
    wblock: Vec<f32>,
    loss_chunk: usize,
    threads: usize,
    pool: Arc<rayon::ThreadPool>,
    int8: Option<Int8Products>,
    /// A thin parameter transposed, for [`ops::add_thin_product`].
    thin: Vec<f32>,
    /// Per-op timings, when enabled.
    pub profile: Option<StepProfile>,
}

/// Scratch of the 8-bit products ([`CpuStep::set_fast`]): the weight being
/// multiplied, repacked (or its transpose rounded), and the last input or
/// output gradient quantized, with its tensor (q, k and v, or gate and up,
/// read the same input).
#[derive(Default)]
struct Int8Products {
    w: PackedQ4,
    x: Q8Rows,
    x_of: Option<TensorId>,
}

impl Int8Products {
    /// Round tensor `id`'s values `x` (rows of `cols`) to 8 bits, unless
    /// they are the ones rounded last: tensors are written once per run, so
    /// the same id is the same values.
    fn quantize(&mut self, id: TensorId, x: &[f32], cols: usize) {
        if self.x_of != Some(id) {
            self.x.quantize(x, cols);
            self.x_of = Some(id);
        }
    }
}

/// Lengths in f32 of the scratch a [`CpuStep`] allocates besides its arena:
/// the widest frozen matrix decoded for one product, the loss head's
/// `chunk × vocab` logits, and its block of decoded output rows.
fn scratch_lens(g: &Graph, n_vocab: usize) -> [usize; 3] {
    let widest = g
        .nodes
        .iter()
        .filter_map(|n| match n.op {
            Op::Linear { w } | Op::LinearBackX { w } => Some(g.frozen[w].numel()),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let n_embd = g
        .nodes
        .iter()
        .find_map(|n| match n.op {
            Op::LossHead { w } => Some(g.frozen[w].cols),
            _ => None,
        })
        .unwrap_or(0);
    [
        widest,
        DEFAULT_LOSS_CHUNK.min(g.n_tokens()) * n_vocab,
        loss::BLOCK.min(n_vocab) * n_embd,
    ]
}

/// Bytes of the scratch a [`CpuStep`] allocates besides its arena (see
/// `scratch_lens`), and with `fast` that of the 8-bit products: the largest
/// weight repacked (4-bit forward, or transposed and rounded to 5 bits for
/// `dY·W`) and the widest input or output gradient quantized.
pub fn workspace_bytes(g: &Graph, n_vocab: usize, fast: bool) -> u64 {
    let f32s = 4 * scratch_lens(g, n_vocab).iter().sum::<usize>() as u64;
    if !fast {
        return f32s;
    }
    let (mut w, mut x) = (0, 0);
    for n in &g.nodes {
        match n.op {
            Op::Linear { w: id } if PackedQ4::supports(g.frozen[id].ty) => {
                let m = &g.frozen[id];
                w = w.max(PackedQ4::bytes(m.rows, m.cols));
                x = x.max(Q8Rows::bytes(g.n_tokens(), m.cols));
            }
            Op::LinearBackX { w: id } if back_int8(g.frozen[id].rows) => {
                let m = &g.frozen[id];
                w = w.max(PackedQ4::bytes_transposed(m.rows, m.cols));
                x = x.max(Q8Rows::bytes(g.n_tokens(), m.rows));
            }
            _ => {}
        }
    }
    f32s + (w + x) as u64
}

impl<'m> CpuStep<'m> {
    /// Prepare `graph` (differentiated and planned by `plan`) over `model`'s
    /// weights, on `threads` workers (0: one per core).
    pub fn new(model: &'m Model, graph: Graph, plan: MemoryPlan, threads: usize) -> Result<Self> {
        let mut vectors = Vec::new();
        let mut matrices = Vec::new();
        for w in &graph.frozen {
            if w.rows == 1 {
                vectors.push(Some(model.vector(w)?));
                matrices.push(None);
            } else {
                vectors.push(None);
                matrices.push(Some(QMatrix::new(w.ty, w.rows, w.cols, model.data(w))?));
            }
        }
        let mut ropes: Vec<(Rope, Vec<(f32, f32)>)> = Vec::new();
        for n in &graph.nodes {
            if let Op::Rope { rope, .. } | Op::RopeBack { rope, .. } = n.op
                && !ropes.iter().any(|(r, _)| *r == rope)
            {
                ropes.push((rope, ops::rope_table(&rope, graph.seq)));
            }
        }
        let [widest, logits, wblock] = scratch_lens(&graph, model.spec().n_vocab);
        Ok(CpuStep {
            arena: vec![0.0; plan.arena_len],
            wscratch: vec![0.0; widest],
            logits: vec![0.0; logits],
            wblock: vec![0.0; wblock],
            loss_chunk: DEFAULT_LOSS_CHUNK.min(graph.n_tokens()),
            threads: super::resolve_threads(threads),
            pool: super::thread_pool(threads)?,
            int8: None,
            thin: Vec::new(),
            graph,
            plan,
            vectors,
            matrices,
            ropes,
            profile: None,
        })
    }

    /// Compute the frozen weights' products in 8-bit integer arithmetic
    /// ([`q4_gemm`]):
    /// - forward, `x·Wᵀ` of Q4_0/Q4_1 weights: `x` is rounded to 8 bits per
    ///   block of 32, as llama.cpp's inference does;
    /// - backward, `dX = dY·W` of any weight with a multiple of 32 rows:
    ///   `dY` is rounded likewise, and `Wᵀ` to 5 bits per block of 32 of
    ///   its rows ([`PackedQ4::pack_transposed`]).
    ///
    /// The loss head, the adapter's products and other weights stay f32.
    /// Recomputed layers use the same products, so they reproduce the
    /// stored activations exactly.
    pub fn set_fast(&mut self, on: bool) {
        self.int8 = on.then(Int8Products::default);
    }

    /// The graph being run.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The memory plan in use.
    pub fn plan(&self) -> &MemoryPlan {
        &self.plan
    }

    /// A tensor's values after [`CpuStep::run`] (arena tensors only).
    pub fn tensor(&self, t: TensorId) -> &[f32] {
        let off = self.plan.offsets[t].expect("an arena tensor");
        &self.arena[off..off + self.graph.tensors[t].shape.numel()]
    }

    /// Gradient of parameter `i` after [`CpuStep::run`].
    pub fn grad(&self, i: usize) -> &[f32] {
        self.tensor(self.graph.param_grads[i].expect("a differentiated graph"))
    }

    /// Run forward, loss and backward. `params[i]` holds parameter `i`.
    /// Returns (Σ NLL over targets, number of targets).
    pub fn run(&mut self, inp: &StepInputs, params: &[Vec<f32>]) -> Result<(f64, usize)> {
        self.check(inp, params)?;
        let pool = self.pool.clone();
        pool.install(|| self.run_nodes(inp, params))
    }

    fn check(&self, inp: &StepInputs, params: &[Vec<f32>]) -> Result<()> {
        let vocab = self.graph.frozen.iter().map(|w| w.rows).max().unwrap_or(0);
        self.graph.check_inputs(inp, vocab)?;
        self.graph.check_params(params, "parameter")
    }

    fn run_nodes(&mut self, inp: &StepInputs, params: &[Vec<f32>]) -> Result<(f64, usize)> {
        let mut result = (0.0, 0);
        let base = self.arena.as_mut_ptr();
        let (g, plan) = (&self.graph, &self.plan);
        let rows = Rows {
            batch: g.batch,
            seq: g.seq,
            seg_start: inp.seg_start,
        };
        // SAFETY (for `read` and `write`): offsets and lengths come from the
        // plan, which places every arena tensor inside `arena_len` and never
        // gives a node's output the space of a tensor alive at that node, so
        // an output slice never overlaps another slice in use.
        let read = |t: TensorId| -> &[f32] {
            match g.tensors[t].kind {
                TensorKind::Param(i) => &params[i],
                TensorKind::Const(i) => &g.consts[i].data,
                _ => unsafe {
                    std::slice::from_raw_parts(
                        base.add(plan.offsets[t].unwrap()),
                        g.tensors[t].shape.numel(),
                    )
                },
            }
        };
        #[allow(clippy::mut_from_ref)]
        let write = |t: TensorId| -> &mut [f32] {
            let off = plan.offsets[t].expect("outputs live in the arena");
            unsafe { std::slice::from_raw_parts_mut(base.add(off), g.tensors[t].shape.numel()) }
        };
        let threads = self.threads;
        if let Some(q) = &mut self.int8 {
            q.x_of = None;
        }
        for node in &g.nodes {
            let start = self.profile.as_ref().map(|_| Instant::now());
            let i = &node.inputs;
            let o = &node.outputs;
            match &node.op {
                Op::Embed { w, scale } => {
                    let m = self.matrices[*w].as_ref().unwrap();
                    let x = write(o[0]);
                    x.par_chunks_mut(m.cols)
                        .zip(inp.tokens.par_iter())
                        .for_each(|(r, &t)| {
                            m.dequantize_row(t as usize, r);
                            if *scale != 1.0 {
                                r.iter_mut().for_each(|v| *v *= scale);
                            }
                        });
                }
                Op::RmsNorm { w, eps } => {
                    let wv = self.vectors[*w].as_ref().unwrap();
                    ops::rms_norm_forward(read(i[0]), wv, *eps, write(o[0]));
                }
                Op::RmsNormBack { w, eps } => {
                    let wv = self.vectors[*w].as_ref().unwrap();
                    ops::rms_norm_backward(read(i[0]), read(i[1]), wv, *eps, write(o[0]));
                }
                Op::Linear { w } if self.int8.is_some() && PackedQ4::supports(g.frozen[*w].ty) => {
                    let m = self.matrices[*w].as_ref().unwrap();
                    let q = self.int8.as_mut().unwrap();
                    q.quantize(i[0], read(i[0]), m.cols);
                    q.w.pack(m.ty, m.rows, m.cols, m.data);
                    q4_gemm::gemm(&q.w, &q.x, write(o[0]));
                }
                Op::Linear { w } => {
                    let m = self.matrices[*w].as_ref().unwrap();
                    let wf = &mut self.wscratch[..m.rows * m.cols];
                    wf.par_chunks_mut(m.cols)
                        .enumerate()
                        .for_each(|(r, row)| m.dequantize_row(r, row));
                    let x = read(i[0]);
                    let n = x.len() / m.cols;
                    let (a, b) = (Operand::new(x, m.cols), Operand::new(wf, m.cols).t());
                    matmul_into(n, m.rows, m.cols, a, b, write(o[0]), m.rows, false, threads);
                }
                Op::LinearBackX { w } => {
                    let m = self.matrices[*w].as_ref().unwrap();
                    let wf = &mut self.wscratch[..m.rows * m.cols];
                    wf.par_chunks_mut(m.cols)
                        .enumerate()
                        .for_each(|(r, row)| m.dequantize_row(r, row));
                    let dy = read(i[0]);
                    if let Some(q) = self.int8.as_mut().filter(|_| back_int8(m.rows)) {
                        q.quantize(i[0], dy, m.rows);
                        q.w.pack_transposed(wf, m.rows, m.cols);
                        q4_gemm::gemm(&q.w, &q.x, write(o[0]));
                    } else {
                        let n = dy.len() / m.rows;
                        let (a, b) = (Operand::new(dy, m.rows), Operand::new(wf, m.cols));
                        matmul_into(n, m.cols, m.rows, a, b, write(o[0]), m.cols, false, threads);
                    }
                }
                Op::MatmulT => {
                    let (x, p) = (read(i[0]), g.shape(i[1]));
                    let n = x.len() / p.cols;
                    let (a, b) = (
                        Operand::new(x, p.cols),
                        Operand::new(read(i[1]), p.cols).t(),
                    );
                    matmul_into(n, p.rows, p.cols, a, b, write(o[0]), p.rows, false, threads);
                }
                Op::MatmulTAdd if g.shape(i[2]).cols <= ops::THIN_K => {
                    // out = base + x·pᵀ: pᵀ once, then one pass.
                    let p = g.shape(i[2]);
                    let (src, t) = (read(i[2]), &mut self.thin);
                    t.resize(p.rows * p.cols, 0.0);
                    for (r, row) in src.chunks_exact(p.cols).enumerate() {
                        for (c, &v) in row.iter().enumerate() {
                            t[c * p.rows + r] = v;
                        }
                    }
                    ops::add_thin_product(read(i[0]), read(i[1]), t, p.cols, write(o[0]));
                }
                Op::MatmulTAdd => {
                    let (x, p) = (read(i[1]), g.shape(i[2]));
                    let n = x.len() / p.cols;
                    let out = write(o[0]);
                    out.copy_from_slice(read(i[0]));
                    let (a, b) = (
                        Operand::new(x, p.cols),
                        Operand::new(read(i[2]), p.cols).t(),
                    );
                    matmul_into(n, p.rows, p.cols, a, b, out, p.rows, true, threads);
                }
                Op::MatmulNN => {
                    let (dy, p) = (read(i[0]), g.shape(i[1]));
                    let n = dy.len() / p.rows;
                    let (a, b) = (Operand::new(dy, p.rows), Operand::new(read(i[1]), p.cols));
                    matmul_into(n, p.cols, p.rows, a, b, write(o[0]), p.cols, false, threads);
                }
                Op::MatmulNNAdd => {
                    let k = g.shape(i[2]).rows;
                    ops::add_thin_product(read(i[0]), read(i[1]), read(i[2]), k, write(o[0]));
                }
                Op::MatmulTN => {
                    let (dy, x) = (g.shape(i[0]), g.shape(i[1]));
                    let a = Operand::new(read(i[0]), dy.cols).t();
                    let b = Operand::new(read(i[1]), x.cols);
                    matmul_into(
                        dy.cols,
                        x.cols,
                        dy.rows,
                        a,
                        b,
                        write(o[0]),
                        x.cols,
                        false,
                        threads,
                    );
                }
                Op::AddScaled { s } => zip2(read(i[0]), read(i[1]), write(o[0]), |a, b| a + s * b),
                Op::Add => zip2(read(i[0]), read(i[1]), write(o[0]), |a, b| a + b),
                Op::Mul => zip2(read(i[0]), read(i[1]), write(o[0]), |a, b| a * b),
                Op::MulCols => peft_ops::mul_cols(read(i[0]), read(i[1]), write(o[0])),
                Op::ColDot => peft_ops::col_dot(read(i[0]), read(i[1]), write(o[0])),
                Op::Kron => {
                    let (a, b) = (g.shape(i[0]), g.shape(i[1]));
                    let (ad, bd) = ((a.rows, a.cols), (b.rows, b.cols));
                    peft_ops::kron(read(i[0]), ad, read(i[1]), bd, write(o[0]));
                }
                Op::KronBack => {
                    let (a, b) = (g.shape(i[0]), g.shape(i[1]));
                    let (ad, bd) = ((a.rows, a.cols), (b.rows, b.cols));
                    let (da, db) = (write(o[0]), write(o[1]));
                    peft_ops::kron_back(read(i[0]), ad, read(i[1]), bd, read(i[2]), da, db);
                }
                Op::DoraNorm { s } => {
                    let (c, wa, b, gram) = (read(i[0]), read(i[1]), read(i[2]), read(i[3]));
                    peft_ops::dora_norm(c, wa, b, gram, *s, write(o[0]));
                }
                Op::DoraNormBack { s } => {
                    let (wa, b, gram, dn2) = (read(i[0]), read(i[1]), read(i[2]), read(i[3]));
                    let (dwa, db, dgram) = (write(o[0]), write(o[1]), write(o[2]));
                    peft_ops::dora_norm_back(wa, b, gram, dn2, *s, dwa, db, dgram);
                }
                Op::RsqrtMul => peft_ops::rsqrt_mul(read(i[0]), read(i[1]), write(o[0])),
                Op::PrefixRows { n, seq } => {
                    peft_ops::prefix_rows(read(i[0]), read(i[1]), (*n, *seq), write(o[0]))
                }
                Op::PrefixRowsBack { n, seq } => {
                    let (dx, dp) = (write(o[0]), write(o[1]));
                    peft_ops::prefix_rows_back(read(i[0]), (*n, *seq), dx, dp);
                }
                Op::RsqrtMulBack => {
                    let (dm, dn2) = (write(o[0]), write(o[1]));
                    peft_ops::rsqrt_mul_back(read(i[0]), read(i[1]), read(i[2]), dm, dn2);
                }
                Op::Scale { s } => {
                    let (x, y) = (read(i[0]), write(o[0]));
                    y.par_iter_mut()
                        .zip(x.par_iter())
                        .for_each(|(y, &x)| *y = s * x);
                }
                Op::Rope { rope, head_dim } | Op::RopeBack { rope, head_dim } => {
                    let sign = if matches!(node.op, Op::Rope { .. }) {
                        1.0
                    } else {
                        -1.0
                    };
                    let table = &self.ropes.iter().find(|(r, _)| r == rope).unwrap().1;
                    ops::rope_apply(
                        read(i[0]),
                        inp.positions,
                        *head_dim,
                        rope,
                        table,
                        sign,
                        write(o[0]),
                    );
                }
                Op::Attention(geom) => {
                    let (q, k, v) = (read(i[0]), read(i[1]), read(i[2]));
                    attention::attention_forward(q, k, v, &rows, geom, write(o[0]), write(o[1]));
                }
                Op::AttentionBack(geom) => {
                    let saved = AttnSaved {
                        q: read(i[0]),
                        k: read(i[1]),
                        v: read(i[2]),
                        o: read(i[3]),
                        lse: read(i[4]),
                    };
                    let (dq, dk, dv) = (write(o[0]), write(o[1]), write(o[2]));
                    attention::attention_backward(&saved, read(i[5]), &rows, geom, dq, dk, dv);
                }
                Op::Gated { act } => ops::gated_forward(read(i[0]), read(i[1]), *act, write(o[0])),
                Op::GatedBack { act } => {
                    let (dg, du) = (write(o[0]), write(o[1]));
                    ops::gated_backward(read(i[0]), read(i[1]), read(i[2]), *act, dg, du);
                }
                Op::Dropout { p, site } => {
                    ops::dropout(read(i[0]), *p, inp.seed, *site, write(o[0]))
                }
                Op::LossHead { w } => {
                    let m = self.matrices[*w].as_ref().unwrap();
                    let (sum, count) = loss::loss_head(
                        read(i[0]),
                        m,
                        inp.targets,
                        inp.loss_scale,
                        self.loss_chunk,
                        &mut self.logits,
                        &mut self.wblock,
                        write(o[1]),
                        threads,
                    );
                    let l = write(o[0]);
                    l[0] = sum as f32;
                    l[1] = count as f32;
                    result = (sum, count);
                }
            }
            if let (Some(p), Some(t)) = (self.profile.as_mut(), start) {
                p.add(node.op.name(), t.elapsed().as_secs_f64());
            }
        }
        Ok(result)
    }
}

/// One step of `graph` (a [`LoraCase`]'s graph or a rewrite of it) over the
/// case's model, batch and parameters at loss scale `scale`, with 8-bit
/// frozen-weight products when `fast`: the (Σ NLL, count) and every parameter's
/// gradient. The CPU step tests and the GPU's reference use it.
///
/// [`LoraCase`]: crate::graph::testing::LoraCase
#[cfg(test)]
pub(crate) fn case_step(
    c: &crate::graph::testing::LoraCase,
    graph: &Graph,
    scale: f32,
    fast: bool,
) -> ((f64, usize), Vec<Vec<f32>>) {
    let mut step = CpuStep::new(&c.model, graph.clone(), MemoryPlan::new(graph), 2).unwrap();
    step.set_fast(fast);
    let loss = step
        .run(&crate::graph::testing::inputs(&c.batch, scale), &c.params)
        .unwrap();
    let grads = (0..graph.params.len())
        .map(|i| step.grad(i).to_vec())
        .collect();
    (loss, grads)
}

/// Whether `--fast` takes `dY·W` of a weight with `rows` outputs in 8-bit
/// products: `Wᵀ` is rounded in blocks of 32 of them.
fn back_int8(rows: usize) -> bool {
    rows.is_multiple_of(crate::quant::blocks::QK)
}

fn zip2(a: &[f32], b: &[f32], y: &mut [f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    y.par_chunks_mut(4096)
        .zip(a.par_chunks(4096).zip(b.par_chunks(4096)))
        .for_each(|(yc, (ac, bc))| {
            for ((y, &a), &b) in yc.iter_mut().zip(ac).zip(bc) {
                *y = f(a, b);
            }
        });
}
