//! Batch-invariant products: every output `out[t, r] = x[t] · W[r]` is
//! computed by the same sequence of operations whatever the number of
//! tokens beside it, so a request decoded in a batch gets the same bits as
//! decoded alone.
//!
//! Threads take bands of weight rows, decode a band to f32 once for all the
//! tokens (the weight traffic and decoding a batch shares), and compute
//! tiles of up to 4 tokens × 2 rows. Each output keeps 8 lane sums over the
//! columns in order, combined in a fixed order, then the columns past the
//! last multiple of 8: tiling decides only which outputs are computed
//! together, never how one is summed. With AVX2 the lanes use FMA, without
//! it a multiply and an add, so bits are stable on one machine (which is
//! what batching needs), not across instruction sets.

use super::matmul::{QMatrix, SharedOut, tokens_of};
use rayon::prelude::*;

/// Rows of the weight decoded at once per thread.
const BAND: usize = 32;
/// Tokens per tile.
const TT: usize = 4;
/// Rows per tile.
const TR: usize = 2;
/// Lanes of each sum.
const L: usize = 8;

/// `out (n_tok, w.rows) = x (n_tok, w.cols) · Wᵀ`, batch-invariant.
pub fn matmul(x: &[f32], w: &QMatrix, out: &mut [f32]) {
    let n_tok = tokens_of(x, w, out);
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..w.rows.div_ceil(BAND)).into_par_iter().for_each_init(
        || vec![0.0f32; BAND * w.cols],
        |scratch, band| {
            let r0 = band * BAND;
            let nr = w.dequantize_band(r0, scratch);
            // SAFETY: this task writes only columns r0..r0+nr of each row of
            // out (n_tok × rows); bands are disjoint and out outlives the loop.
            unsafe {
                products(
                    x,
                    n_tok,
                    &scratch[..nr * w.cols],
                    nr,
                    w.cols,
                    out_ptr.ptr().add(r0),
                    w.rows,
                    false,
                )
            };
        },
    );
}

/// `out (n_tok, rows) (+)= x (n_tok, cols) · Wᵀ` for an f32 `w (rows, cols)`,
/// batch-invariant, on the calling thread (small products: LoRA).
pub fn matmul_f32(x: &[f32], w: &[f32], cols: usize, out: &mut [f32], accumulate: bool) {
    let n_tok = x.len() / cols;
    let rows = w.len() / cols;
    assert_eq!(x.len(), n_tok * cols, "matmul_f32: x is not (n_tok, cols)");
    assert_eq!(w.len(), rows * cols, "matmul_f32: w is not (rows, cols)");
    assert_eq!(
        out.len(),
        n_tok * rows,
        "matmul_f32: out is not (n_tok, rows)"
    );
    // SAFETY: out is exactly (n_tok, rows) with stride rows.
    unsafe { products(x, n_tok, w, rows, cols, out.as_mut_ptr(), rows, accumulate) };
}

/// `out[t·stride + r] (+)= x[t] · w[r]` for all tokens and the `nr` rows of
/// `w` (row-major, `cols` long).
///
/// # Safety
/// `out` must be valid for writes at `t·stride + r` for `t < n_tok`, `r < nr`.
#[allow(clippy::too_many_arguments)]
unsafe fn products(
    x: &[f32],
    n_tok: usize,
    w: &[f32],
    nr: usize,
    cols: usize,
    out: *mut f32,
    stride: usize,
    accumulate: bool,
) {
    let mut t = 0;
    while t < n_tok {
        let tt = TT.min(n_tok - t);
        let mut r = 0;
        while r < nr {
            let tr = TR.min(nr - r);
            let mut lanes = [[[0.0f32; L]; TR]; TT];
            tile(
                &x[t * cols..(t + tt) * cols],
                tt,
                &w[r * cols..(r + tr) * cols],
                tr,
                cols,
                &mut lanes,
            );
            let k8 = cols / L * L;
            for (i, lanes_t) in lanes.iter().enumerate().take(tt) {
                let xt = &x[(t + i) * cols..(t + i + 1) * cols];
                for (j, lanes_tr) in lanes_t.iter().enumerate().take(tr) {
                    let wr = &w[(r + j) * cols..(r + j + 1) * cols];
                    let mut s = combine(lanes_tr);
                    for k in k8..cols {
                        s += xt[k] * wr[k];
                    }
                    // SAFETY: in bounds per this function's contract.
                    let o = unsafe { &mut *out.add((t + i) * stride + r + j) };
                    *o = if accumulate { *o + s } else { s };
                }
            }
            r += tr;
        }
        t += tt;
    }
}

/// The lanes' total, combined pairwise in a fixed order.
#[inline(always)]
fn combine(acc: &[f32; L]) -> f32 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// Lane sums of a tile of `tt ≤ 4` tokens × `tr ≤ 2` rows over the first
/// `cols / 8 · 8` columns.
fn tile(x: &[f32], tt: usize, w: &[f32], tr: usize, cols: usize, lanes: &mut [[[f32; L]; TR]; TT]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::wide_simd() {
        // SAFETY: `wide_simd` is true only when the CPU has AVX2 and FMA.
        unsafe {
            match (tt, tr) {
                (4, 2) => fma::tile::<4, 2>(x, w, cols, lanes),
                (4, _) => fma::tile::<4, 1>(x, w, cols, lanes),
                (3, 2) => fma::tile::<3, 2>(x, w, cols, lanes),
                (3, _) => fma::tile::<3, 1>(x, w, cols, lanes),
                (2, 2) => fma::tile::<2, 2>(x, w, cols, lanes),
                (2, _) => fma::tile::<2, 1>(x, w, cols, lanes),
                (_, 2) => fma::tile::<1, 2>(x, w, cols, lanes),
                _ => fma::tile::<1, 1>(x, w, cols, lanes),
            }
        }
        return;
    }
    for c in 0..cols / L {
        for i in 0..tt {
            let xc = &x[i * cols + c * L..][..L];
            for j in 0..tr {
                let wc = &w[j * cols + c * L..][..L];
                for l in 0..L {
                    lanes[i][j][l] += xc[l] * wc[l];
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod fma {
    use super::{L, TR, TT};
    use std::arch::x86_64::*;

    /// [`super::tile`] with `T` tokens and `R` rows, lanes in registers.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn tile<const T: usize, const R: usize>(
        x: &[f32],
        w: &[f32],
        cols: usize,
        lanes: &mut [[[f32; L]; TR]; TT],
    ) {
        assert!(x.len() >= T * cols && w.len() >= R * cols);
        let mut acc = [[_mm256_setzero_ps(); R]; T];
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        for c in 0..cols / L {
            // SAFETY: c·8 + 8 ≤ cols, and the asserts bound every row read.
            unsafe {
                let mut wv = [_mm256_setzero_ps(); R];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(wp.add(j * cols + c * L));
                }
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(xp.add(i * cols + c * L));
                    for (a, v) in acc_i.iter_mut().zip(&wv) {
                        *a = _mm256_fmadd_ps(xv, *v, *a);
                    }
                }
            }
        }
        for (i, acc_i) in acc.iter().enumerate() {
            for (j, a) in acc_i.iter().enumerate() {
                // SAFETY: lanes[i][j] is 8 f32.
                unsafe { _mm256_storeu_ps(lanes[i][j].as_mut_ptr(), *a) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{self, GgmlType};

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2000) as f32 / 1000.0) - 1.0)
            .collect()
    }

    #[test]
    fn each_row_has_the_same_bits_in_any_batch() {
        // 70 rows (two full bands and a part); f32 rows of 100 columns have
        // a tail past the last multiple of 8, quantized rows are whole blocks.
        let (rows, cols) = (70usize, 104usize);
        for ty in [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q4_1] {
            let cols = if ty == GgmlType::F32 {
                100
            } else {
                cols.div_ceil(32) * 32
            };
            let rb = ty.row_bytes(cols).unwrap();
            let src = values(rows * cols, 1);
            let mut data = vec![0u8; rows * rb];
            for (s, d) in src.chunks(cols).zip(data.chunks_mut(rb)) {
                quant::quantize_row(ty, s, d).unwrap();
            }
            let w = QMatrix::new(ty, rows, cols, &data).unwrap();
            let x = values(9 * cols, 2);
            let mut all = vec![0.0; 9 * rows];
            matmul(&x, &w, &mut all);
            let mut row = vec![0.0; cols];
            for t in 0..9 {
                let mut alone = vec![0.0; rows];
                matmul(&x[t * cols..(t + 1) * cols], &w, &mut alone);
                assert_eq!(alone, all[t * rows..(t + 1) * rows], "{ty:?} token {t}");
                for (r, &got) in alone.iter().enumerate() {
                    w.dequantize_row(r, &mut row);
                    let want: f64 = (0..cols)
                        .map(|k| row[k] as f64 * x[t * cols + k] as f64)
                        .sum();
                    let got = got as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{ty:?} {t},{r}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn f32_products_accumulate() {
        let (rows, cols) = (5, 19);
        let (w, x) = (values(rows * cols, 3), values(3 * cols, 4));
        let mut out = vec![1.0; 3 * rows];
        matmul_f32(&x, &w, cols, &mut out, true);
        for t in 0..3 {
            for r in 0..rows {
                let want = 1.0
                    + (0..cols)
                        .map(|k| x[t * cols + k] * w[r * cols + k])
                        .sum::<f32>();
                assert!((out[t * rows + r] - want).abs() < 1e-4, "{t},{r}");
            }
        }
    }
}
