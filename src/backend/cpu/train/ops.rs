//! Row-wise and element-wise training ops, each forward beside its backward:
//! RMSNorm, RoPE, gated activations, dropout. Slices are row-major; rows are
//! processed in parallel.

use super::fastmath::{self, simd_fn};
use crate::model::{Activation, Rope, RopeKind};
use rayon::prelude::*;

/// Rows per parallel task.
const ROWS: usize = 16;

/// `y = x / √(mean(x²) + eps) · w` over each group of `w.len()` values.
pub fn rms_norm_forward(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let n = w.len();
    y.par_chunks_mut(n * ROWS)
        .zip(x.par_chunks(n * ROWS))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_exact_mut(n).zip(xc.chunks_exact(n)) {
                fastmath::mul_scaled(yr, xr, w, inv_rms(xr, eps));
            }
        });
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss = fastmath::dot(x, x);
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

/// `dx` of [`rms_norm_forward`]: with `r = 1/√(mean(x²)+eps)` and
/// `g = w ⊙ dy`, `dx = r·g − x · r³ · mean(g ⊙ x)`.
pub fn rms_norm_backward(x: &[f32], dy: &[f32], w: &[f32], eps: f32, dx: &mut [f32]) {
    let n = w.len();
    dx.par_chunks_mut(n * ROWS)
        .zip(x.par_chunks(n * ROWS).zip(dy.par_chunks(n * ROWS)))
        .for_each(|(dc, (xc, gc))| {
            for ((d, xr), gr) in dc
                .chunks_exact_mut(n)
                .zip(xc.chunks_exact(n))
                .zip(gc.chunks_exact(n))
            {
                let r = inv_rms(xr, eps);
                let k = r * r * r * fastmath::dot3(xr, gr, w) / n as f32;
                rms_norm_back_row(d, xr, gr, w, r, k);
            }
        });
}

simd_fn! {
    /// `dx = r·(w ⊙ g) − k·x` for one row.
    fn rms_norm_back_row(dx: &mut [f32], x: &[f32], g: &[f32], w: &[f32], r: f32, k: f32) {
        for (((o, &xv), &gv), &wv) in dx.iter_mut().zip(x).zip(g).zip(w) {
            *o = r * gv * wv - xv * k;
        }
    }
}

/// cos/sin of every (position, pair) of a RoPE, computed in f64 exactly as
/// the inference path does: `table[pos · dims/2 + i]`.
pub fn rope_table(r: &Rope, max_pos: usize) -> Vec<(f32, f32)> {
    let half = r.dims / 2;
    let mut t = Vec::with_capacity(max_pos * half);
    for pos in 0..max_pos {
        for i in 0..half {
            let f = (r.base as f64).powf(-2.0 * i as f64 / r.dims as f64);
            let (sin, cos) = (pos as f64 * f).sin_cos();
            t.push((cos as f32, sin as f32));
        }
    }
    t
}

/// RoPE of `x (N, heads·head_dim)` at `positions`, rotating by `+θ`
/// (`sign = 1`, forward) or `−θ` (`sign = −1`, the backward: the transpose
/// of a rotation is the opposite rotation).
pub fn rope_apply(
    x: &[f32],
    positions: &[u32],
    head_dim: usize,
    r: &Rope,
    table: &[(f32, f32)],
    sign: f32,
    y: &mut [f32],
) {
    let row = x.len() / positions.len();
    let half = r.dims / 2;
    y.par_chunks_mut(row)
        .zip(x.par_chunks(row))
        .zip(positions.par_iter())
        .for_each(|((yr, xr), &pos)| {
            yr.copy_from_slice(xr);
            let cs = &table[pos as usize * half..(pos as usize + 1) * half];
            for head in yr.chunks_exact_mut(head_dim) {
                for (i, &(cos, sin)) in cs.iter().enumerate() {
                    let sin = sin * sign;
                    let (a, b) = match r.kind {
                        RopeKind::Adjacent => (2 * i, 2 * i + 1),
                        RopeKind::Halves => (i, i + half),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos - x1 * sin;
                    head[b] = x0 * sin + x1 * cos;
                }
            }
        });
}

const GELU_K: f32 = 0.797_884_6; // √(2/π)
const GELU_C: f32 = 0.044_715;

#[inline(always)]
fn silu(g: f32) -> (f32, f32) {
    let s = fastmath::sigmoid(g);
    (g * s, s * (1.0 + g * (1.0 - s)))
}

#[inline(always)]
fn gelu_tanh(g: f32) -> (f32, f32) {
    let t = fastmath::tanh(GELU_K * (g + GELU_C * g * g * g));
    let d = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_C * g * g);
    (0.5 * g * (1.0 + t), d)
}

/// `h = act(g) · u` over one chunk.
#[inline(always)]
fn gated_forward_chunk(f: impl Fn(f32) -> (f32, f32), g: &[f32], u: &[f32], h: &mut [f32]) {
    for ((o, &gv), &uv) in h.iter_mut().zip(g).zip(u) {
        *o = f(gv).0 * uv;
    }
}

/// The backward of [`gated_forward_chunk`].
#[inline(always)]
fn gated_backward_chunk(
    f: impl Fn(f32) -> (f32, f32),
    (g, u, dh): (&[f32], &[f32], &[f32]),
    dg: &mut [f32],
    du: &mut [f32],
) {
    let n = dg
        .len()
        .min(du.len())
        .min(g.len())
        .min(u.len())
        .min(dh.len());
    let (g, u, dh, dg, du) = (&g[..n], &u[..n], &dh[..n], &mut dg[..n], &mut du[..n]);
    for i in 0..n {
        let (a, slope) = f(g[i]);
        dg[i] = dh[i] * u[i] * slope;
        du[i] = dh[i] * a;
    }
}

simd_fn! {
    fn silu_forward(g: &[f32], u: &[f32], h: &mut [f32]) {
        gated_forward_chunk(silu, g, u, h)
    }
}

simd_fn! {
    fn gelu_forward(g: &[f32], u: &[f32], h: &mut [f32]) {
        gated_forward_chunk(gelu_tanh, g, u, h)
    }
}

simd_fn! {
    fn silu_backward(x: (&[f32], &[f32], &[f32]), dg: &mut [f32], du: &mut [f32]) {
        gated_backward_chunk(silu, x, dg, du)
    }
}

simd_fn! {
    fn gelu_backward(x: (&[f32], &[f32], &[f32]), dg: &mut [f32], du: &mut [f32]) {
        gated_backward_chunk(gelu_tanh, x, dg, du)
    }
}

/// Elements per parallel task of the element-wise ops.
const CHUNK: usize = 4096;

/// `h = act(g) · u`.
pub fn gated_forward(g: &[f32], u: &[f32], act: Activation, h: &mut [f32]) {
    let kernel = match act {
        Activation::Silu => silu_forward,
        Activation::GeluTanh => gelu_forward,
    };
    h.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(hc, (gc, uc))| kernel(gc, uc, hc));
}

/// `dg = dh · u · act'(g)`, `du = dh · act(g)`.
pub fn gated_backward(
    g: &[f32],
    u: &[f32],
    dh: &[f32],
    act: Activation,
    dg: &mut [f32],
    du: &mut [f32],
) {
    let kernel = match act {
        Activation::Silu => silu_backward,
        Activation::GeluTanh => gelu_backward,
    };
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(
            g.par_chunks(CHUNK)
                .zip(u.par_chunks(CHUNK))
                .zip(dh.par_chunks(CHUNK)),
        )
        .for_each(|((dgc, duc), ((gc, uc), hc))| kernel((gc, uc, hc), dgc, duc));
}

/// A uniform number in [0, 1) from (seed, site, index): SplitMix64, so a
/// mask is reproduced exactly in the backward pass and after a resume.
fn mask_uniform(seed: u64, site: u32, index: usize) -> f32 {
    let mut z = seed ^ ((site as u64) << 40) ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// Inverted dropout: `y = x / (1 − p)` where the mask keeps, else 0. Linear
/// in `x`, so the same call maps `dy` to `dx`.
pub fn dropout(x: &[f32], p: f32, seed: u64, site: u32, y: &mut [f32]) {
    let keep = 1.0 / (1.0 - p);
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (yc, xc))| {
            for (i, (o, &v)) in yc.iter_mut().zip(xc).enumerate() {
                let u = mask_uniform(seed, site, c * CHUNK + i);
                *o = if u < p { 0.0 } else { v * keep };
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_drops_about_p_and_scales_the_rest() {
        let x = vec![1.0f32; 100_000];
        let mut y = vec![0.0; x.len()];
        dropout(&x, 0.25, 7, 3, &mut y);
        let zeros = y.iter().filter(|&&v| v == 0.0).count() as f32 / x.len() as f32;
        assert!((zeros - 0.25).abs() < 0.01, "{zeros}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        let mut y2 = vec![0.0; x.len()];
        dropout(&x, 0.25, 8, 3, &mut y2);
        assert_ne!(y, y2, "another seed draws another mask");
    }
}

/// Widest inner dimension [`add_thin_product`] takes (LoRA ranks; wider
/// products go through the GEMM).
pub use crate::graph::plan::THIN_K;

/// Rows of `out` per pass of [`add_thin_row_tile`] (each loaded slice of
/// `rows` serves all of them).
const THIN_TILE: usize = 4;
/// Columns per pass (a tile's rows and the matching slices stay in L1).
const THIN_COLS: usize = 512;

simd_fn! {
    /// `out[r] = base[r] + Σ_k x[r·k_n + k] · rows[k]` for a tile of rows,
    /// each `n = out.len() / tile` wide.
    fn add_thin_row_tile(out: &mut [f32], base: &[f32], x: &[f32], rows: &[f32], k_n: usize) {
        let tile = x.len() / k_n;
        let n = out.len() / tile;
        out.copy_from_slice(base);
        for c0 in (0..n).step_by(THIN_COLS) {
            let c1 = (c0 + THIN_COLS).min(n);
            for k in 0..k_n {
                let p = &rows[k * n + c0..k * n + c1];
                for r in 0..tile {
                    let a = x[r * k_n + k];
                    for (o, &pv) in out[r * n + c0..r * n + c1].iter_mut().zip(p) {
                        *o += a * pv;
                    }
                }
            }
        }
    }
}

/// `out (N, n) = base + x (N, k) · rows (k, n)` in one pass over `out`, for
/// a thin `k` (at most [`THIN_K`]): the LoRA update added to the frozen
/// product (`rows` = Bᵀ), or its input gradient added to the frozen one
/// (`rows` = A), without an intermediate `N × n` tensor.
pub fn add_thin_product(base: &[f32], x: &[f32], rows: &[f32], k: usize, out: &mut [f32]) {
    assert!((1..=THIN_K).contains(&k), "add_thin_product: k = {k}");
    let n = rows.len() / k;
    assert!(
        rows.len() == k * n && out.len().is_multiple_of(n),
        "add_thin_product: shapes"
    );
    assert!(
        base.len() == out.len() && x.len() == out.len() / n * k,
        "add_thin_product: lengths"
    );
    let task = ROWS * THIN_TILE;
    out.par_chunks_mut(n * task)
        .zip(base.par_chunks(n * task))
        .zip(x.par_chunks(k * task))
        .for_each(|((oc, bc), xc)| {
            let tiles = oc
                .chunks_mut(n * THIN_TILE)
                .zip(bc.chunks(n * THIN_TILE))
                .zip(xc.chunks(k * THIN_TILE));
            for ((o, b), xt) in tiles {
                add_thin_row_tile(o, b, xt, rows, k);
            }
        });
}
