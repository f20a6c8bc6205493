//! Products with a quantized weight matrix, decoded on the fly.
//!
//! `W` is `[rows, cols]` in its GGUF block layout; activations `x` are
//! `(n_tok, cols)` f32, outputs `(n_tok, rows)`. Few tokens (generation):
//! each output is one quantized row · x, rows split across threads. Many
//! tokens (prompts, scoring): threads take bands of `BAND` rows, decode the
//! band into a small f32 scratch and run an f32 GEMM against all tokens, so
//! no more than `BAND × cols` weights per thread exist as f32 at any time.

use super::gemm::gemm_nt_raw;
use crate::quant::{self, GgmlType};
use rayon::prelude::*;

/// Rows of the weight decoded at once per thread in the GEMM path.
const BAND: usize = 64;
/// At or above this many tokens the GEMM path beats row dot products.
const GEMM_MIN_TOKENS: usize = 4;
/// Rows per task in the dot-product path.
const DOT_CHUNK: usize = 32;

/// A borrowed quantized matrix.
#[derive(Clone, Copy)]
pub struct QMatrix<'a> {
    /// Block format.
    pub ty: GgmlType,
    /// Output features.
    pub rows: usize,
    /// Input features (length of a row).
    pub cols: usize,
    /// `rows × row_bytes` bytes.
    pub data: &'a [u8],
}

impl<'a> QMatrix<'a> {
    /// Wrap `data`, checking its length against the shape.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> crate::Result<Self> {
        let rb = ty.row_bytes(cols).ok_or_else(|| {
            crate::Error::Quant(format!(
                "{cols} columns is not a whole number of {} blocks",
                ty.name()
            ))
        })?;
        if rb.checked_mul(rows) != Some(data.len()) {
            return Err(crate::Error::Quant(format!(
                "{} matrix {rows}×{cols} needs {} bytes, got {}",
                ty.name(),
                rb.saturating_mul(rows),
                data.len()
            )));
        }
        Ok(QMatrix {
            ty,
            rows,
            cols,
            data,
        })
    }

    fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }

    /// The stored bytes of row `r`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Decode row `r` into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        quant::dequantize_row(self.ty, self.row(r), out).expect("QMatrix shape checked in new");
    }

    /// Decode rows `r0..r0 + n` (`n` = as many as `out` holds whole rows
    /// for, at most the rows left) into `out`, row-major; returns `n`.
    pub fn dequantize_band(&self, r0: usize, out: &mut [f32]) -> usize {
        let n = (out.len() / self.cols).min(self.rows - r0);
        for (i, row) in out.chunks_exact_mut(self.cols).take(n).enumerate() {
            self.dequantize_row(r0 + i, row);
        }
        n
    }
}

/// How single-token products (generation) are computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MatvecMode {
    /// Exact: each quantized row decoded and dotted with the f32 activation.
    #[default]
    Exact,
    /// The activation is rounded to 8 bits per value (blocks of 32) and dotted
    /// with integer instructions, as llama.cpp does: 2–3× faster on quantized
    /// weights, with a small error (see [`quant::dot_row_q8`]).
    Q8,
}

/// Raw pointer that may be shared by threads writing disjoint elements.
#[derive(Clone, Copy)]
pub(super) struct SharedOut(pub(super) *mut f32);
// SAFETY: used only to write disjoint column bands of one output, through
// raw pointers (never as overlapping `&mut` slices).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    // A method (not a field access) so closures capture the whole wrapper.
    pub(super) fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// Tokens of `x` for a product with `w` into `out`, panicking when the
/// slices are not `(n_tok, cols)` and `(n_tok, rows)` (a caller's bug).
pub(super) fn tokens_of(x: &[f32], w: &QMatrix, out: &[f32]) -> usize {
    let n_tok = x.len() / w.cols;
    assert_eq!(x.len(), n_tok * w.cols, "matmul: x is not (n_tok, cols)");
    assert_eq!(
        out.len(),
        n_tok * w.rows,
        "matmul: out is not (n_tok, rows)"
    );
    n_tok
}

/// `out[t·rows + r] = Σ_k x[t·cols + k] · W[r, k]`, exactly.
pub fn matmul(x: &[f32], w: &QMatrix, out: &mut [f32]) {
    matmul_with(x, w, out, MatvecMode::Exact)
}

/// [`matmul`], with the single-token path computed as `mode` says.
pub fn matmul_with(x: &[f32], w: &QMatrix, out: &mut [f32], mode: MatvecMode) {
    let n_tok = tokens_of(x, w, out);
    if n_tok < GEMM_MIN_TOKENS {
        return matmul_rows(x, w, out, mode);
    }
    let bands = w.rows.div_ceil(BAND);
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..bands).into_par_iter().for_each_init(
        || vec![0.0f32; BAND * w.cols],
        |scratch, band| {
            let r0 = band * BAND;
            let nr = w.dequantize_band(r0, scratch);
            // SAFETY: this task writes only columns r0..r0+nr of each of the
            // n_tok output rows (in bounds: out is n_tok × rows); bands are
            // disjoint, and `out` outlives the parallel loop.
            unsafe {
                gemm_nt_raw(
                    n_tok,
                    nr,
                    w.cols,
                    x,
                    w.cols,
                    scratch,
                    w.cols,
                    out_ptr.ptr().add(r0),
                    w.rows,
                );
            }
        },
    );
}

/// Every token's row of `out` exactly as [`matvec`] (or [`matvec_q8`], per
/// `mode`) computes it alone, with each chunk of weight rows read once for
/// all tokens: a batch of single-token passes shares the weight traffic
/// and gets the bits of each pass run by itself.
pub fn matmul_rows(x: &[f32], w: &QMatrix, out: &mut [f32], mode: MatvecMode) {
    let n_tok = tokens_of(x, w, out);
    if n_tok == 1 {
        return match mode {
            MatvecMode::Exact => matvec(x, w, out),
            MatvecMode::Q8 => matvec_q8(x, w, out),
        };
    }
    let q8 =
        mode == MatvecMode::Q8 && !matches!(w.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
    let acts: Vec<_> = if q8 {
        x.chunks_exact(w.cols)
            .map(quant::quantize_activation_q8)
            .collect()
    } else {
        Vec::new()
    };
    let rb = w.row_bytes();
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..w.rows.div_ceil(DOT_CHUNK))
        .into_par_iter()
        .for_each(|c| {
            let r0 = c * DOT_CHUNK;
            let nr = DOT_CHUNK.min(w.rows - r0);
            for t in 0..n_tok {
                // SAFETY: this task writes only columns r0..r0+nr of row t of
                // out (in bounds: out is n_tok × rows); chunks are disjoint and
                // `out` outlives the parallel loop.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(out_ptr.ptr().add(t * w.rows + r0), nr)
                };
                if q8 {
                    let rows = &w.data[r0 * rb..(r0 + nr) * rb];
                    quant::matvec_q8(w.ty, rows, &acts[t], o)
                        .expect("QMatrix shape checked in new");
                } else {
                    let xt = &x[t * w.cols..(t + 1) * w.cols];
                    for (i, y) in o.iter_mut().enumerate() {
                        *y = quant::dot_row(w.ty, w.row(r0 + i), xt);
                    }
                }
            }
        });
}

/// `out[r] = W[r, :] · x` for one token.
pub fn matvec(x: &[f32], w: &QMatrix, out: &mut [f32]) {
    out.par_chunks_mut(DOT_CHUNK)
        .enumerate()
        .for_each(|(c, o)| {
            for (i, y) in o.iter_mut().enumerate() {
                *y = quant::dot_row(w.ty, w.row(c * DOT_CHUNK + i), x);
            }
        });
}

/// [`matvec`] with the activation rounded to 8 bits ([`MatvecMode::Q8`]).
pub fn matvec_q8(x: &[f32], w: &QMatrix, out: &mut [f32]) {
    if matches!(w.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        return matvec(x, w, out);
    }
    let a = quant::quantize_activation_q8(x);
    let rb = w.row_bytes();
    out.par_chunks_mut(DOT_CHUNK)
        .enumerate()
        .for_each(|(c, o)| {
            let rows = &w.data[c * DOT_CHUNK * rb..(c * DOT_CHUNK + o.len()) * rb];
            quant::matvec_q8(w.ty, rows, &a, o).expect("QMatrix shape checked in new");
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `rows × cols` matrix of `ty` with deterministic values in [-1, 1).
    fn test_matrix(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let rb = ty.row_bytes(cols).unwrap();
        let mut data = vec![0u8; rb * rows];
        for (src, dst) in vals.chunks(cols).zip(data.chunks_mut(rb)) {
            quant::quantize_row(ty, src, dst).unwrap();
        }
        data
    }

    fn check(ty: GgmlType, rows: usize, cols: usize, n_tok: usize) {
        let data = test_matrix(ty, rows, cols);
        let w = QMatrix::new(ty, rows, cols, &data).unwrap();
        let x: Vec<f32> = (0..n_tok * cols)
            .map(|i| ((i * 31 % 17) as f32 / 8.0) - 1.0)
            .collect();
        let mut out = vec![0.0; n_tok * rows];
        matmul(&x, &w, &mut out);
        let mut row = vec![0.0; cols];
        for r in 0..rows {
            w.dequantize_row(r, &mut row);
            for t in 0..n_tok {
                let want: f64 = (0..cols)
                    .map(|k| row[k] as f64 * x[t * cols + k] as f64)
                    .sum();
                let got = out[t * rows + r] as f64;
                assert!(
                    (got - want).abs() <= 1e-3 * (1.0 + want.abs()),
                    "{ty:?} t={t} r={r}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn gemm_and_dot_paths_agree_with_dequantized_rows() {
        // 130 rows: two full bands and a partial one.
        for ty in [
            GgmlType::F32,
            GgmlType::Q8_0,
            GgmlType::Q4_1,
            GgmlType::Q4_0,
        ] {
            check(ty, 130, 64, 1);
            check(ty, 130, 64, 3);
            check(ty, 130, 64, 9);
        }
    }

    #[test]
    fn q8_matvec_is_close_to_exact() {
        let (rows, cols) = (70, 256);
        let ty = GgmlType::Q4_1;
        let data = test_matrix(ty, rows, cols);
        let w = QMatrix::new(ty, rows, cols, &data).unwrap();
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 31 % 17) as f32 / 8.0) - 1.0)
            .collect();
        let (mut exact, mut q8) = (vec![0.0; rows], vec![0.0; rows]);
        matmul_with(&x, &w, &mut exact, MatvecMode::Exact);
        matmul_with(&x, &w, &mut q8, MatvecMode::Q8);
        let scale: f32 = exact.iter().map(|v| v.abs()).fold(0.0, f32::max);
        for (a, b) in exact.iter().zip(&q8) {
            assert!((a - b).abs() < 0.01 * scale, "{a} vs {b}");
        }
        assert_ne!(exact, q8, "the q8 path must actually round the activation");
    }

    #[test]
    fn wrong_length_is_an_error_not_a_panic() {
        let data = vec![0u8; 10];
        assert!(QMatrix::new(GgmlType::Q8_0, 2, 32, &data).is_err());
        assert!(QMatrix::new(GgmlType::Q8_0, 1, 31, &data).is_err());
    }
}
