//! The loss head: output projection, softmax cross-entropy and its input
//! gradient in one op, over chunks of tokens so that only
//! `chunk × vocab` logits exist at a time (never `tokens × vocab`).

use super::fastmath;
use crate::backend::cpu::gemm::{Operand, matmul_into};
use crate::backend::cpu::matmul::QMatrix;
use rayon::prelude::*;

/// Vocabulary rows decoded to f32 at a time.
pub const BLOCK: usize = 4096;

/// Decode rows `r0..r0 + out.len() / cols` of `w` into `out`, in parallel.
fn decode_rows(w: &QMatrix, r0: usize, out: &mut [f32]) {
    out.par_chunks_mut(w.cols)
        .enumerate()
        .for_each(|(i, row)| w.dequantize_row(r0 + i, row));
}

/// Summed NLL and its input gradient.
///
/// - `h (N, C)`: final hidden states; `w (V, C)`: the frozen output matrix
/// - `targets (N)`: token to predict, `u32::MAX` for none
/// - `dx (N, C)` ← `loss_scale · ∂(Σ NLL)/∂h`
/// - `logits`: scratch of at least `chunk × V`; `wblock`: of `BLOCK × C`
/// - rows are taken `chunk` target rows at a time; rows without a target
///   get `dx = 0` and no logits
///
/// Returns (Σ NLL over targets in f64, number of targets).
#[allow(clippy::too_many_arguments)]
pub fn loss_head(
    h: &[f32],
    w: &QMatrix,
    targets: &[u32],
    loss_scale: f32,
    chunk: usize,
    logits: &mut [f32],
    wblock: &mut [f32],
    dx: &mut [f32],
    threads: usize,
) -> (f64, usize) {
    let (c, v) = (w.cols, w.rows);
    let mut total = 0.0f64;
    let mut count = 0usize;
    // Only rows with a target need logits: prompt, padding and
    // end-of-example rows cost nothing here.
    let rows_with_target: Vec<usize> = (0..targets.len())
        .filter(|&r| targets[r] != u32::MAX && (targets[r] as usize) < v)
        .collect();
    dx.fill(0.0);
    let mut hc = vec![0.0f32; chunk.min(rows_with_target.len()) * c];
    let mut dxc = vec![0.0f32; hc.len()];
    for idx in rows_with_target.chunks(chunk) {
        let rows = idx.len();
        let (hc, dxc) = (&mut hc[..rows * c], &mut dxc[..rows * c]);
        for (dst, &r) in hc.chunks_exact_mut(c).zip(idx) {
            dst.copy_from_slice(&h[r * c..(r + 1) * c]);
        }
        let lg = &mut logits[..rows * v];
        // logits = h · Wᵀ, one block of vocabulary rows decoded at a time.
        for r0 in (0..v).step_by(BLOCK) {
            let nr = BLOCK.min(v - r0);
            let wf = &mut wblock[..nr * c];
            decode_rows(w, r0, wf);
            let (a, b) = (Operand::new(hc, c), Operand::new(wf, c).t());
            matmul_into(rows, nr, c, a, b, &mut lg[r0..], v, false, threads);
        }
        let nll: Vec<f64> = lg
            .par_chunks_mut(v)
            .zip(idx.par_iter())
            .map(|(r, &row)| {
                let t = targets[row] as usize;
                let target_logit = r[t];
                let m = fastmath::max(r);
                // e^(x − m) in place, summed per 1024 values in f32 lanes and
                // across them in f64.
                let sum: f64 = r
                    .chunks_mut(1024)
                    .map(|c| f64::from(fastmath::exp_sum(c, 1.0, m)))
                    .sum();
                let lse = m + sum.ln() as f32;
                // dlogits = loss_scale · (softmax − onehot).
                fastmath::scale(r, (f64::from(loss_scale) / sum) as f32);
                r[t] -= loss_scale;
                f64::from(lse - target_logit)
            })
            .collect();
        total += nll.iter().sum::<f64>();
        count += rows;
        // dx = dlogits · W, block by block in order (deterministic).
        dxc.fill(0.0);
        for r0 in (0..v).step_by(BLOCK) {
            let nr = BLOCK.min(v - r0);
            let wf = &mut wblock[..nr * c];
            decode_rows(w, r0, wf);
            let (a, b) = (Operand::new(&lg[r0..], v), Operand::new(wf, c));
            matmul_into(rows, c, nr, a, b, dxc, c, true, threads);
        }
        for (src, &r) in dxc.chunks_exact(c).zip(idx) {
            dx[r * c..(r + 1) * c].copy_from_slice(src);
        }
    }
    (total, count)
}
