//! Parameter-efficient fine-tuning methods.
//!
//! A method is a set of trainable tensors plus the rewrite it makes to the
//! forward graph around frozen ops ([`GraphHook`]): LoRA adds a low-rank
//! product beside a frozen linear, (IA)³ rescales its output, norm tuning
//! rescales a norm. Each method lives in its own file; the trainer sees only
//! the [`Method`] trait, so a new method is a new file plus a line in
//! [`build`]. Several methods in one run are a [`Hybrid`].
//!
//! What a trained method does at inference is a list of [`Effect`]s per
//! frozen tensor ([`Method::effects`]), which the decoders apply and the
//! adapter files store.

pub mod adapter;
pub mod dora;
pub mod ia3;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod norm;
pub mod pissa;
pub mod prefix;
pub mod prompt;
pub mod svd;
#[cfg(test)]
pub(crate) mod tests;
pub mod vera;
pub mod weights;

use crate::graph::Target;
use crate::graph::{Graph, GraphHook, LinearSite, NormSite, Param, SublayerSite, TensorId};
use crate::model::{Activation, Model, Weight};
use crate::{Error, Result};
use lora::LoraConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
pub use weights::AdapterWeights;

/// A PEFT method: how it rewrites the graph, how its parameters start and
/// how fast each learns, and what it does at inference.
pub trait Method: GraphHook + Send + Sync {
    /// The method's name (`lora`, …).
    fn name(&self) -> &'static str;

    /// Whether parameter `name` is this method's.
    fn owns(&self, name: &str) -> bool;

    /// The initial value of parameter `p` (one of this method's), drawing
    /// from `rng` where it is random.
    fn init_param(&self, p: &Param, rng: &mut ChaCha8Rng) -> Vec<f32>;

    /// Initial values of every parameter of `g` (built with this method), in
    /// the order of `g.params`, drawn deterministically from `seed`.
    fn init(&self, g: &Graph, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        g.params
            .iter()
            .map(|p| self.init_param(p, &mut rng))
            .collect()
    }

    /// Learning-rate multiplier of parameter `name` (1 for most; LoRA+ gives
    /// the B matrices a larger rate).
    fn lr_multiplier(&self, name: &str) -> f32 {
        let _ = name;
        1.0
    }

    /// What the trained parameters (`params`: name → values, every
    /// parameter of this method) do at inference, per frozen tensor of
    /// `model`, in the order the graph applies them.
    fn effects(&self, params: &ParamMap, model: &Model) -> Result<Vec<(String, Effect)>>;
}

/// Parameters by name.
pub type ParamMap = std::collections::HashMap<String, Vec<f32>>;

/// The values of parameter `name`, or an error naming it.
pub fn param<'a>(params: &'a ParamMap, name: &str) -> Result<&'a [f32]> {
    params
        .get(name)
        .map(Vec::as_slice)
        .ok_or_else(|| Error::Invalid(format!("adapter tensor {name} is missing")))
}

/// What a trained method does to one frozen tensor at inference.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// `y += (x·Aᵀ)·Bᵀ` after the linear, with `a (rank, in)` carrying the
    /// scale and `b (out, rank)`.
    LowRank {
        /// Rank.
        rank: usize,
        /// `(rank, in)`.
        a: Vec<f32>,
        /// `(out, rank)`.
        b: Vec<f32>,
    },
    /// `y += x·Δᵀ` after the linear.
    Dense {
        /// `out`.
        rows: usize,
        /// `in`.
        cols: usize,
        /// `Δ (out, in)`.
        delta: Vec<f32>,
    },
    /// `y ⊙= v` after the linear (`v (out)`).
    OutScale(Vec<f32>),
    /// `x ⊙= v` before the linear (`v (in)`).
    InScale(Vec<f32>),
    /// `y ⊙= v` after the norm of this weight (`v` its width).
    NormScale(Vec<f32>),
    /// A bottleneck adapter on the sublayer whose output projection this
    /// is: `y += scale·U·act(D·src)`, `src` its output (serial) or its
    /// normalized input (parallel).
    Bottleneck {
        /// Width `r`.
        size: usize,
        /// `D (r, C)`.
        down: Vec<f32>,
        /// `U (C, r)`.
        up: Vec<f32>,
        /// Output multiplier.
        scale: f32,
        /// Reads the sublayer's input (else its output).
        parallel: bool,
        /// The activation.
        act: Activation,
    },
    /// `rows` virtual rows before every sequence: of the embeddings
    /// (prompt tuning, on the token embedding table) or of a layer's keys or
    /// values in the cache (prefix tuning, on `attn_k` / `attn_v`).
    Prefix {
        /// Virtual tokens.
        rows: usize,
        /// `(rows, width)`.
        values: Vec<f32>,
    },
}

impl Effect {
    /// Short name, as in adapter files.
    pub fn kind(&self) -> &'static str {
        match self {
            Effect::LowRank { .. } => "low_rank",
            Effect::Dense { .. } => "dense",
            Effect::OutScale(_) => "out_scale",
            Effect::InScale(_) => "in_scale",
            Effect::NormScale(_) => "norm_scale",
            Effect::Prefix { .. } => "prefix",
            Effect::Bottleneck { .. } => "bottleneck",
        }
    }

    /// Whether the effect only adds a term beside the frozen product (what
    /// a batch of requests with different adapters can share a product with).
    pub fn is_additive(&self) -> bool {
        matches!(self, Effect::LowRank { .. } | Effect::Dense { .. })
    }
}

/// The PEFT methods, as `--method` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MethodKind {
    /// LoRA.
    Lora,
    /// DoRA: LoRA's direction with a learned magnitude per output.
    Dora,
    /// VeRA: frozen shared random projections, trained scaling vectors.
    Vera,
    /// PiSSA: LoRA started at the principal singular vectors.
    Pissa,
    /// LoHa: Hadamard product of two low-rank products.
    Loha,
    /// LoKr: Kronecker product of a small matrix and a low-rank product.
    Lokr,
    /// (IA)³: learned rescaling of keys, values and the FFN's inner activation.
    Ia3,
    /// Norm tuning: train the RMSNorm weights.
    Norm,
    /// Prompt tuning: trained virtual-token embeddings before every sequence.
    Prompt,
    /// Prefix tuning: trained key/value rows before every layer's sequence.
    Prefix,
    /// Serial bottleneck adapters after each sublayer (Houlsby).
    Adapter,
    /// Parallel bottleneck adapters beside the feed-forward sublayer (He et al.).
    ParallelAdapter,
}

impl MethodKind {
    /// Every method, in `--help` order.
    pub const ALL: [MethodKind; 12] = [
        MethodKind::Lora,
        MethodKind::Dora,
        MethodKind::Vera,
        MethodKind::Pissa,
        MethodKind::Loha,
        MethodKind::Lokr,
        MethodKind::Ia3,
        MethodKind::Norm,
        MethodKind::Prompt,
        MethodKind::Prefix,
        MethodKind::Adapter,
        MethodKind::ParallelAdapter,
    ];

    /// The `--method` name.
    pub fn name(self) -> &'static str {
        match self {
            MethodKind::Lora => "lora",
            MethodKind::Dora => "dora",
            MethodKind::Vera => "vera",
            MethodKind::Pissa => "pissa",
            MethodKind::Loha => "loha",
            MethodKind::Lokr => "lokr",
            MethodKind::Ia3 => "ia3",
            MethodKind::Norm => "norm",
            MethodKind::Prompt => "prompt",
            MethodKind::Prefix => "prefix",
            MethodKind::Adapter => "adapter",
            MethodKind::ParallelAdapter => "parallel-adapter",
        }
    }

    /// Whether the method reparameterizes the adapted linears (at most one
    /// such method per run: they would share the sites).
    pub fn is_reparameterized(self) -> bool {
        matches!(
            self,
            MethodKind::Lora
                | MethodKind::Dora
                | MethodKind::Vera
                | MethodKind::Pissa
                | MethodKind::Loha
                | MethodKind::Lokr
        )
    }
}

impl fmt::Display for MethodKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MethodKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<MethodKind> {
        let s = s.trim();
        MethodKind::ALL
            .into_iter()
            .find(|k| k.name() == s || (s == "ia³" && *k == MethodKind::Ia3))
            .ok_or_else(|| {
                let names: Vec<&str> = MethodKind::ALL.iter().map(|k| k.name()).collect();
                Error::Invalid(format!(
                    "unknown method '{s}': expected one of {} (comma-separated for several)",
                    names.join(", ")
                ))
            })
    }
}

/// The methods of a run and the settings only some of them have (the
/// low-rank ones share [`LoraConfig`]: rank, alpha, targets, layers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodSpec {
    /// The methods, applied in this order.
    pub kinds: Vec<MethodKind>,
    /// VeRA: initial value of the scaling vector `d` (PEFT's `d_initial`).
    pub vera_d_init: f32,
    /// VeRA: seed of the shared random projections.
    pub vera_seed: u64,
    /// (IA)³: the projections rescaled (the FFN's down projection is
    /// rescaled at its input, the others at their output).
    pub ia3_targets: Vec<Target>,
    /// PiSSA: subspace iterations of the randomized SVD.
    pub pissa_iters: usize,
    /// Prompt and prefix tuning: virtual tokens.
    pub virtual_tokens: usize,
    /// Bottleneck adapters: width.
    pub adapter_size: usize,
    /// Prompt and prefix tuning: the text whose tokens start the virtual
    /// tokens (repeated to their number); `None`: a vocabulary sample.
    pub prompt_init: Option<String>,
}

impl Default for MethodSpec {
    fn default() -> Self {
        MethodSpec {
            kinds: vec![MethodKind::Lora],
            vera_d_init: 0.1,
            vera_seed: 0,
            ia3_targets: vec![Target::AttnK, Target::AttnV, Target::FfnDown],
            pissa_iters: 4,
            virtual_tokens: 16,
            adapter_size: 64,
            prompt_init: None,
        }
    }
}

impl MethodSpec {
    /// `lora`, `lora+ia3`, ….
    pub fn label(&self) -> String {
        let names: Vec<&str> = self.kinds.iter().map(|k| k.name()).collect();
        names.join("+")
    }

    /// Parse `--method lora,ia3`.
    pub fn parse_kinds(s: &str) -> Result<Vec<MethodKind>> {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(MethodKind::from_str)
            .collect()
    }

    /// Check the values a user can get wrong, naming the option.
    pub fn validate(&self) -> Result<()> {
        if self.kinds.is_empty() {
            return Err(Error::Invalid("--method names no method".into()));
        }
        for (i, k) in self.kinds.iter().enumerate() {
            if self.kinds[..i].contains(k) {
                return Err(Error::Invalid(format!("--method names {k} twice")));
            }
        }
        let rep: Vec<&str> = self
            .kinds
            .iter()
            .filter(|k| k.is_reparameterized())
            .map(|k| k.name())
            .collect();
        if rep.len() > 1 {
            return Err(Error::Invalid(format!(
                "--method: {} each rewrite the same linears; use one of them (with ia3 or norm \
                 beside it if you like)",
                rep.join(" and ")
            )));
        }
        if !self.vera_d_init.is_finite() {
            return Err(Error::Invalid("vera_d_init must be a finite number".into()));
        }
        if self.ia3_targets.is_empty() {
            return Err(Error::Invalid("ia3_targets names no projection".into()));
        }
        if self.kinds.contains(&MethodKind::Prompt) && self.kinds.contains(&MethodKind::Prefix) {
            return Err(Error::Invalid(
                "--method: prompt and prefix each put virtual tokens first; use one of them".into(),
            ));
        }
        if self.adapter_size == 0 {
            return Err(Error::Invalid("--adapter-size must be at least 1".into()));
        }
        if self.virtual_tokens == 0 {
            return Err(Error::Invalid("--virtual-tokens must be at least 1".into()));
        }
        if self.pissa_iters == 0 {
            return Err(Error::Invalid("pissa_iters must be at least 1".into()));
        }
        Ok(())
    }
}

/// The method (or [`Hybrid`]) `spec` describes, with the low-rank settings
/// `lora`, for `model` (DoRA and PiSSA read its weights).
pub fn build(spec: &MethodSpec, lora: &LoraConfig, model: &Model) -> Result<Box<dyn Method>> {
    spec.validate()?;
    let n_layers = model.spec().layers.len();
    lora.validate(n_layers)?;
    let mut methods: Vec<Box<dyn Method>> = Vec::new();
    for k in &spec.kinds {
        methods.push(match k {
            MethodKind::Lora => Box::new(lora::Lora::new(lora.clone(), n_layers)?),
            MethodKind::Dora => Box::new(dora::Dora::new(lora.clone(), model)?),
            MethodKind::Vera => Box::new(vera::Vera::new(lora.clone(), spec, model.spec())?),
            MethodKind::Pissa => Box::new(pissa::Pissa::new(lora.clone(), spec, model)?),
            MethodKind::Loha => Box::new(loha::Loha::new(lora.clone(), n_layers)?),
            MethodKind::Lokr => Box::new(lokr::Lokr::new(lora.clone(), n_layers)?),
            MethodKind::Ia3 => Box::new(ia3::Ia3::new(
                spec.ia3_targets.clone(),
                lora.layers,
                n_layers,
            )),
            MethodKind::Norm => Box::new(norm::NormTuning::new(lora.layers, n_layers)),
            MethodKind::Prompt => Box::new(prompt::PromptTuning::new(spec, model)?),
            MethodKind::Prefix => Box::new(prefix::PrefixTuning::new(spec, model)?),
            MethodKind::Adapter => Box::new(adapter::Bottleneck::new(
                false,
                spec.adapter_size,
                lora.layers,
                model,
            )),
            MethodKind::ParallelAdapter => Box::new(adapter::Bottleneck::new(
                true,
                spec.adapter_size,
                lora.layers,
                model,
            )),
        });
    }
    Ok(if methods.len() == 1 {
        methods.pop().expect("one method")
    } else {
        Box::new(Hybrid { methods })
    })
}

/// Several methods in one run: each hook runs in turn, in the order given.
pub struct Hybrid {
    /// The methods.
    pub methods: Vec<Box<dyn Method>>,
}

impl GraphHook for Hybrid {
    fn linear_input(&self, g: &mut Graph, site: &LinearSite, x: TensorId) -> TensorId {
        self.methods
            .iter()
            .fold(x, |x, m| m.linear_input(g, site, x))
    }

    fn linear(&self, g: &mut Graph, site: &LinearSite, x: TensorId, y: TensorId) -> TensorId {
        self.methods.iter().fold(y, |y, m| m.linear(g, site, x, y))
    }

    fn norm(&self, g: &mut Graph, site: &NormSite, y: TensorId) -> TensorId {
        self.methods.iter().fold(y, |y, m| m.norm(g, site, y))
    }

    fn virtual_tokens(&self) -> usize {
        self.methods
            .iter()
            .map(|m| m.virtual_tokens())
            .max()
            .unwrap_or(0)
    }

    fn sublayer(&self, g: &mut Graph, site: &SublayerSite, x: TensorId, y: TensorId) -> TensorId {
        self.methods
            .iter()
            .fold(y, |y, m| m.sublayer(g, site, x, y))
    }

    fn embed(&self, g: &mut Graph, x: TensorId) -> TensorId {
        self.methods.iter().fold(x, |x, m| m.embed(g, x))
    }

    fn attention_kv(
        &self,
        g: &mut Graph,
        layer: usize,
        k: TensorId,
        v: TensorId,
    ) -> (TensorId, TensorId) {
        self.methods
            .iter()
            .fold((k, v), |(k, v), m| m.attention_kv(g, layer, k, v))
    }
}

impl Hybrid {
    fn owner(&self, name: &str) -> Option<&dyn Method> {
        self.methods.iter().find(|m| m.owns(name)).map(|m| &**m)
    }
}

impl Method for Hybrid {
    fn name(&self) -> &'static str {
        "hybrid"
    }

    fn owns(&self, name: &str) -> bool {
        self.owner(name).is_some()
    }

    fn init_param(&self, p: &Param, rng: &mut ChaCha8Rng) -> Vec<f32> {
        match self.owner(&p.name) {
            Some(m) => m.init_param(p, rng),
            None => vec![0.0; p.shape.numel()],
        }
    }

    fn lr_multiplier(&self, name: &str) -> f32 {
        self.owner(name).map_or(1.0, |m| m.lr_multiplier(name))
    }

    fn effects(&self, params: &ParamMap, model: &Model) -> Result<Vec<(String, Effect)>> {
        let mut all = Vec::new();
        for m in &self.methods {
            let own: ParamMap = params
                .iter()
                .filter(|(n, _)| m.owns(n))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            all.extend(m.effects(&own, model)?);
        }
        Ok(all)
    }
}

/// `n` values Kaiming-uniform with a = √5 for a fan-in of `fan_in`
/// (PyTorch's `nn.Linear` default, as PEFT initializes): U(±1/√fan_in).
pub(crate) fn kaiming(n: usize, fan_in: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
}

/// The frozen weight `w` of `model` decoded to f32, row-major `(rows, cols)`.
pub(crate) fn dequantize(model: &Model, w: &Weight) -> Result<Vec<f32>> {
    let q = crate::backend::cpu::matmul::QMatrix::new(w.ty, w.rows, w.cols, model.data(w))?;
    let mut out = vec![0.0; w.rows * w.cols];
    use rayon::prelude::*;
    out.par_chunks_mut(w.cols)
        .enumerate()
        .for_each(|(r, row)| q.dequantize_row(r, row));
    Ok(out)
}

/// Every adapted linear of `model` under `cfg`'s targets and layers.
pub(crate) fn sites<'m>(
    cfg: &LoraConfig,
    model: &'m Model,
) -> impl Iterator<Item = (usize, Target, &'m Weight)> + 'm {
    let n_layers = model.spec().layers.len();
    let cfg = cfg.clone();
    model
        .spec()
        .layers
        .iter()
        .enumerate()
        .flat_map(|(li, l)| Target::ALL.into_iter().map(move |t| (li, t, t.weight(l))))
        .filter(move |&(li, t, _)| cfg.selects(n_layers, li, t))
}
