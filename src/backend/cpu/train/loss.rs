//! The loss head: output projection, softmax cross-entropy and its input
//! gradient in one op, over chunks of tokens so that only
//! `chunk × vocab` logits exist at a time (never `tokens × vocab`).

use crate::backend::cpu::gemm::{Operand, matmul_into};
use crate::backend::cpu::matmul::{QMatrix, matmul};
use rayon::prelude::*;

/// Vocabulary rows decoded per task in the gradient product.
const BAND: usize = 256;
/// Groups of bands summed separately (in parallel) and then in order.
const GROUPS: usize = 8;

/// Summed NLL and its input gradient.
///
/// - `h (N, C)`: final hidden states; `w (V, C)`: the frozen output matrix
/// - `targets (N)`: token to predict, `u32::MAX` for none
/// - `dx (N, C)` ← `loss_scale · ∂(Σ NLL)/∂h`
/// - `logits`: scratch of at least `chunk × V`
///
/// Returns (Σ NLL over targets in f64, number of targets).
pub fn loss_head(
    h: &[f32],
    w: &QMatrix,
    targets: &[u32],
    loss_scale: f32,
    chunk: usize,
    logits: &mut [f32],
    dx: &mut [f32],
) -> (f64, usize) {
    let (c, v) = (w.cols, w.rows);
    let mut total = 0.0f64;
    let mut count = 0usize;
    for (ci, (hc, dxc)) in h
        .chunks(chunk * c)
        .zip(dx.chunks_mut(chunk * c))
        .enumerate()
    {
        let rows = hc.len() / c;
        let tc = &targets[ci * chunk..ci * chunk + rows];
        if tc.iter().all(|&t| t == u32::MAX) {
            dxc.fill(0.0);
            continue;
        }
        let lg = &mut logits[..rows * v];
        matmul(hc, w, lg);
        let per_row: Vec<(f64, usize)> = lg
            .par_chunks_mut(v)
            .zip(tc.par_iter())
            .map(|(r, &t)| {
                if t == u32::MAX || t as usize >= v {
                    r.fill(0.0);
                    return (0.0, 0);
                }
                let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = r.iter().map(|&x| ((x - m) as f64).exp()).sum();
                let lse = m as f64 + sum.ln();
                let nll = lse - r[t as usize] as f64;
                for x in r.iter_mut() {
                    *x = ((*x as f64 - lse).exp() as f32) * loss_scale;
                }
                r[t as usize] -= loss_scale;
                (nll, 1)
            })
            .collect();
        for (nll, n) in per_row {
            total += nll;
            count += n;
        }
        // dx = dlogits · W, summed over bands of the vocabulary: a fixed
        // number of groups of bands, each summed in order and the groups
        // added in order, so the result does not depend on scheduling.
        let lg: &[f32] = lg;
        let bands = v.div_ceil(BAND);
        let per_group = bands.div_ceil(GROUPS);
        let partials: Vec<Vec<f32>> = (0..bands.div_ceil(per_group))
            .into_par_iter()
            .map(|grp| {
                let mut acc = vec![0.0f32; rows * c];
                let mut scratch = vec![0.0f32; BAND * c];
                for band in grp * per_group..((grp + 1) * per_group).min(bands) {
                    let r0 = band * BAND;
                    let nr = BAND.min(v - r0);
                    for i in 0..nr {
                        w.dequantize_row(r0 + i, &mut scratch[i * c..(i + 1) * c]);
                    }
                    let a = Operand::new(&lg[r0..], v);
                    matmul_into(
                        rows,
                        c,
                        nr,
                        a,
                        Operand::new(&scratch, c),
                        &mut acc,
                        c,
                        true,
                        1,
                    );
                }
                acc
            })
            .collect();
        dxc.fill(0.0);
        for p in partials {
            dxc.iter_mut().zip(&p).for_each(|(x, y)| *x += y);
        }
    }
    (total, count)
}
