//! Everything a training run is configured with, checked before any work.

use super::budget::Recompute;
use super::optim::AdamWConfig;
use super::schedule::ScheduleKind;
use crate::peft::MethodSpec;
use crate::peft::lora::LoraConfig;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Duration {
    /// This many optimizer steps.
    Steps(u64),
    /// This many passes over the training examples (rounded up to steps).
    Epochs(f32),
}

/// How parameters are updated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Optimizer {
    /// AdamW on the gradients of a backward pass.
    AdamW,
    /// MeZO ([`super::mezo`]): two forward passes per step and no backward
    /// pass, so a step needs inference's memory; perturbation size `eps`.
    Mezo {
        /// Perturbation size ε.
        eps: f32,
    },
}

/// A training run's configuration. Saved in every checkpoint, so a resumed
/// run continues with exactly the same settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The PEFT method(s) trained.
    pub method: MethodSpec,
    /// Rank, alpha, targets and layers of the low-rank methods (and the
    /// layers of the others).
    pub lora: LoraConfig,
    /// Peak learning rate.
    pub lr: f32,
    /// Decay after warmup.
    pub schedule: ScheduleKind,
    /// Warmup steps (`None`: 5% of the run, at most 100).
    pub warmup: Option<u64>,
    /// Floor of the decay as a fraction of the peak.
    pub min_lr_ratio: f32,
    /// How parameters are updated.
    pub optimizer: Optimizer,
    /// AdamW moments and weight decay (MeZO uses the weight decay).
    pub adamw: AdamWConfig,
    /// Length of the run.
    pub duration: Duration,
    /// Sequences per optimizer step (before accumulation).
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Micro-batches summed per optimizer step.
    pub grad_accum: usize,
    /// Global-norm gradient clipping (0: off).
    pub max_grad_norm: f32,
    /// Fraction of the examples held out for evaluation (0: none).
    pub eval_split: f32,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Stop after this many evaluations without improvement (0: never).
    pub early_stop: u32,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: u64,
    /// Peak memory allowed, in bytes.
    pub memory_budget: Option<u64>,
    /// Layer recomputation.
    pub recompute: Recompute,
    /// Train on prompt and user tokens too.
    pub train_on_prompt: bool,
    /// Seed of initialization, shuffling, splits and dropout.
    pub seed: u64,
    /// CPU: the frozen weights' products in 8-bit integer arithmetic
    /// ([`CpuStep::set_fast`](crate::backend::cpu::train::CpuStep::set_fast)):
    /// forward inputs and backward output gradients rounded to 8 bits per
    /// block of 32, the backward's `Wᵀ` to 5 bits.
    pub fast: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            method: MethodSpec::default(),
            lora: LoraConfig::default(),
            lr: 2e-4,
            schedule: ScheduleKind::Cosine,
            warmup: None,
            min_lr_ratio: 0.0,
            optimizer: Optimizer::AdamW,
            adamw: AdamWConfig::default(),
            duration: Duration::Epochs(1.0),
            batch: 4,
            seq: 256,
            grad_accum: 1,
            max_grad_norm: 1.0,
            eval_split: 0.0,
            eval_every: 0,
            early_stop: 0,
            save_every: 0,
            memory_budget: None,
            recompute: Recompute::Auto,
            train_on_prompt: false,
            seed: 0,
            fast: false,
        }
    }
}

impl TrainConfig {
    /// Check the values a user can get wrong, naming the option.
    pub fn validate(&self) -> Result<()> {
        self.method.validate()?;
        let bad = |m: String| Err(Error::Invalid(m));
        if !self.lr.is_finite() || self.lr <= 0.0 {
            return bad(format!("--lr must be positive, got {}", self.lr));
        }
        if self.batch == 0 || self.grad_accum == 0 {
            return bad("--batch and --grad-accum must be at least 1".into());
        }
        if self.seq < 2 {
            return bad(format!("--seq must be at least 2 tokens, got {}", self.seq));
        }
        match self.duration {
            Duration::Steps(0) => return bad("--steps must be at least 1".into()),
            Duration::Epochs(e) if !e.is_finite() || e <= 0.0 => {
                return bad(format!("--epochs must be positive, got {e}"));
            }
            _ => {}
        }
        if !(0.0..1.0).contains(&self.eval_split) {
            return bad(format!(
                "--eval-split must be in [0, 1), got {}",
                self.eval_split
            ));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(format!(
                "--min-lr-ratio must be in [0, 1], got {}",
                self.min_lr_ratio
            ));
        }
        if let Optimizer::Mezo { eps } = self.optimizer {
            if !(eps.is_finite() && eps > 0.0) {
                return bad(format!("--mezo-eps must be a positive number, got {eps}"));
            }
            if self.lora.lr_ratio_b != 1.0 {
                return bad(
                    "--lora-plus-ratio applies to AdamW's per-matrix rates, not to --optimizer mezo"
                        .into(),
                );
            }
        }
        if !self.max_grad_norm.is_finite() || self.max_grad_norm < 0.0 {
            return bad(format!(
                "--max-grad-norm must be ≥ 0, got {}",
                self.max_grad_norm
            ));
        }
        Ok(())
    }
}
