//! The training graph: a small op IR over 2-D f32 tensors with static shapes.
//!
//! A [`Graph`] is built once per (batch, sequence) shape by [`build`] from a
//! [`DecoderSpec`](crate::model::DecoderSpec) and a PEFT method; [`autodiff`]
//! appends backward nodes only where a trainable parameter is upstream of
//! the loss; [`plan`] gives every intermediate a slot in one arena by
//! liveness (optionally recomputing layers instead of keeping them) and
//! reports the peak before anything runs. Backends execute the nodes in
//! order. Frozen base weights are only ever referenced ([`Graph::frozen`]):
//! no node produces a gradient for them.
//!
//! Token ids, targets, positions and segment starts are not tensors: they
//! are the step's inputs ([`StepInputs`]) read by `Embed`, `Rope`,
//! `Attention` and `LossHead`.

pub mod autodiff;
pub mod build;
pub mod plan;
#[cfg(test)]
pub(crate) mod testing;

pub use build::{DecoderGraph, GraphHook, LinearSite, NormSite, SublayerSite, Target};
pub use plan::{MemoryPlan, PlanOptions};

use crate::model::{Activation, Rope, Weight};

/// Index of a tensor in [`Graph::tensors`].
pub type TensorId = usize;

/// A row-major `rows × cols` f32 tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Rows (usually tokens).
    pub rows: usize,
    /// Columns (features).
    pub cols: usize,
}

impl Shape {
    /// A `rows × cols` shape.
    pub fn new(rows: usize, cols: usize) -> Shape {
        Shape { rows, cols }
    }

    /// Number of elements.
    pub fn numel(self) -> usize {
        self.rows * self.cols
    }
}

/// What a tensor is, which decides where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    /// An intermediate value in the arena, alive from its producer to its
    /// last consumer.
    Activation,
    /// Trainable parameter `i` of [`Graph::params`], held by the trainer.
    Param(usize),
    /// Constant `i` of [`Graph::consts`]: values a method fixes when it
    /// builds the graph (VeRA's shared random projections, PiSSA's frozen
    /// correction, DoRA's row norms of the frozen weight). No gradient,
    /// never updated, not in the arena.
    Const(usize),
    /// A result read after the step (the loss, parameter gradients): in the
    /// arena, alive until the end.
    Output,
}

/// One tensor of the graph.
#[derive(Debug, Clone)]
pub struct Tensor {
    /// Shape.
    pub shape: Shape,
    /// Where it lives.
    pub kind: TensorKind,
    /// Name for plans and error messages.
    pub name: String,
}

/// A trainable parameter tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// Stable name, used in checkpoints and adapter files.
    pub name: String,
    /// Shape.
    pub shape: Shape,
    /// The tensor holding it.
    pub tensor: TensorId,
}

/// A constant tensor of the graph, with its values.
#[derive(Debug, Clone)]
pub struct Const {
    /// Name, unique in the graph.
    pub name: String,
    /// Shape.
    pub shape: Shape,
    /// The tensor holding it.
    pub tensor: TensorId,
    /// `shape.numel()` values, row-major.
    pub data: std::sync::Arc<[f32]>,
}

/// Index into [`Graph::frozen`].
pub type FrozenId = usize;

/// Attention geometry shared by the forward and backward ops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnGeom {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_kv_head: usize,
    /// Dimension of a head.
    pub head_dim: usize,
    /// Score scale.
    pub scale: f32,
    /// Sliding window in positions (`i − j < window`), `None` for full.
    pub window: Option<usize>,
    /// Virtual tokens at the start of every row (prompt and prefix tuning):
    /// every query sees them as well as its own segment. A window never
    /// reaches them: a graph with a sink is built only where the window
    /// does not bind (`seq ≤ window`).
    pub sink: usize,
}

/// The operations. Each lists its inputs → outputs; `N` is batch × seq
/// tokens, `C` the hidden size.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// tokens → `x (N, C)`: rows of the frozen table `w`, times `scale`.
    Embed { w: FrozenId, scale: f32 },
    /// `x (N, k·n)` → `y`: RMSNorm over each group of `n = len(w)` values.
    RmsNorm { w: FrozenId, eps: f32 },
    /// `x (N, in)` → `y = x·Wᵀ (N, out)` with the frozen quantized `W`.
    Linear { w: FrozenId },
    /// `x (N, k)`, `p (m, k)` → `y = x·pᵀ (N, m)`.
    MatmulT,
    /// `y (N, m)`, `x (N, k)`, `p (m, k)` → `y + x·pᵀ`: a low-rank term added
    /// to a frozen product in one pass over the output.
    MatmulTAdd,
    /// `a`, `b` → `a + s·b`.
    AddScaled { s: f32 },
    /// `x (N, k·m)`, `v (1, m)` → `x ⊙ v`: every row (and every group of
    /// `m` columns) scaled column by column ((IA)³, DoRA, VeRA, norm tuning).
    MulCols,
    /// `a (N, k·m)`, `b (N, k·m)` → `(1, m)`: Σ over rows and groups of
    /// `a ⊙ b` (the gradient of [`Op::MulCols`]'s vector).
    ColDot,
    /// `a`, `b` (same shape) → `a ⊙ b`.
    Mul,
    /// `a (p, q)`, `b (m, n)` → `a ⊗ b (p·m, q·n)`, the Kronecker product.
    Kron,
    /// `a`, `b`, `dy` → `da`, `db` of [`Op::Kron`].
    KronBack,
    /// `c (1, out)`, `wa (r, out)`, `b (out, r)`, `gram (r, r)` →
    /// `n2 (1, out)`: the squared row norms of `W + s·B·A` from
    /// `c = ‖Wᵢ‖²`, `wa = A·Wᵀ` and `gram = A·Aᵀ`:
    /// `c + 2s·(B·wa)ᵢᵢ + s²·Bᵢ·gram·Bᵢᵀ` (DoRA).
    DoraNorm { s: f32 },
    /// `wa`, `b`, `gram`, `dn2` → `dwa`, `db`, `dgram` of [`Op::DoraNorm`].
    DoraNormBack { s: f32 },
    /// `m`, `n2` (same shape) → `m / √n2`.
    RsqrtMul,
    /// `m`, `n2`, `dy` → `dm`, `dn2` of [`Op::RsqrtMul`].
    RsqrtMulBack,
    /// `x (B·seq, C)`, `p (n, C)` → `x` with the first `n` rows of each
    /// sequence replaced by `p` (prompt tuning's virtual tokens, prefix
    /// tuning's keys and values).
    PrefixRows { n: usize, seq: usize },
    /// `dy` → `dx` (`dy` with those rows zeroed), `dp` (their sum over the
    /// sequences) of [`Op::PrefixRows`].
    PrefixRowsBack { n: usize, seq: usize },
    /// `a`, `b` → `a + b`.
    Add,
    /// `x` → `s·x`.
    Scale { s: f32 },
    /// `x (N, heads·head_dim)` → RoPE at each token's position.
    Rope { rope: Rope, head_dim: usize },
    /// `q (N, H·d)`, `k`, `v (N, Hkv·d)` → `o (N, H·d)`, `lse (N, H)`:
    /// causal attention within each token's segment.
    Attention(AttnGeom),
    /// `g`, `u` → `act(g)·u`.
    Gated { act: Activation },
    /// Inverted dropout with keep mask drawn from (step seed, `site`, index);
    /// the same op with the same site is its own backward.
    Dropout { p: f32, site: u32 },
    /// `x (N, C)` → `loss (1, 2)` = (Σ NLL over targets, target count) and
    /// `dx (N, C)` = ∂(loss_scale · Σ NLL)/∂x, through the frozen output
    /// matrix `w`, computed in chunks so the `(N, vocab)` logits never exist.
    LossHead { w: FrozenId },
    /// `dy (N, out)` → `dx = dy·W (N, in)` through the frozen quantized `W`.
    LinearBackX { w: FrozenId },
    /// `dy (N, m)`, `p (m, k)` → `dx = dy·p (N, k)`.
    MatmulNN,
    /// `base (N, k)`, `dy (N, m)`, `p (m, k)` → `base + dy·p`: a thin
    /// [`Op::MatmulNN`] (`m` at most 16) fused with the `Add` that was its
    /// only reader, by [`plan::fuse_thin_products`] for the CPU.
    MatmulNNAdd,
    /// `dy (N, m)`, `x (N, k)` → `dp = dyᵀ·x (m, k)`.
    MatmulTN,
    /// `x`, `dy` → `dx` of [`Op::RmsNorm`].
    RmsNormBack { w: FrozenId, eps: f32 },
    /// `dy` → `dx` of [`Op::Rope`] (rotation by the opposite angle).
    RopeBack { rope: Rope, head_dim: usize },
    /// `q, k, v, o, lse, do` → `dq, dk, dv`, recomputing scores block by
    /// block (no seq × seq matrix is kept).
    AttentionBack(AttnGeom),
    /// `g, u, dh` → `dg, du` of [`Op::Gated`].
    GatedBack { act: Activation },
}

impl Op {
    /// Short name for profiles and plans.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Embed { .. } => "embed",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Linear { .. } => "linear",
            Op::MatmulT => "matmul_t",
            Op::MatmulTAdd => "matmul_t_add",
            Op::AddScaled { .. } => "add_scaled",
            Op::MulCols => "mul_cols",
            Op::ColDot => "col_dot",
            Op::Mul => "mul",
            Op::Kron => "kron",
            Op::KronBack => "kron_back",
            Op::DoraNorm { .. } => "dora_norm",
            Op::DoraNormBack { .. } => "dora_norm_back",
            Op::RsqrtMul => "rsqrt_mul",
            Op::RsqrtMulBack => "rsqrt_mul_back",
            Op::PrefixRows { .. } => "prefix_rows",
            Op::PrefixRowsBack { .. } => "prefix_rows_back",
            Op::Add => "add",
            Op::Scale { .. } => "scale",
            Op::Rope { .. } => "rope",
            Op::Attention(_) => "attention",
            Op::Gated { .. } => "gated",
            Op::Dropout { .. } => "dropout",
            Op::LossHead { .. } => "loss_head",
            Op::LinearBackX { .. } => "linear_back_x",
            Op::MatmulNN => "matmul_nn",
            Op::MatmulNNAdd => "matmul_nn_add",
            Op::MatmulTN => "matmul_tn",
            Op::RmsNormBack { .. } => "rms_norm_back",
            Op::RopeBack { .. } => "rope_back",
            Op::AttentionBack(_) => "attention_back",
            Op::GatedBack { .. } => "gated_back",
        }
    }
}

/// Which part of the step a node belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The forward pass.
    Forward,
    /// A layer's forward ops run again just before its backward
    /// (gradient checkpointing).
    Recompute,
    /// The backward pass.
    Backward,
}

/// One operation applied to tensors.
#[derive(Debug, Clone)]
pub struct Node {
    /// What it computes.
    pub op: Op,
    /// Tensors read.
    pub inputs: Vec<TensorId>,
    /// Tensors written (fresh, never aliased with inputs).
    pub outputs: Vec<TensorId>,
    /// The decoder layer it belongs to (`None`: embedding and loss).
    pub layer: Option<usize>,
    /// Forward, recompute or backward.
    pub phase: Phase,
}

/// The step's integer inputs, each of length `batch × seq`, row-major by
/// sequence (see [`crate::data::Batch`]).
#[derive(Debug, Clone, Copy)]
pub struct StepInputs<'a> {
    /// Input token ids.
    pub tokens: &'a [u32],
    /// Token to predict at each position, or `u32::MAX` for none.
    pub targets: &'a [u32],
    /// Position of each token within its example (RoPE, windows).
    pub positions: &'a [u32],
    /// Index in its row of the first token of each token's example: a
    /// query sees keys `seg_start..=t` only.
    pub seg_start: &'a [u32],
    /// Multiplier of the summed NLL in the gradient (1 / target tokens of
    /// the whole optimizer step, for a mean).
    pub loss_scale: f32,
    /// Seed of this micro-step's dropout masks.
    pub seed: u64,
}

/// A graph of ops over tensors.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Every tensor.
    pub tensors: Vec<Tensor>,
    /// Every node, in execution order.
    pub nodes: Vec<Node>,
    /// Frozen base weights the ops read.
    pub frozen: Vec<Weight>,
    /// Trainable parameters.
    pub params: Vec<Param>,
    /// Constants.
    pub consts: Vec<Const>,
    /// The `(1, 2)` loss tensor, once built.
    pub loss: Option<TensorId>,
    /// The gradient tensor of each parameter, after [`autodiff`].
    pub param_grads: Vec<Option<TensorId>>,
    /// Layer outputs (the residual stream between blocks): kept, never
    /// recomputed, when layers are recomputed.
    pub checkpoints: Vec<TensorId>,
}

impl Graph {
    /// An empty graph for `batch` sequences of `seq` tokens.
    pub fn new(batch: usize, seq: usize) -> Graph {
        Graph {
            batch,
            seq,
            ..Graph::default()
        }
    }

    /// Tokens per step.
    pub fn n_tokens(&self) -> usize {
        self.batch * self.seq
    }

    /// Register a frozen weight (once per name) and return its id.
    pub fn frozen(&mut self, w: &Weight) -> FrozenId {
        if let Some(i) = self.frozen.iter().position(|f| f.name == w.name) {
            return i;
        }
        self.frozen.push(w.clone());
        self.frozen.len() - 1
    }

    /// A new tensor.
    pub fn tensor(&mut self, name: impl Into<String>, shape: Shape, kind: TensorKind) -> TensorId {
        self.tensors.push(Tensor {
            shape,
            kind,
            name: name.into(),
        });
        self.tensors.len() - 1
    }

    /// A new trainable parameter.
    pub fn param(&mut self, name: impl Into<String>, shape: Shape) -> TensorId {
        let name = name.into();
        let index = self.params.len();
        let t = self.tensor(name.clone(), shape, TensorKind::Param(index));
        self.params.push(Param {
            name,
            shape,
            tensor: t,
        });
        t
    }

    /// The trainable parameter `name`, made with `shape` the first time
    /// and shared by every later caller (VeRA's scaling vectors are not, but
    /// a hybrid's methods may meet at one tensor).
    pub fn shared_param(&mut self, name: &str, shape: Shape) -> TensorId {
        match self.params.iter().find(|p| p.name == name) {
            Some(p) => {
                assert_eq!(
                    p.shape, shape,
                    "parameter {name} made twice with two shapes"
                );
                p.tensor
            }
            None => self.param(name, shape),
        }
    }

    /// The constant `name`: made from `data()` (of `shape.numel()` values)
    /// the first time, the same tensor for every later caller.
    pub fn constant(
        &mut self,
        name: &str,
        shape: Shape,
        data: impl FnOnce() -> std::sync::Arc<[f32]>,
    ) -> TensorId {
        if let Some(c) = self.consts.iter().find(|c| c.name == name) {
            assert_eq!(c.shape, shape, "constant {name} made twice with two shapes");
            return c.tensor;
        }
        let data = data();
        assert_eq!(
            data.len(),
            shape.numel(),
            "constant {name}: values for its shape"
        );
        let index = self.consts.len();
        let t = self.tensor(name, shape, TensorKind::Const(index));
        self.consts.push(Const {
            name: name.to_string(),
            shape,
            tensor: t,
            data,
        });
        t
    }

    /// Bytes of the constants.
    pub fn const_bytes(&self) -> u64 {
        self.consts.iter().map(|c| 4 * c.shape.numel() as u64).sum()
    }

    /// Append a node whose outputs have the given names and shapes.
    pub fn push(
        &mut self,
        op: Op,
        inputs: &[TensorId],
        outputs: &[(&str, Shape)],
        layer: Option<usize>,
        phase: Phase,
    ) -> Vec<TensorId> {
        let outs: Vec<TensorId> = outputs
            .iter()
            .map(|&(n, s)| self.tensor(n, s, TensorKind::Activation))
            .collect();
        self.nodes.push(Node {
            op,
            inputs: inputs.to_vec(),
            outputs: outs.clone(),
            layer,
            phase,
        });
        outs
    }

    /// Shape of tensor `t`.
    pub fn shape(&self, t: TensorId) -> Shape {
        self.tensors[t].shape
    }

    /// Count of nodes per phase: (forward, recompute, backward).
    pub fn phase_counts(&self) -> (usize, usize, usize) {
        let count = |p| self.nodes.iter().filter(|n| n.phase == p).count();
        (
            count(Phase::Forward),
            count(Phase::Recompute),
            count(Phase::Backward),
        )
    }

    /// Check a step's inputs against this graph: lengths, token ids below
    /// `vocab`, positions and segment starts inside a sequence. Errors name
    /// the input and the token.
    pub fn check_inputs(&self, inp: &StepInputs, vocab: usize) -> crate::Result<()> {
        let bad = |m: String| Err(crate::Error::Invalid(m));
        let n = self.n_tokens();
        for (what, v) in [
            ("tokens", inp.tokens),
            ("targets", inp.targets),
            ("positions", inp.positions),
            ("seg_start", inp.seg_start),
        ] {
            if v.len() != n {
                return bad(format!(
                    "step input {what} has {} values, the graph takes {n} ({} × {})",
                    v.len(),
                    self.batch,
                    self.seq
                ));
            }
        }
        if let Some((i, &t)) = inp
            .tokens
            .iter()
            .enumerate()
            .find(|&(_, &t)| t as usize >= vocab)
        {
            return bad(format!(
                "token {i}: id {t} is outside the vocabulary of {vocab}"
            ));
        }
        for (i, (&p, &s)) in inp.positions.iter().zip(inp.seg_start).enumerate() {
            if p as usize >= self.seq || s as usize > i % self.seq {
                return bad(format!(
                    "token {i}: position {p} or segment start {s} out of range for sequences of {}",
                    self.seq
                ));
            }
        }
        Ok(())
    }

    /// Check one vector of `what` (parameters, moments) per parameter, each
    /// of the parameter's size.
    pub fn check_params(&self, params: &[Vec<f32>], what: &str) -> crate::Result<()> {
        if params.len() != self.params.len() {
            return Err(crate::Error::Invalid(format!(
                "{} {what} tensors given, the graph has {}",
                params.len(),
                self.params.len()
            )));
        }
        for (p, v) in self.params.iter().zip(params) {
            if v.len() != p.shape.numel() {
                return Err(crate::Error::Invalid(format!(
                    "{what} {} has {} values, expected {}",
                    p.name,
                    v.len(),
                    p.shape.numel()
                )));
            }
        }
        Ok(())
    }
}
