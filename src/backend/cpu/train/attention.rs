//! Causal attention for training, forward and backward, over packed rows:
//! a query at row index `t` sees keys `j` with `seg_start[t] ≤ j ≤ t` (and
//! inside the sliding window). The forward keeps only the output and the
//! log-sum-exp of each (token, head); the backward recomputes the scores of
//! one (sequence, head) at a time, so no seq × seq matrix outlives a task.

use super::fastmath;
use crate::backend::cpu::gemm::{Operand, matmul_into};
use crate::graph::AttnGeom;
use rayon::prelude::*;

/// The rows of the batch: `batch` sequences of `seq` tokens.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Per token: first visible key's index within its row.
    pub seg_start: &'a [u32],
}

impl Rows<'_> {
    /// Visible keys `lo..=t` of query `t` of sequence `b`.
    fn lo(&self, b: usize, t: usize, window: Option<usize>) -> usize {
        let i = b * self.seq + t;
        let mut lo = self.seg_start[i] as usize;
        if let Some(w) = window {
            // Positions are consecutive inside a segment: `i − j < w`.
            lo = lo.max((t + 1).saturating_sub(w));
        }
        lo.min(t)
    }
}

/// Queries per block: a block's scores cover only the keys its queries can
/// see, so the causal upper triangle is never computed.
const QB: usize = 64;

/// The keys `lo..t1` that queries `t0..t1` of sequence `b` see.
fn block_keys(rows: &Rows, b: usize, t0: usize, t1: usize, window: Option<usize>) -> usize {
    (t0..t1).map(|t| rows.lo(b, t, window)).min().unwrap_or(t0)
}

/// Scores `s (t1−t0, t1−k0)` of one block turned into probabilities in
/// place, with `p = exp(scale·s − lse)` when `lse` is given (backward) or
/// a fresh softmax whose log-sum-exp is written to `lse_out` (forward).
#[allow(clippy::too_many_arguments)]
fn probabilities(
    s: &mut [f32],
    rows: &Rows,
    b: usize,
    (t0, t1, k0): (usize, usize, usize),
    geom: &AttnGeom,
    lse_in: Option<&dyn Fn(usize) -> f32>,
    lse_out: &mut [f32],
) {
    let w = t1 - k0;
    for t in t0..t1 {
        let lo = rows.lo(b, t, geom.window) - k0;
        let hi = t - k0;
        let r = &mut s[(t - t0) * w..(t - t0 + 1) * w];
        let live = &mut r[lo..=hi];
        match lse_in {
            Some(lse) => fastmath::exp_shift(live, geom.scale, lse(t)),
            None => {
                let m = fastmath::max(live) * geom.scale;
                let sum = fastmath::exp_sum(live, geom.scale, m);
                fastmath::scale(live, 1.0 / sum);
                lse_out[t - t0] = m + sum.ln();
            }
        }
        r[..lo].fill(0.0);
        r[hi + 1..].fill(0.0);
    }
}

/// `o (N, H·d)` and `lse (N, H)` from `q (N, H·d)`, `k`, `v (N, Hkv·d)`.
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rows: &Rows,
    geom: &AttnGeom,
    o: &mut [f32],
    lse: &mut [f32],
) {
    let (h_n, d, t_len) = (geom.n_head, geom.head_dim, rows.seq);
    let (qd, kvd) = (h_n * d, geom.n_kv_head * d);
    let group = h_n / geom.n_kv_head;
    let parts: Vec<(usize, usize, Vec<f32>, Vec<f32>)> = (0..rows.batch * h_n)
        .into_par_iter()
        .map(|task| {
            let (b, h) = (task / h_n, task % h_n);
            let kvh = h / group;
            let qs = &q[b * t_len * qd + h * d..];
            let ks = &k[b * t_len * kvd + kvh * d..];
            let vs = &v[b * t_len * kvd + kvh * d..];
            let mut out = vec![0.0; t_len * d];
            let mut l = vec![0.0; t_len];
            let mut s = vec![0.0; QB * t_len];
            for t0 in (0..t_len).step_by(QB) {
                let t1 = (t0 + QB).min(t_len);
                let k0 = block_keys(rows, b, t0, t1, geom.window);
                let (m, w) = (t1 - t0, t1 - k0);
                let qo = Operand::new(&qs[t0 * qd..], qd);
                let ko = Operand::new(&ks[k0 * kvd..], kvd).t();
                matmul_into(m, w, d, qo, ko, &mut s, w, false, 1);
                probabilities(&mut s, rows, b, (t0, t1, k0), geom, None, &mut l[t0..t1]);
                let vo = Operand::new(&vs[k0 * kvd..], kvd);
                matmul_into(
                    m,
                    d,
                    w,
                    Operand::new(&s, w),
                    vo,
                    &mut out[t0 * d..],
                    d,
                    false,
                    1,
                );
            }
            (b, h, out, l)
        })
        .collect();
    for (b, h, out, l) in parts {
        for t in 0..t_len {
            let r = b * t_len + t;
            o[r * qd + h * d..r * qd + (h + 1) * d].copy_from_slice(&out[t * d..(t + 1) * d]);
            lse[r * h_n + h] = l[t];
        }
    }
}

/// Inputs of [`attention_backward`].
pub struct AttnSaved<'a> {
    /// Queries after RoPE.
    pub q: &'a [f32],
    /// Keys after RoPE.
    pub k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
    /// Forward output.
    pub o: &'a [f32],
    /// Forward log-sum-exp per (token, head).
    pub lse: &'a [f32],
}

/// `dq`, `dk`, `dv` from `do`: per (sequence, kv head), for each query head
/// of the group and each block of queries, `P = exp(S − lse)`,
/// `dV += Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − rowsum(dO ⊙ O)) · scale`,
/// `dQ = dS·K`, `dK += dSᵀ·Q` — blocks in order, so sums are deterministic.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    s: &AttnSaved,
    d_o: &[f32],
    rows: &Rows,
    geom: &AttnGeom,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (h_n, d, t_len) = (geom.n_head, geom.head_dim, rows.seq);
    let (qd, kvd) = (h_n * d, geom.n_kv_head * d);
    let group = h_n / geom.n_kv_head;
    type Part = (usize, usize, Vec<Vec<f32>>, Vec<f32>, Vec<f32>);
    let parts: Vec<Part> = (0..rows.batch * geom.n_kv_head)
        .into_par_iter()
        .map(|task| {
            let (b, kvh) = (task / geom.n_kv_head, task % geom.n_kv_head);
            let ks = &s.k[b * t_len * kvd + kvh * d..];
            let vs = &s.v[b * t_len * kvd + kvh * d..];
            let (mut dk_l, mut dv_l) = (vec![0.0; t_len * d], vec![0.0; t_len * d]);
            let mut dqs = Vec::with_capacity(group);
            let mut p = vec![0.0; QB * t_len];
            let mut dp = vec![0.0; QB * t_len];
            let mut unused = [0.0f32; 0];
            for h in kvh * group..(kvh + 1) * group {
                let base = b * t_len * qd + h * d;
                let (qs, dos, os) = (&s.q[base..], &d_o[base..], &s.o[base..]);
                let mut dq_h = vec![0.0; t_len * d];
                let lse = |t: usize| s.lse[(b * t_len + t) * h_n + h];
                for t0 in (0..t_len).step_by(QB) {
                    let t1 = (t0 + QB).min(t_len);
                    let k0 = block_keys(rows, b, t0, t1, geom.window);
                    let (m, w) = (t1 - t0, t1 - k0);
                    let qo = Operand::new(&qs[t0 * qd..], qd);
                    let ko = Operand::new(&ks[k0 * kvd..], kvd);
                    let vo = Operand::new(&vs[k0 * kvd..], kvd);
                    let dop = Operand::new(&dos[t0 * qd..], qd);
                    matmul_into(m, w, d, qo, ko.t(), &mut p, w, false, 1);
                    probabilities(&mut p, rows, b, (t0, t1, k0), geom, Some(&lse), &mut unused);
                    matmul_into(
                        w,
                        d,
                        m,
                        Operand::new(&p, w).t(),
                        dop,
                        &mut dv_l[k0 * d..],
                        d,
                        true,
                        1,
                    );
                    matmul_into(m, w, d, dop, vo.t(), &mut dp, w, false, 1);
                    for t in t0..t1 {
                        let i = t - t0;
                        let dot = fastmath::dot(&dos[t * qd..t * qd + d], &os[t * qd..t * qd + d]);
                        let (pr, dr) = (&p[i * w..(i + 1) * w], &mut dp[i * w..(i + 1) * w]);
                        fastmath::softmax_back(dr, pr, dot, geom.scale);
                    }
                    let ds = Operand::new(&dp, w);
                    matmul_into(m, d, w, ds, ko, &mut dq_h[t0 * d..], d, false, 1);
                    matmul_into(w, d, m, ds.t(), qo, &mut dk_l[k0 * d..], d, true, 1);
                }
                dqs.push(dq_h);
            }
            (b, kvh, dqs, dk_l, dv_l)
        })
        .collect();
    for (b, kvh, dqs, dk_l, dv_l) in parts {
        for t in 0..t_len {
            let r = b * t_len + t;
            let kv = r * kvd + kvh * d;
            dk[kv..kv + d].copy_from_slice(&dk_l[t * d..(t + 1) * d]);
            dv[kv..kv + d].copy_from_slice(&dv_l[t * d..(t + 1) * d]);
            for (i, dq_h) in dqs.iter().enumerate() {
                let h = kvh * group + i;
                dq[r * qd + h * d..r * qd + (h + 1) * d].copy_from_slice(&dq_h[t * d..(t + 1) * d]);
            }
        }
    }
}
