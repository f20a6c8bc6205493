//! LoRA (Hu et al., 2021): beside a frozen linear `y = x·Wᵀ`, a trainable
//! low-rank update `y += s · (dropout(x)·Aᵀ)·Bᵀ` with `A (r, in)`,
//! `B (out, r)` and `s = α/r` (or `α/√r` with rsLoRA). `A` starts
//! Kaiming-uniform and `B` at zero, so training starts from the base model.

use super::Method;
use crate::graph::{Graph, GraphHook, LinearSite, Op, Phase, Shape, Target, TensorId};
use crate::{Error, Result};
use rand::{Rng, SeedableRng};
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
        let in_layers = match self.config.layers {
            LayerSelection::All => true,
            LayerSelection::Last(n) => layer + n >= self.n_layers,
        };
        in_layers && self.config.targets.contains(&target)
    }
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
        let n = g.shape(x).rows;
        let at = Some(site.layer);
        let fw = Phase::Forward;
        let a = g.param(param_name(&w.name, "a"), Shape::new(r, w.cols));
        let b = g.param(param_name(&w.name, "b"), Shape::new(w.rows, r));
        let mut xin = x;
        if self.config.dropout > 0.0 {
            let site_id = (site.layer * 8 + site.target as usize) as u32;
            let op = Op::Dropout {
                p: self.config.dropout,
                site: site_id,
            };
            xin = g.push(op, &[x], &[("lora_dropout", g.shape(x))], at, fw)[0];
        }
        // y + s·(x·Aᵀ)·Bᵀ, with the scale on the narrow (N, r) product.
        let h = g.push(
            Op::MatmulT,
            &[xin, a],
            &[("lora_h", Shape::new(n, r))],
            at,
            fw,
        )[0];
        let s = self.config.scale();
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
            &[("lora_y", Shape::new(n, w.rows))],
            at,
            fw,
        )[0]
    }
}

impl Method for Lora {
    fn name(&self) -> &'static str {
        "lora"
    }

    fn init(&self, g: &Graph, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        g.params
            .iter()
            .map(|p| {
                if p.name.ends_with(".lora_a") {
                    // Kaiming-uniform with a = √5, as PyTorch's nn.Linear and
                    // PEFT: bound = 1/√fan_in.
                    let bound = 1.0 / (p.shape.cols as f32).sqrt();
                    (0..p.shape.numel())
                        .map(|_| rng.random_range(-bound..bound))
                        .collect()
                } else {
                    vec![0.0; p.shape.numel()]
                }
            })
            .collect()
    }

    fn lr_multiplier(&self, name: &str) -> f32 {
        if name.ends_with(".lora_b") {
            self.config.lr_ratio_b
        } else {
            1.0
        }
    }
}

/// A LoRA adapter loaded for inference: `out += s·(x·Aᵀ)·Bᵀ` after each
/// adapted frozen linear, keyed by the base tensor's name.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    by_base: std::collections::HashMap<String, LoraDelta>,
}

#[derive(Debug, Clone)]
struct LoraDelta {
    rank: usize,
    n_in: usize,
    n_out: usize,
    /// `(rank, n_in)`, pre-multiplied by the scale.
    a: Vec<f32>,
    /// `(n_out, rank)`.
    b: Vec<f32>,
}

impl LoraWeights {
    /// Take the pairs of `file`, each scaled by the file's scale times
    /// `strength` (1 for the adapter as trained). `check_base` has verified
    /// names and shapes against the base model.
    pub fn new(file: &crate::export::gguf_lora::LoraFile, strength: f32) -> LoraWeights {
        let s = file.scale() * strength;
        let by_base = file
            .pairs
            .iter()
            .map(|p| {
                let delta = LoraDelta {
                    rank: file.rank,
                    n_in: p.n_in,
                    n_out: p.n_out,
                    a: p.a.iter().map(|v| v * s).collect(),
                    b: p.b.clone(),
                };
                (p.base.clone(), delta)
            })
            .collect();
        LoraWeights { by_base }
    }

    /// Number of adapted tensors.
    pub fn len(&self) -> usize {
        self.by_base.len()
    }

    /// Whether no tensor is adapted.
    pub fn is_empty(&self) -> bool {
        self.by_base.is_empty()
    }

    /// Whether the base tensor named `base` is adapted.
    pub fn adapts(&self, base: &str) -> bool {
        self.by_base.contains_key(base)
    }

    /// `out (n, n_out) += s·(x·Aᵀ)·Bᵀ` for `x (n, n_in)` when `base` is adapted.
    pub fn apply(&self, base: &str, x: &[f32], out: &mut [f32]) {
        self.apply_with(base, x, out, false)
    }

    /// [`LoraWeights::apply`]; `invariant` computes each row's products
    /// exactly as it would alone (see [`crate::backend::cpu::invariant`]).
    pub fn apply_with(&self, base: &str, x: &[f32], out: &mut [f32], invariant: bool) {
        use crate::backend::cpu::gemm::{Operand, matmul_into};
        use crate::backend::cpu::invariant;
        let Some(d) = self.by_base.get(base) else {
            return;
        };
        let n = x.len() / d.n_in;
        let mut h = vec![0.0; n * d.rank];
        if invariant {
            invariant::matmul_f32(x, &d.a, d.n_in, &mut h, false);
            invariant::matmul_f32(&h, &d.b, d.rank, out, true);
            return;
        }
        matmul_into(
            n,
            d.rank,
            d.n_in,
            Operand::new(x, d.n_in),
            Operand::new(&d.a, d.n_in).t(),
            &mut h,
            d.rank,
            false,
            1,
        );
        let b = Operand::new(&d.b, d.rank).t();
        matmul_into(
            n,
            d.n_out,
            d.rank,
            Operand::new(&h, d.rank),
            b,
            out,
            d.n_out,
            true,
            1,
        );
    }
}
