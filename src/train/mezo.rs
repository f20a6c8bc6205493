//! MeZO (Malladi et al., 2023, "Fine-Tuning Language Models with Just
//! Forward Passes"): a zeroth-order step that estimates the gradient's
//! projection on a random direction `z` from two forward passes,
//!
//! ```text
//! g = (L(θ + εz) − L(θ − εz)) / 2ε        θ ← θ − lr·(g·z + λ·θ)
//! ```
//!
//! with `z ~ N(0, I)` regenerated from a seed whenever it is needed, never
//! stored. No backward pass and no activations kept for one: the memory is
//! inference's, plus one copy of the trainable parameters (the perturbed
//! point is built beside θ, so θ is never rounded by perturbing and
//! restoring it, and a run stays exactly reproducible).

use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Hyper-parameters of MeZO.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MezoConfig {
    /// Perturbation size ε (the paper uses 1e-3).
    pub eps: f32,
    /// Decoupled weight decay λ.
    pub weight_decay: f32,
}

impl Default for MezoConfig {
    fn default() -> Self {
        MezoConfig {
            eps: 1e-3,
            weight_decay: 0.0,
        }
    }
}

/// What one MeZO step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MezoStep {
    /// Loss at θ + εz.
    pub loss_plus: f64,
    /// Loss at θ − εz.
    pub loss_minus: f64,
    /// The estimate of ∇L·z.
    pub projected_grad: f64,
    /// Whether θ was updated (not when a loss was non-finite).
    pub applied: bool,
}

/// Visit `z` of `seed` for parameters of `sizes`: `f(tensor, index, z)`.
/// Each tensor draws from its own stream, so a tensor's `z` does not
/// depend on the others'.
fn for_each_z(seed: u64, sizes: &[usize], f: &mut dyn FnMut(usize, usize, f32)) {
    for (t, &n) in sizes.iter().enumerate() {
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut i = 0;
        while i < n {
            // Box–Muller: two standard normals from two uniforms in (0, 1].
            let u1 = 1.0 - rng.random::<f64>();
            let u2 = rng.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
            f(t, i, (r * c) as f32);
            if i + 1 < n {
                f(t, i + 1, (r * s) as f32);
            }
            i += 2;
        }
    }
}

/// The direction `z` of `seed` for parameters of `sizes` (for tests and
/// analysis; a step regenerates it instead of holding it).
pub fn direction(seed: u64, sizes: &[usize]) -> Vec<Vec<f32>> {
    let mut z: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    for_each_z(seed, sizes, &mut |t, i, v| z[t][i] = v);
    z
}

/// `out = θ + scale·z` for the direction of `seed`.
fn shifted(params: &[Vec<f32>], seed: u64, scale: f32, out: &mut Vec<Vec<f32>>) {
    out.resize_with(params.len(), Vec::new);
    for (o, p) in out.iter_mut().zip(params) {
        o.clear();
        o.extend_from_slice(p);
    }
    let sizes: Vec<usize> = params.iter().map(Vec::len).collect();
    for_each_z(seed, &sizes, &mut |t, i, z| out[t][i] += scale * z);
}

/// One MeZO step on `params` with learning rate `lr` and direction seed
/// `seed`; `loss(θ)` runs the forward passes of the step's batch at θ and
/// returns the mean loss. `scratch` holds the perturbed point between calls.
pub fn mezo_step(
    params: &mut [Vec<f32>],
    scratch: &mut Vec<Vec<f32>>,
    cfg: &MezoConfig,
    lr: f32,
    seed: u64,
    loss: &mut dyn FnMut(&[Vec<f32>]) -> Result<f64>,
) -> Result<MezoStep> {
    if !(cfg.eps > 0.0 && cfg.eps.is_finite()) {
        return Err(Error::Invalid(format!(
            "the MeZO perturbation must be a finite number > 0, got {}",
            cfg.eps
        )));
    }
    shifted(params, seed, cfg.eps, scratch);
    let loss_plus = loss(scratch)?;
    shifted(params, seed, -cfg.eps, scratch);
    let loss_minus = loss(scratch)?;
    let projected_grad = (loss_plus - loss_minus) / (2.0 * f64::from(cfg.eps));
    let applied = projected_grad.is_finite();
    if applied {
        let g = projected_grad as f32;
        let sizes: Vec<usize> = params.iter().map(Vec::len).collect();
        let decay = 1.0 - lr * cfg.weight_decay;
        if decay != 1.0 {
            params.iter_mut().flatten().for_each(|p| *p *= decay);
        }
        for_each_z(seed, &sizes, &mut |t, i, z| params[t][i] -= lr * g * z);
    }
    Ok(MezoStep {
        loss_plus,
        loss_minus,
        projected_grad,
        applied,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::train::CpuStep;
    use crate::graph::testing::{inputs, tiny_batch};
    use crate::graph::{DecoderGraph, MemoryPlan, autodiff};
    use crate::model::Model;
    use crate::model::tiny::{Cfg, values, write_model};
    use crate::peft::Method;
    use crate::peft::lora::{Lora, LoraConfig};
    use crate::quant::GgmlType;

    #[test]
    fn directions_are_standard_normal_and_reproducible() {
        let z = direction(7, &[10_000, 3]);
        assert_eq!(z, direction(7, &[10_000, 3]));
        assert_ne!(z, direction(8, &[10_000, 3]));
        // A tensor's values do not depend on the tensors around it.
        assert_eq!(direction(7, &[10_000])[0], z[0]);
        let n = z[0].len() as f64;
        let mean = z[0].iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = z[0]
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {mean}, variance {var}"
        );
    }

    /// A tiny llama with LoRA whose B is not zero, its batch, and the
    /// forward-only and training steps over it.
    fn tiny() -> (tempfile::TempDir, Cfg) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Cfg::llama(GgmlType::F32, 2);
        write_model(&cfg, &dir.path().join("tiny.gguf"));
        (dir, cfg)
    }

    #[test]
    fn the_estimate_matches_the_directional_derivative_and_training_lowers_the_loss() {
        let (dir, cfg) = tiny();
        let model = Model::open(dir.path().join("tiny.gguf")).unwrap();
        let spec = model.spec();
        let lora_cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            ..LoraConfig::default()
        };
        let lora = Lora::new(lora_cfg, spec.layers.len()).unwrap();
        let forward = DecoderGraph::build(spec, 2, 8, &lora);
        let mut train = forward.clone();
        autodiff::differentiate(&mut train).unwrap();
        let mut params = lora.init(&forward, 3);
        for (p, v) in forward.params.iter().zip(params.iter_mut()) {
            if p.name.ends_with("lora_b") {
                *v = values(p.tensor as u64, v.len(), 0.3);
            }
        }
        let batch = tiny_batch(cfg.n_vocab as u32);
        let mut fwd = CpuStep::new(&model, forward.clone(), MemoryPlan::new(&forward), 2).unwrap();
        let mut loss = |p: &[Vec<f32>]| -> Result<f64> {
            let (sum, count) = fwd.run(&inputs(&batch, 0.0), p)?;
            Ok(sum / count as f64)
        };
        // The true gradient, from the backward pass.
        let mut back = CpuStep::new(&model, train.clone(), MemoryPlan::new(&train), 2).unwrap();
        let (_, count) = back.run(&inputs(&batch, 1.0), &params).unwrap();
        back.run(&inputs(&batch, 1.0 / count as f32), &params)
            .unwrap();
        let sizes: Vec<usize> = params.iter().map(Vec::len).collect();
        let cfg_m = MezoConfig {
            eps: 1e-3,
            weight_decay: 0.0,
        };
        let mut scratch = Vec::new();
        for seed in [1, 2, 3] {
            let z = direction(seed, &sizes);
            let exact: f64 = (0..params.len())
                .map(|i| {
                    back.grad(i)
                        .iter()
                        .zip(&z[i])
                        .map(|(&g, &z)| f64::from(g) * f64::from(z))
                        .sum::<f64>()
                })
                .sum();
            let mut p = params.clone();
            let s = mezo_step(&mut p, &mut scratch, &cfg_m, 0.0, seed, &mut loss).unwrap();
            assert_eq!(p, params, "lr 0 leaves θ bit for bit");
            let err = (s.projected_grad - exact).abs() / exact.abs().max(1e-3);
            assert!(
                err < 5e-3,
                "seed {seed}: MeZO {} vs ∇L·z {exact}",
                s.projected_grad
            );
        }
        // Training with forward passes alone lowers the loss.
        let start = loss(&params).unwrap();
        for step in 0..60 {
            mezo_step(
                &mut params,
                &mut scratch,
                &cfg_m,
                2e-3,
                100 + step,
                &mut loss,
            )
            .unwrap();
        }
        let end = loss(&params).unwrap();
        // (5.08 → 2.89 when written.)
        assert!(end < start - 1.0, "loss {start} → {end}");
    }
}
