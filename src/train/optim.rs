//! AdamW with decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight
//! Decay Regularization", 2019), plus gradient-norm clipping helpers.
//!
//! Per element, at step `t` (1-based, counted by the `step` field of [`AdamWState`]):
//!
//! ```text
//! m = β1·m + (1-β1)·g
//! v = β2·v + (1-β2)·g²
//! m̂ = m / (1-β1^t)        v̂ = v / (1-β2^t)
//! p -= lr·(m̂/(√v̂ + ε) + wd·p)
//! ```
//!
//! The decay is scaled by the learning rate (as PyTorch's `torch.optim.AdamW`),
//! so a schedule that lowers `lr` lowers the decay with it. Each parameter
//! tensor has its own learning rate: LoRA+ trains `B` with a larger one than `A`.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters other than the learning rate (which comes per step, per tensor).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Decay of the first-moment average (default 0.9).
    pub beta1: f32,
    /// Decay of the second-moment average (default 0.999).
    pub beta2: f32,
    /// Added to `√v̂` in the denominator (default 1e-8).
    pub eps: f32,
    /// Decoupled weight decay, multiplied by the learning rate (default 0.0).
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The optimizer's moments: one `m` and one `v` vector per parameter tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWState {
    /// Steps taken so far (the `t` of the bias corrections is `step` after the increment).
    pub step: u64,
    /// First moments, `m[i].len()` = size of parameter tensor `i`.
    pub m: Vec<Vec<f32>>,
    /// Second moments, same shapes as `m`.
    pub v: Vec<Vec<f32>>,
}

/// Tensors smaller than this are updated on the calling thread: a rayon task
/// costs more than the arithmetic.
const PAR_MIN_ELEMENTS: usize = 1 << 14;

impl AdamWState {
    /// Zeroed moments for parameter tensors of the given sizes, at step 0.
    pub fn new(sizes: &[usize]) -> AdamWState {
        AdamWState {
            step: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One update of every parameter tensor; `lrs[i]` is tensor `i`'s learning rate.
    /// Increments the `step` field once.
    ///
    /// # Panics
    /// When `params`, `grads`, `lrs` and the state do not have the same number of
    /// tensors, or a tensor's length differs from its moments': the trainer sizes
    /// all of them from the same adapter, so a mismatch is a bug.
    pub fn step(
        &mut self,
        cfg: &AdamWConfig,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
        lrs: &[f32],
    ) {
        let n = self.m.len();
        assert!(
            params.len() == n && grads.len() == n && lrs.len() == n && self.v.len() == n,
            "AdamW: {} params, {} grads, {} learning rates for {n} state tensors",
            params.len(),
            grads.len(),
            lrs.len()
        );
        for (i, ((p, g), m)) in params.iter().zip(grads).zip(&self.m).enumerate() {
            assert!(
                p.len() == g.len() && p.len() == m.len(),
                "AdamW: tensor {i} has {} params, {} grads, {} moments",
                p.len(),
                g.len(),
                m.len()
            );
        }
        self.step += 1;
        // Powers in f64: β2^t for t in the thousands loses digits in f32.
        let t = self.step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - f64::from(cfg.beta1).powi(t);
        let bc2 = 1.0 - f64::from(cfg.beta2).powi(t);
        let k = Coefficients {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            wd: cfg.weight_decay,
            inv_bc1: (1.0 / bc1) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
        };
        let total: usize = grads.iter().map(|g| g.len()).sum();
        if total >= PAR_MIN_ELEMENTS && grads.len() > 1 {
            params
                .par_iter_mut()
                .zip(grads.par_iter())
                .zip(self.m.par_iter_mut().zip(self.v.par_iter_mut()))
                .zip(lrs.par_iter())
                .for_each(|(((p, g), (m, v)), &lr)| update(&k, lr, p, g, m, v));
        } else {
            for (((p, g), (m, v)), &lr) in params
                .iter_mut()
                .zip(grads)
                .zip(self.m.iter_mut().zip(self.v.iter_mut()))
                .zip(lrs)
            {
                update(&k, lr, p, g, m, v);
            }
        }
    }
}

/// The per-step constants of the update.
struct Coefficients {
    beta1: f32,
    beta2: f32,
    eps: f32,
    wd: f32,
    inv_bc1: f32,
    inv_sqrt_bc2: f32,
}

/// One tensor's update; `√v̂ = √v · 1/√(1-β2^t)`.
fn update(k: &Coefficients, lr: f32, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *m = k.beta1 * *m + (1.0 - k.beta1) * g;
        *v = k.beta2 * *v + (1.0 - k.beta2) * g * g;
        let m_hat = *m * k.inv_bc1;
        let v_hat_sqrt = v.sqrt() * k.inv_sqrt_bc2;
        *p -= lr * (m_hat / (v_hat_sqrt + k.eps) + k.wd * *p);
    }
}

/// `√(Σ g²)` over every element of every tensor, accumulated in f64.
pub fn global_norm(grads: &[&[f32]]) -> f64 {
    grads
        .iter()
        .map(|g| g.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
        .sum::<f64>()
        .sqrt()
}

/// The factor that brings a gradient of norm `norm` down to `max_norm`:
/// `max_norm / norm` when `norm > max_norm > 0`, else 1.0 (clipping off when `max_norm ≤ 0`).
pub fn clip_scale(norm: f64, max_norm: f32) -> f32 {
    if max_norm <= 0.0 || norm <= f64::from(max_norm) || !norm.is_finite() {
        return 1.0;
    }
    (f64::from(max_norm) / norm) as f32
}

/// Whether every gradient element is finite (no NaN or ±∞): a step with a
/// non-finite gradient must be skipped, not applied.
pub fn all_finite(grads: &[&[f32]]) -> bool {
    grads.iter().all(|g| g.iter().all(|x| x.is_finite()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol * b.abs().max(1e-6)
    }

    /// Two steps on one scalar, every intermediate computed by hand in f64.
    #[test]
    fn two_steps_match_hand_computation() {
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let lr = 0.01f64;
        // The f32 hyper-parameters as the optimizer sees them (0.999f32 ≠ 0.999).
        let (b1, b2, wd) = (
            f64::from(cfg.beta1),
            f64::from(cfg.beta2),
            f64::from(cfg.weight_decay),
        );
        let (mut p, g1, g2) = (1.0f64, 0.5f64, -0.25f64);
        // Step 1: m̂ = g, v̂ = g² → m̂/(√v̂+ε) = 0.5/(0.5+1e-8), a hair under 1.
        let m1 = (1.0 - b1) * g1;
        let v1 = (1.0 - b2) * g1 * g1;
        let (mh, vh) = (m1 / (1.0 - b1), v1 / (1.0 - b2));
        p -= lr * (mh / (vh.sqrt() + 1e-8) + wd * p);
        let p1 = p;
        assert!((p1 - (1.0 - 0.01 * (1.0 + 0.1))).abs() < 1e-8, "p1 = {p1}");
        // Step 2.
        let m2 = b1 * m1 + (1.0 - b1) * g2;
        let v2 = b2 * v1 + (1.0 - b2) * g2 * g2;
        let (mh, vh) = (m2 / (1.0 - b1 * b1), v2 / (1.0 - b2 * b2));
        p -= lr * (mh / (vh.sqrt() + 1e-8) + wd * p);
        let p2 = p;

        let mut s = AdamWState::new(&[1]);
        let mut x = [1.0f32];
        s.step(&cfg, &mut [&mut x[..]], &[&[g1 as f32][..]], &[lr as f32]);
        assert_eq!(s.step, 1);
        assert!(close(x[0], p1 as f32, 1e-6), "{} vs {p1}", x[0]);
        assert!(close(s.m[0][0], m1 as f32, 1e-6));
        assert!(close(s.v[0][0], v1 as f32, 1e-6));
        s.step(&cfg, &mut [&mut x[..]], &[&[g2 as f32][..]], &[lr as f32]);
        assert_eq!(s.step, 2);
        assert!(close(x[0], p2 as f32, 1e-6), "{} vs {p2}", x[0]);
    }

    #[test]
    fn zero_weight_decay_leaves_zero_gradient_params_alone() {
        let mut s = AdamWState::new(&[3]);
        let mut x = [1.0f32, -2.0, 3.0];
        let cfg = AdamWConfig::default();
        s.step(&cfg, &mut [&mut x[..]], &[&[0.0; 3][..]], &[0.1]);
        assert_eq!(x, [1.0, -2.0, 3.0]);
        // With decay, the same zero gradient shrinks every weight by lr·wd.
        let cfg = AdamWConfig {
            weight_decay: 0.5,
            ..cfg
        };
        s.step(&cfg, &mut [&mut x[..]], &[&[0.0; 3][..]], &[0.1]);
        assert!(close(x[0], 0.95, 1e-6) && close(x[1], -1.9, 1e-6) && close(x[2], 2.85, 1e-6));
    }

    #[test]
    fn learning_rate_is_per_tensor() {
        // The first step moves every element by ≈ lr·sign(g) (m̂/√v̂ = ±1).
        let mut s = AdamWState::new(&[2, 2]);
        let mut a = [0.0f32; 2];
        let mut b = [0.0f32; 2];
        let g = [1.0f32, -3.0];
        s.step(
            &AdamWConfig::default(),
            &mut [&mut a[..], &mut b[..]],
            &[&g[..], &g[..]],
            &[0.001, 0.016],
        );
        assert!(
            close(a[0], -0.001, 1e-5) && close(a[1], 0.001, 1e-5),
            "{a:?}"
        );
        assert!(
            close(b[0], -0.016, 1e-5) && close(b[1], 0.016, 1e-5),
            "{b:?}"
        );
    }

    #[test]
    fn parallel_path_matches_serial() {
        let n = PAR_MIN_ELEMENTS;
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        };
        // Two tensors (parallel) vs the same tensors stepped one at a time (serial).
        let mut par = AdamWState::new(&[n, n]);
        let (mut x0, mut x1) = (vec![0.5f32; n], vec![-0.5f32; n]);
        par.step(
            &cfg,
            &mut [&mut x0[..], &mut x1[..]],
            &[&g[..], &g[..]],
            &[1e-3, 2e-3],
        );
        let mut s0 = AdamWState::new(&[n]);
        let mut y0 = vec![0.5f32; n];
        s0.step(&cfg, &mut [&mut y0[..]], &[&g[..]], &[1e-3]);
        let mut s1 = AdamWState::new(&[16]);
        let mut y1 = [-0.5f32; 16];
        s1.step(&cfg, &mut [&mut y1[..]], &[&g[..16]], &[2e-3]);
        assert_eq!(x0, y0);
        assert_eq!(&x1[..16], &y1[..]);
    }

    #[test]
    fn norm_and_clipping() {
        let a = [3.0f32];
        let b = [4.0f32, 0.0];
        let n = global_norm(&[&a[..], &b[..]]);
        assert_eq!(n, 5.0);
        assert_eq!(clip_scale(n, 10.0), 1.0);
        assert_eq!(clip_scale(n, 0.0), 1.0);
        assert_eq!(clip_scale(n, -1.0), 1.0);
        assert!(close(clip_scale(n, 1.0), 0.2, 1e-7));
        assert_eq!(global_norm(&[]), 0.0);
        // f64 accumulation: summing 1e6 squares of 1e-4 in f32 drifts by ~1e-4 relative.
        let x = 1e-4f32;
        let big = vec![x; 1_000_000];
        let want = f64::from(x) * 1000.0;
        assert!((global_norm(&[&big[..]]) - want).abs() < 1e-9 * want);
    }

    #[test]
    fn finiteness() {
        assert!(all_finite(&[&[1.0, -2.0][..], &[][..]]));
        assert!(!all_finite(&[&[1.0][..], &[f32::NAN][..]]));
        assert!(!all_finite(&[&[f32::NEG_INFINITY][..]]));
    }
}
