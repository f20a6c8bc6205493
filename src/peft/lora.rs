//! LoRA (Hu et al., 2021): beside a frozen linear `y = x·Wᵀ`, a trainable
//! low-rank update `y += s · (dropout(x)·Aᵀ)·Bᵀ` with `A (r, in)`,
//! `B (out, r)` and `s = α/r` (or `α/√r` with rsLoRA). `A` starts
//! Kaiming-uniform and `B` at zero, so training starts from the base model.

use super::{Effect, Method, ParamMap};
use crate::graph::{Graph, GraphHook, LinearSite, Op, Param, Phase, Shape, Target, TensorId};
use crate::model::Model;
use crate::{Error, Result};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Which layers are adapted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerSelection {
    /// Every layer.
    All,
    /// The last `n` layers.
    Last(usize),
}

impl LayerSelection {
    /// Whether `layer` (of `n_layers`) is selected.
    pub fn contains(self, n_layers: usize, layer: usize) -> bool {
        match self {
            LayerSelection::All => true,
            LayerSelection::Last(n) => layer + n >= n_layers,
        }
    }
}

/// LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: usize,
    /// Scale numerator `α`.
    pub alpha: f32,
    /// Dropout on the adapter's input during training.
    pub dropout: f32,
    /// The projections adapted.
    pub targets: Vec<Target>,
    /// The layers adapted.
    pub layers: LayerSelection,
    /// rsLoRA: scale `α/√r` instead of `α/r`.
    pub rslora: bool,
    /// LoRA+: learning rate of `B` relative to `A` (1 = plain LoRA).
    pub lr_ratio_b: f32,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
            layers: LayerSelection::All,
            rslora: false,
            lr_ratio_b: 1.0,
        }
    }
}

impl LoraConfig {
    /// The multiplier `s` of the low-rank product.
    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }

    /// Whether `target` of `layer` (of `n_layers`) is adapted.
    pub fn selects(&self, n_layers: usize, layer: usize, target: Target) -> bool {
        self.layers.contains(n_layers, layer) && self.targets.contains(&target)
    }

    /// LoRA+: the learning-rate multiplier of parameter `name` (`B`'s
    /// ratio for a `….lora_b`, else 1).
    pub fn lr_multiplier(&self, name: &str) -> f32 {
        if name.ends_with(".lora_b") {
            self.lr_ratio_b
        } else {
            1.0
        }
    }

    /// Check the values a user can get wrong.
    pub fn validate(&self, n_layers: usize) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::Invalid("LoRA rank must be at least 1".into()));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(Error::Invalid(format!(
                "LoRA alpha must be positive, got {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Invalid(format!(
                "LoRA dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.targets.is_empty() {
            return Err(Error::Invalid("LoRA needs at least one target".into()));
        }
        if let LayerSelection::Last(n) = self.layers
            && (n == 0 || n > n_layers)
        {
            return Err(Error::Invalid(format!(
                "--layers {n}: the model has {n_layers} layers"
            )));
        }
        if !self.lr_ratio_b.is_finite() || self.lr_ratio_b <= 0.0 {
            return Err(Error::Invalid(
                "the LoRA+ learning-rate ratio must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// LoRA on a decoder with `n_layers` blocks.
#[derive(Debug, Clone)]
pub struct Lora {
    /// Hyper-parameters.
    pub config: LoraConfig,
    /// Blocks of the model.
    pub n_layers: usize,
}

impl Lora {
    /// LoRA with `config` for a model of `n_layers` blocks.
    pub fn new(config: LoraConfig, n_layers: usize) -> Result<Lora> {
        config.validate(n_layers)?;
        Ok(Lora { config, n_layers })
    }

    /// Whether `site` is adapted.
    pub fn adapts(&self, layer: usize, target: Target) -> bool {
        self.config.selects(self.n_layers, layer, target)
    }
}

/// The input of a low-rank term at `site`: `x`, through dropout when the
/// configuration has it (one mask per site and step).
pub(crate) fn dropped_input(
    g: &mut Graph,
    cfg: &LoraConfig,
    site: &LinearSite,
    x: TensorId,
) -> TensorId {
    if cfg.dropout <= 0.0 {
        return x;
    }
    let op = Op::Dropout {
        p: cfg.dropout,
        site: (site.layer * 8 + site.target as usize) as u32,
    };
    let shape = g.shape(x);
    g.push(
        op,
        &[x],
        &[("lora_dropout", shape)],
        Some(site.layer),
        Phase::Forward,
    )[0]
}

/// `y + s·(x·Aᵀ)·Bᵀ` for `a (r, in)`, `b (out, r)`, with the scale on the
/// narrow `(N, r)` product.
pub(crate) fn low_rank_term(
    g: &mut Graph,
    layer: usize,
    x: TensorId,
    y: TensorId,
    (a, b): (TensorId, TensorId),
    s: f32,
) -> TensorId {
    let (n, r, out) = (g.shape(x).rows, g.shape(a).rows, g.shape(b).rows);
    let at = Some(layer);
    let fw = Phase::Forward;
    let h = g.push(
        Op::MatmulT,
        &[x, a],
        &[("lora_h", Shape::new(n, r))],
        at,
        fw,
    )[0];
    let hs = g.push(
        Op::Scale { s },
        &[h],
        &[("lora_hs", Shape::new(n, r))],
        at,
        fw,
    )[0];
    g.push(
        Op::MatmulTAdd,
        &[y, hs, b],
        &[("lora_y", Shape::new(n, out))],
        at,
        fw,
    )[0]
}

/// Name of the A (`"a"`) or B matrix of a base weight, as in GGUF LoRA
/// files: `blk.0.attn_q.weight.lora_a`.
pub fn param_name(base: &str, which: &str) -> String {
    format!("{base}.lora_{which}")
}

impl GraphHook for Lora {
    fn linear(&self, g: &mut Graph, site: &LinearSite, x: TensorId, y: TensorId) -> TensorId {
        if !self.adapts(site.layer, site.target) {
            return y;
        }
        let (r, w) = (self.config.rank, site.weight);
        let a = g.param(param_name(&w.name, "a"), Shape::new(r, w.cols));
        let b = g.param(param_name(&w.name, "b"), Shape::new(w.rows, r));
        let xin = dropped_input(g, &self.config, site, x);
        low_rank_term(g, site.layer, xin, y, (a, b), self.config.scale())
    }
}

impl Method for Lora {
    fn name(&self) -> &'static str {
        "lora"
    }

    fn owns(&self, name: &str) -> bool {
        name.ends_with(".lora_a") || name.ends_with(".lora_b")
    }

    fn init_param(&self, p: &Param, rng: &mut ChaCha8Rng) -> Vec<f32> {
        if p.name.ends_with(".lora_a") {
            // Kaiming-uniform with a = √5, as PyTorch's nn.Linear and PEFT.
            super::kaiming(p.shape.numel(), p.shape.cols, rng)
        } else {
            vec![0.0; p.shape.numel()]
        }
    }

    fn lr_multiplier(&self, name: &str) -> f32 {
        self.config.lr_multiplier(name)
    }

    fn effects(&self, params: &ParamMap, _model: &Model) -> Result<Vec<(String, Effect)>> {
        low_rank_effects(params, self.config.rank, self.config.scale())
    }
}

/// The `base.lora_a` / `base.lora_b` pairs of `params` as low-rank effects
/// with scale `s`, in name order.
pub(crate) fn low_rank_effects(
    params: &ParamMap,
    rank: usize,
    s: f32,
) -> Result<Vec<(String, Effect)>> {
    let mut bases: Vec<&str> = params
        .keys()
        .filter_map(|n| n.strip_suffix(".lora_a"))
        .collect();
    bases.sort_unstable();
    bases
        .into_iter()
        .map(|base| {
            let a = super::param(params, &param_name(base, "a"))?;
            let b = super::param(params, &param_name(base, "b"))?.to_vec();
            let a = a.iter().map(|v| v * s).collect();
            Ok((base.to_string(), Effect::LowRank { rank, a, b }))
        })
        .collect()
}
