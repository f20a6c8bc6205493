//! Causal multi-head attention with grouped key/value heads, an optional
//! sliding window, over a KV cache.

use super::gemm::{gemm_nn, gemm_nt};
use rayon::prelude::*;

/// With at least this many queries, attention runs as GEMMs over blocks of
/// queries; below it (generation), as dot products per query.
const BLOCKED_MIN_TOKENS: usize = 8;
/// Queries per block in the GEMM path: bounds the score scratch to
/// `QUERY_BLOCK × keys` per thread.
const QUERY_BLOCK: usize = 32;

/// Shape and masking of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads; query head `h` reads kv head `h / (n_head / n_kv_head)`.
    pub n_kv_head: usize,
    /// Dimension of each head.
    pub head_dim: usize,
    /// Score scale (usually `1/√head_dim`).
    pub scale: f32,
    /// Keys visible to a query at position `i` are `j ≤ i` with `i − j < window`.
    pub window: Option<usize>,
}

/// `out` = softmax(q·kᵀ·scale + mask)·v for `n_tok` queries at positions
/// `pos0..pos0+n_tok`.
///
/// - `q`: `(n_tok, n_head · head_dim)`
/// - `k`, `v`: `(≥ pos0 + n_tok, n_kv_head · head_dim)`: the cache, already
///   holding these tokens' keys and values
/// - `out`: `(n_tok, n_head · head_dim)`
pub fn attention(q: &[f32], k: &[f32], v: &[f32], pos0: usize, s: &AttnShape, out: &mut [f32]) {
    if q.len() / (s.n_head * s.head_dim) >= BLOCKED_MIN_TOKENS {
        attention_blocked(q, k, v, pos0, s, out);
    } else {
        attention_rows(q, k, v, pos0, s, out);
    }
}

/// First key visible from position `pos`.
fn first_key(pos: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (pos + 1).saturating_sub(w))
}

/// Blocks of `QUERY_BLOCK` queries per task; for each head, scores
/// S = Q·Kᵀ over the keys any query of the block sees (one GEMM), masked
/// softmax per row, then O = P·V (a second GEMM).
fn attention_blocked(q: &[f32], k: &[f32], v: &[f32], pos0: usize, s: &AttnShape, out: &mut [f32]) {
    let d = s.head_dim;
    let q_row = s.n_head * d;
    let kv_row = s.n_kv_head * d;
    let group = s.n_head / s.n_kv_head;
    out.par_chunks_mut(QUERY_BLOCK * q_row)
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(scores, o), (b, out_b)| {
                let t0 = b * QUERY_BLOCK;
                let m = out_b.len() / q_row;
                let lo = first_key(pos0 + t0, s.window);
                let hi = pos0 + t0 + m; // exclusive: the last query sees itself
                let n = hi - lo;
                scores.resize(m * n, 0.0);
                o.resize(m * d, 0.0);
                for h in 0..s.n_head {
                    let off = (h / group) * d;
                    let qh = &q[t0 * q_row + h * d..];
                    let kh = &k[lo * kv_row + off..];
                    let vh = &v[lo * kv_row + off..];
                    gemm_nt(m, n, d, qh, q_row, kh, kv_row, scores, n);
                    for (i, row) in scores.chunks_exact_mut(n).enumerate() {
                        let pos = pos0 + t0 + i;
                        // Visible keys of this query, as indices into `row`.
                        let (a, z) = (first_key(pos, s.window) - lo, pos + 1 - lo);
                        let max =
                            row[a..z].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) * s.scale;
                        let mut sum = 0.0f32;
                        for x in &mut row[a..z] {
                            *x = (*x * s.scale - max).exp();
                            sum += *x;
                        }
                        let inv = 1.0 / sum;
                        row[a..z].iter_mut().for_each(|x| *x *= inv);
                        row[..a].fill(0.0);
                        row[z..].fill(0.0);
                    }
                    gemm_nn(m, d, n, scores, n, vh, kv_row, o, d);
                    for (dst, src) in out_b.chunks_exact_mut(q_row).zip(o.chunks_exact(d)) {
                        dst[h * d..(h + 1) * d].copy_from_slice(src);
                    }
                }
            },
        );
}

/// One task per (query, head): dot products against each visible key.
fn attention_rows(q: &[f32], k: &[f32], v: &[f32], pos0: usize, s: &AttnShape, out: &mut [f32]) {
    let d = s.head_dim;
    let q_row = s.n_head * d;
    let kv_row = s.n_kv_head * d;
    let group = s.n_head / s.n_kv_head;
    // One task per (token, head): each owns a head-sized slice of `out`.
    out.par_chunks_mut(d)
        .enumerate()
        .for_each_init(Vec::new, |scores, (i, o)| {
            let (t, h) = (i / s.n_head, i % s.n_head);
            let pos = pos0 + t;
            let lo = first_key(pos, s.window);
            let qh = &q[t * q_row + h * d..][..d];
            let off = (h / group) * d;
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in lo..=pos {
                let kj = &k[j * kv_row + off..][..d];
                let sc = dot(qh, kj) * s.scale;
                max = max.max(sc);
                scores.push(sc);
            }
            let mut sum = 0.0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            o.fill(0.0);
            for (j, &p) in (lo..=pos).zip(scores.iter()) {
                let vj = &v[j * kv_row + off..][..d];
                let w = p / sum;
                for (a, &b) in o.iter_mut().zip(vj) {
                    *a += w * b;
                }
            }
        });
}

/// Dot product with several accumulators so it vectorizes.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward reference: full score matrix with an explicit mask.
    fn reference(q: &[f32], k: &[f32], v: &[f32], pos0: usize, s: &AttnShape) -> Vec<f32> {
        let d = s.head_dim;
        let n_tok = q.len() / (s.n_head * d);
        let mut out = vec![0.0; q.len()];
        for t in 0..n_tok {
            for h in 0..s.n_head {
                let g = h / (s.n_head / s.n_kv_head);
                let i = pos0 + t;
                let mut w: Vec<f64> = (0..=i)
                    .map(|j| {
                        let visible = s.window.is_none_or(|win| i - j < win);
                        if !visible {
                            return f64::NEG_INFINITY;
                        }
                        (0..d)
                            .map(|c| {
                                q[(t * s.n_head + h) * d + c] as f64
                                    * k[(j * s.n_kv_head + g) * d + c] as f64
                            })
                            .sum::<f64>()
                            * s.scale as f64
                    })
                    .collect();
                let m = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = w.iter().map(|x| (x - m).exp()).sum();
                w.iter_mut().for_each(|x| *x = (*x - m).exp() / z);
                for c in 0..d {
                    out[(t * s.n_head + h) * d + c] = (0..=i)
                        .map(|j| w[j] * v[(j * s.n_kv_head + g) * d + c] as f64)
                        .sum::<f64>() as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_reference_with_gqa_window_and_offset() {
        for window in [None, Some(3)] {
            let s = AttnShape {
                n_head: 4,
                n_kv_head: 2,
                head_dim: 10,
                scale: 0.3,
                window,
            };
            let (pos0, n_tok) = (2, 5);
            let n_ctx = pos0 + n_tok;
            let f = |i: usize, m: usize| ((i * m % 101) as f32 / 50.0) - 1.0;
            let q: Vec<f32> = (0..n_tok * 40).map(|i| f(i, 37)).collect();
            let k: Vec<f32> = (0..n_ctx * 20).map(|i| f(i, 53)).collect();
            let v: Vec<f32> = (0..n_ctx * 20).map(|i| f(i, 71)).collect();
            let mut out = vec![0.0; q.len()];
            attention(&q, &k, &v, pos0, &s, &mut out);
            let want = reference(&q, &k, &v, pos0, &s);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{window:?}: {a} vs {b}");
            }
        }
    }
}
