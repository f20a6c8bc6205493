//! The leading singular triplets of a matrix by randomized subspace
//! iteration (Halko, Martinsson and Tropp, 2011): a few products with the
//! matrix and its transpose, re-orthonormalized each time, then the small
//! projected problem solved exactly (Jacobi). What PiSSA needs — the top
//! `r` of a `(rows, cols)` weight, `r` ≪ both — in `O(rows·cols·r)` per
//! iteration instead of a full SVD.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The top `r` singular triplets of `w (rows, cols)`: `u (rows, r)`,
/// `s (r)` descending, `vt (r, cols)`, so that `w ≈ u·diag(s)·vt`.
pub struct Svd {
    /// Left singular vectors, column `k` for triplet `k`: `(rows, r)`.
    pub u: Vec<f32>,
    /// Singular values, descending.
    pub s: Vec<f32>,
    /// Right singular vectors as rows: `(r, cols)`.
    pub vt: Vec<f32>,
}

/// Orthonormalize the `k` columns of `q (n, k)` in place (modified
/// Gram–Schmidt, twice for stability).
fn orthonormalize(q: &mut [f64], n: usize, k: usize) {
    for _ in 0..2 {
        for j in 0..k {
            for p in 0..j {
                let dot: f64 = (0..n).map(|i| q[i * k + j] * q[i * k + p]).sum();
                for i in 0..n {
                    q[i * k + j] -= dot * q[i * k + p];
                }
            }
            let norm = (0..n).map(|i| q[i * k + j].powi(2)).sum::<f64>().sqrt();
            let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
            for i in 0..n {
                q[i * k + j] *= inv;
            }
        }
    }
}

/// Eigen-decomposition of the symmetric `a (k, k)` by cyclic Jacobi:
/// eigenvalues and eigenvectors as columns of `(k, k)`.
fn jacobi(mut a: Vec<f64>, k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0; k * k];
    for i in 0..k {
        v[i * k + i] = 1.0;
    }
    for _ in 0..100 {
        let off: f64 = (0..k)
            .flat_map(|i| (0..k).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * k + j].powi(2))
            .sum();
        if off < 1e-22 {
            break;
        }
        for p in 0..k {
            for q in p + 1..k {
                let apq = a[p * k + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * k + q] - a[p * k + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for i in 0..k {
                    let (aip, aiq) = (a[i * k + p], a[i * k + q]);
                    a[i * k + p] = c * aip - s * aiq;
                    a[i * k + q] = s * aip + c * aiq;
                }
                for i in 0..k {
                    let (api, aqi) = (a[p * k + i], a[q * k + i]);
                    a[p * k + i] = c * api - s * aqi;
                    a[q * k + i] = s * api + c * aqi;
                }
                for i in 0..k {
                    let (vip, viq) = (v[i * k + p], v[i * k + q]);
                    v[i * k + p] = c * vip - s * viq;
                    v[i * k + q] = s * vip + c * viq;
                }
            }
        }
    }
    ((0..k).map(|i| a[i * k + i]).collect(), v)
}

/// The top `r` singular triplets of `w (rows, cols)` after `iters`
/// subspace iterations with `r + 8` probe vectors drawn (uniform) from `seed`.
pub fn top_singular(w: &[f32], rows: usize, cols: usize, r: usize, iters: usize, seed: u64) -> Svd {
    use rayon::prelude::*;
    let k = (r + 8).min(rows).min(cols);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // y = w·Ω (rows, k)
    let omega: Vec<f64> = (0..cols * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    let times = |x: &[f64]| -> Vec<f64> {
        // w (rows, cols) · x (cols, k) → (rows, k)
        let mut y = vec![0.0; rows * k];
        y.par_chunks_mut(k).enumerate().for_each(|(i, yr)| {
            let wr = &w[i * cols..(i + 1) * cols];
            for (j, &wij) in wr.iter().enumerate() {
                let xr = &x[j * k..(j + 1) * k];
                for (y, &x) in yr.iter_mut().zip(xr) {
                    *y += f64::from(wij) * x;
                }
            }
        });
        y
    };
    let times_t = |y: &[f64]| -> Vec<f64> {
        // wᵀ (cols, rows) · y (rows, k) → (cols, k)
        let mut x = vec![0.0; cols * k];
        x.par_chunks_mut(k).enumerate().for_each(|(j, xr)| {
            for i in 0..rows {
                let wij = f64::from(w[i * cols + j]);
                let yr = &y[i * k..(i + 1) * k];
                for (x, &y) in xr.iter_mut().zip(yr) {
                    *x += wij * y;
                }
            }
        });
        x
    };
    let mut q = times(&omega);
    orthonormalize(&mut q, rows, k);
    for _ in 0..iters {
        let mut z = times_t(&q);
        orthonormalize(&mut z, cols, k);
        q = times(&z);
        orthonormalize(&mut q, rows, k);
    }
    // b = qᵀ·w (k, cols) = (wᵀ·q)ᵀ; b·bᵀ = V_b Σ² V_bᵀ.
    let bt = times_t(&q); // (cols, k)
    let mut bbt = vec![0.0; k * k];
    for p in 0..k {
        for l in 0..k {
            bbt[p * k + l] = (0..cols).map(|j| bt[j * k + p] * bt[j * k + l]).sum();
        }
    }
    let (eval, evec) = jacobi(bbt, k);
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| eval[b].total_cmp(&eval[a]));
    let (mut u, mut s, mut vt) = (
        vec![0.0f32; rows * r],
        Vec::with_capacity(r),
        vec![0.0f32; r * cols],
    );
    for (t, &e) in order.iter().take(r).enumerate() {
        let sigma = eval[e].max(0.0).sqrt();
        s.push(sigma as f32);
        // u_t = q·v_e; v_t = bᵀ·v_e / σ.
        for i in 0..rows {
            u[i * r + t] = (0..k).map(|p| q[i * k + p] * evec[p * k + e]).sum::<f64>() as f32;
        }
        let inv = if sigma > 0.0 { 1.0 / sigma } else { 0.0 };
        for j in 0..cols {
            vt[t * cols + j] =
                ((0..k).map(|p| bt[j * k + p] * evec[p * k + e]).sum::<f64>() * inv) as f32;
        }
    }
    Svd { u, s, vt }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_a_planted_low_rank_matrix() {
        // w = Σ σₖ uₖ vₖᵀ with known σ, plus small noise.
        let (rows, cols) = (40, 30);
        let sig = [9.0f64, 5.0, 2.0];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut basis = |n: usize| {
            let mut q: Vec<f64> = (0..n * 3).map(|_| rng.random_range(-1.0..1.0)).collect();
            orthonormalize(&mut q, n, 3);
            q
        };
        let (uq, vq) = (basis(rows), basis(cols));
        let w: Vec<f32> = (0..rows * cols)
            .map(|e| {
                let (i, j) = (e / cols, e % cols);
                (0..3)
                    .map(|k| sig[k] * uq[i * 3 + k] * vq[j * 3 + k])
                    .sum::<f64>() as f32
            })
            .collect();
        let svd = top_singular(&w, rows, cols, 2, 3, 1);
        assert!(
            (svd.s[0] - 9.0).abs() < 1e-4 && (svd.s[1] - 5.0).abs() < 1e-4,
            "{:?}",
            svd.s
        );
        // u·diag(s)·vt is the best rank-2 approximation: w minus σ₃'s term.
        for (e, &we) in w.iter().enumerate() {
            let (i, j) = (e / cols, e % cols);
            let approx: f32 = (0..2)
                .map(|t| svd.u[i * 2 + t] * svd.s[t] * svd.vt[t * cols + j])
                .sum();
            let want = we - (2.0 * uq[i * 3 + 2] * vq[j * 3 + 2]) as f32;
            assert!((approx - want).abs() < 1e-4, "{e}: {approx} vs {want}");
        }
    }
}
