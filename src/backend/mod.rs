//! Backends that execute model ops, and the interface the inference and
//! training code drives them through: a [`Decoder`] (a model prepared on a
//! device) opens [`Session`]s (a KV cache and working memory on that device).

pub mod cpu;
pub mod gpu;
mod pick;

pub use pick::{Pick, argmax, draw_sorted};

use crate::Result;
use crate::model::DecoderSpec;
use crate::quant::GgmlType;

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's: `(1, n_vocab)`.
    Last,
    /// Every token's: `(n_tok, n_vocab)`.
    All,
}

/// A model prepared to run on one device.
pub trait Decoder: Send + Sync {
    /// The model's description.
    fn spec(&self) -> &DecoderSpec;
    /// The device, for people: `cpu (2 threads)`, `gpu: NVIDIA … (Vulkan)`.
    fn device_name(&self) -> String;
    /// `"cpu"` or `"gpu"`.
    fn backend(&self) -> &'static str;
    /// An empty session (KV cache and working memory) for up to `capacity` tokens.
    fn session(&self, capacity: usize) -> Result<Box<dyn Session + '_>>;
    /// Seconds one product `y = x·Wᵀ` of `n_tok` tokens takes on this device,
    /// `W` being `rows × cols` of type `ty` in GGUF layout (`data`); the
    /// median of `reps` runs after a warm-up.
    fn time_matmul(
        &self,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &[u8],
        n_tok: usize,
        reps: usize,
    ) -> Result<f64>;
}

/// A KV cache and its working memory on one device: tokens are appended by
/// forward passes.
pub trait Session {
    /// Tokens held.
    fn len(&self) -> usize;
    /// True when no token has been run.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Most tokens the session holds.
    fn capacity(&self) -> usize;
    /// Forget every token.
    fn clear(&mut self);
    /// Run `tokens` after those held (keys and values only; nothing returned).
    fn run(&mut self, tokens: &[u32]) -> Result<()>;
    /// Run `tokens` after those held and return logits.
    fn forward(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>>;
    /// Run `tokens` after those held and choose the next token from the last
    /// position's logits (on the GPU only the token comes back).
    fn forward_pick(&mut self, tokens: &[u32], pick: &Pick) -> Result<u32>;
    /// Run `tokens` after those held and return, for each position `p`, the
    /// negative log-likelihood of `targets[p]`.
    fn forward_nll(&mut self, tokens: &[u32], targets: &[u32]) -> Result<Vec<f64>>;
    /// Kernel launches of a one-token step (0 where the notion does not apply).
    fn dispatches_per_token(&self) -> usize {
        0
    }
}

/// Check that `tokens` is a non-empty run of ids in the vocabulary that fits
/// after `len` held tokens in `capacity`.
pub(crate) fn check_tokens(
    spec: &DecoderSpec,
    tokens: &[u32],
    len: usize,
    capacity: usize,
) -> Result<()> {
    use crate::Error;
    if tokens.is_empty() {
        return Err(Error::Invalid(
            "a forward pass needs at least one token".into(),
        ));
    }
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= spec.n_vocab) {
        return Err(Error::Invalid(format!(
            "token id {t} is outside the vocabulary (size {})",
            spec.n_vocab
        )));
    }
    if len + tokens.len() > capacity {
        return Err(Error::Invalid(format!(
            "{} tokens do not fit the context: {len} already held, capacity {capacity}",
            tokens.len()
        )));
    }
    Ok(())
}

/// One target per token, each in the vocabulary.
pub(crate) fn check_targets(s: &DecoderSpec, tokens: &[u32], targets: &[u32]) -> Result<()> {
    use crate::Error;
    if targets.len() != tokens.len() {
        return Err(Error::Invalid(format!(
            "{} targets for {} tokens",
            targets.len(),
            tokens.len()
        )));
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= s.n_vocab) {
        return Err(Error::Invalid(format!(
            "target id {t} is outside the vocabulary (size {})",
            s.n_vocab
        )));
    }
    Ok(())
}

/// A planned training step prepared on one device: runs forward, loss and
/// backward over the step's inputs and hands back parameter gradients.
pub trait TrainStep {
    /// `"cpu"` or `"gpu"`.
    fn backend(&self) -> &'static str;
    /// Run the step with `params[i]` as parameter `i`; returns (Σ NLL over
    /// targets, number of targets).
    fn run(
        &mut self,
        inputs: &crate::graph::StepInputs,
        params: &[Vec<f32>],
    ) -> Result<(f64, usize)>;
    /// Copy parameter `i`'s gradient into `out`; `accumulate` adds to it.
    fn read_grad(&self, i: usize, out: &mut [f32], accumulate: bool) -> Result<()>;
    /// Time per op kind since profiling was enabled, if the backend keeps it.
    fn profile(&self) -> Option<&cpu::train::StepProfile> {
        None
    }
    /// Start (or restart) per-op timing, where the backend supports it.
    fn enable_profile(&mut self) {}
    /// Device work items of one step (GPU dispatches; CPU: graph nodes).
    fn launches(&self) -> usize;
    /// The step with the optimizer on the device, where the backend has one:
    /// parameters and AdamW moments stay resident and
    /// [`gpu::GpuStep::train_step`] runs forward, backward, clipping and the
    /// update in one submission. `None`: the caller runs the optimizer on
    /// the host from [`TrainStep::read_grad`].
    fn fused_optimizer(&mut self) -> Option<&mut gpu::GpuStep> {
        None
    }
}

impl TrainStep for cpu::train::CpuStep<'_> {
    fn backend(&self) -> &'static str {
        "cpu"
    }
    fn run(
        &mut self,
        inputs: &crate::graph::StepInputs,
        params: &[Vec<f32>],
    ) -> Result<(f64, usize)> {
        cpu::train::CpuStep::run(self, inputs, params)
    }
    fn read_grad(&self, i: usize, out: &mut [f32], accumulate: bool) -> Result<()> {
        let g = self.grad(i);
        if accumulate {
            out.iter_mut().zip(g).for_each(|(a, b)| *a += b);
        } else {
            out.copy_from_slice(g);
        }
        Ok(())
    }
    fn profile(&self) -> Option<&cpu::train::StepProfile> {
        self.profile.as_ref()
    }
    fn enable_profile(&mut self) {
        self.profile = Some(Default::default());
    }
    fn launches(&self) -> usize {
        self.graph().nodes.len()
    }
}

impl TrainStep for gpu::GpuStep {
    fn backend(&self) -> &'static str {
        "gpu"
    }
    fn run(
        &mut self,
        inputs: &crate::graph::StepInputs,
        params: &[Vec<f32>],
    ) -> Result<(f64, usize)> {
        gpu::GpuStep::run(self, inputs, params)
    }
    fn read_grad(&self, i: usize, out: &mut [f32], accumulate: bool) -> Result<()> {
        let g = self.grad(i)?;
        if accumulate {
            out.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
        } else {
            out.copy_from_slice(&g);
        }
        Ok(())
    }
    fn launches(&self) -> usize {
        self.dispatches()
    }
    fn fused_optimizer(&mut self) -> Option<&mut gpu::GpuStep> {
        Some(self)
    }
}
