//! Element-wise and row-wise ops of the decoder on the CPU: RMSNorm, RoPE,
//! gated activations, log-softmax. Shapes are given as `(rows, cols)` of
//! row-major f32 slices.

use crate::model::{Activation, Rope, RopeKind};

/// In place, for each row of `x` (rows of `w.len()`):
/// `x ← x / √(mean(x²) + eps) · w`.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for row in x.chunks_exact_mut(n) {
        let ss: f32 = row.iter().map(|&v| v * v).sum();
        let inv = 1.0 / (ss / n as f32 + eps).sqrt();
        for (v, &g) in row.iter_mut().zip(w) {
            *v = *v * inv * g;
        }
    }
}

/// RoPE in place on `x` = `(n_tok, n_heads · head_dim)`; token `t` is at
/// position `pos0 + t`. Pairs per [`RopeKind`]; angle `pos · base^(−2i/dims)`.
pub fn rope(x: &mut [f32], n_tok: usize, head_dim: usize, pos0: usize, r: &Rope) {
    let half = r.dims / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| (r.base as f64).powf(-2.0 * i as f64 / r.dims as f64))
        .collect();
    let mut cs = vec![(0.0f32, 0.0f32); half];
    for (t, tok) in x.chunks_exact_mut(x.len() / n_tok.max(1)).enumerate() {
        let pos = (pos0 + t) as f64;
        for (c, f) in cs.iter_mut().zip(&inv_freq) {
            let (sin, cos) = (pos * f).sin_cos();
            *c = (cos as f32, sin as f32);
        }
        for head in tok.chunks_exact_mut(head_dim) {
            for (i, &(cos, sin)) in cs.iter().enumerate() {
                let (a, b) = match r.kind {
                    RopeKind::Adjacent => (2 * i, 2 * i + 1),
                    RopeKind::Halves => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }
}

/// `gate ← act(gate) · up`, element-wise.
pub fn gated_activation(gate: &mut [f32], up: &[f32], act: Activation) {
    match act {
        Activation::Silu => {
            for (g, &u) in gate.iter_mut().zip(up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
        }
        Activation::GeluTanh => {
            const K: f32 = 0.797_884_6; // √(2/π)
            for (g, &u) in gate.iter_mut().zip(up) {
                let x = *g;
                *g = 0.5 * x * (1.0 + (K * (x + 0.044_715 * x * x * x)).tanh()) * u;
            }
        }
    }
}

/// `x ← x + y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `log Σ exp(x)`, computed stably.
pub fn log_sum_exp(x: &[f32]) -> f64 {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !m.is_finite() {
        return m as f64;
    }
    let s: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
    m as f64 + s.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_gives_unit_rms_times_weight() {
        let mut x = vec![1.0, -2.0, 3.0, -4.0, 0.5, 0.5, 0.5, 0.5];
        rms_norm(&mut x, &[1.0, 1.0, 2.0, 2.0], 0.0);
        let rms0 = (30.0f32 / 4.0).sqrt();
        assert!((x[0] - 1.0 / rms0).abs() < 1e-6);
        assert!((x[2] - 2.0 * 3.0 / rms0).abs() < 1e-6);
        assert!((x[4] - 1.0).abs() < 1e-6 && (x[7] - 2.0).abs() < 1e-6);
    }

    #[test]
    fn rope_rotates_the_right_pairs_and_keeps_norms() {
        let r = Rope {
            kind: RopeKind::Adjacent,
            base: 10000.0,
            dims: 4,
        };
        let mut x = vec![1.0, 0.0, 1.0, 0.0];
        rope(&mut x, 1, 4, 1, &r);
        // pair 0 rotates by 1 rad, pair 1 by 1e-2 rad.
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
        assert!((x[2] - 0.01f32.cos()).abs() < 1e-6 && (x[3] - 0.01f32.sin()).abs() < 1e-6);
        let r = Rope {
            kind: RopeKind::Halves,
            ..r
        };
        let mut x = vec![1.0, 1.0, 0.0, 0.0];
        rope(&mut x, 1, 4, 1, &r);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[2] - 1f32.sin()).abs() < 1e-6);
        assert!((x[1] - 0.01f32.cos()).abs() < 1e-6 && (x[3] - 0.01f32.sin()).abs() < 1e-6);
        // Position 0 is the identity.
        let mut y = vec![0.3, -0.7, 0.2, 0.9];
        rope(&mut y, 1, 4, 0, &r);
        assert_eq!(y, vec![0.3, -0.7, 0.2, 0.9]);
    }

    #[test]
    fn activations_match_their_formulas() {
        let mut g = vec![1.0, -2.0];
        gated_activation(&mut g, &[2.0, 1.0], Activation::Silu);
        assert!((g[0] - 2.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
        assert!((g[1] - (-2.0 / (1.0 + 2f32.exp()))).abs() < 1e-6);
        let mut g = vec![1.0];
        gated_activation(&mut g, &[1.0], Activation::GeluTanh);
        assert!((g[0] - 0.841_192).abs() < 1e-5, "{}", g[0]);
    }

    #[test]
    fn log_sum_exp_is_stable() {
        assert!((log_sum_exp(&[1000.0, 1000.0]) - (1000.0 + 2f64.ln())).abs() < 1e-9);
    }
}
