//! Causal attention for training, forward and backward, over packed rows:
//! a query at row index `t` sees keys `j` with `seg_start[t] ≤ j ≤ t` (and
//! inside the sliding window). The forward keeps only the output and the
//! log-sum-exp of each (token, head); the backward recomputes the scores of
//! one (sequence, head) at a time, so no seq × seq matrix outlives a task.

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

/// Masked, scaled scores of one head turned into probabilities in place;
/// returns each row's log-sum-exp.
fn softmax_rows(s: &mut [f32], rows: &Rows, b: usize, geom: &AttnGeom) -> Vec<f32> {
    let t_len = rows.seq;
    let mut lse = vec![0.0; t_len];
    for t in 0..t_len {
        let lo = rows.lo(b, t, geom.window);
        let r = &mut s[t * t_len..(t + 1) * t_len];
        let mut m = f32::NEG_INFINITY;
        for v in &mut r[lo..=t] {
            *v *= geom.scale;
            m = m.max(*v);
        }
        let mut sum = 0.0;
        for v in &mut r[lo..=t] {
            *v = (*v - m).exp();
            sum += *v;
        }
        for v in &mut r[lo..=t] {
            *v /= sum;
        }
        r[..lo].fill(0.0);
        r[t + 1..].fill(0.0);
        lse[t] = m + sum.ln();
    }
    lse
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
            let mut s = vec![0.0; t_len * t_len];
            let qo = Operand::new(qs, qd);
            matmul_into(
                t_len,
                t_len,
                d,
                qo,
                Operand::new(ks, kvd).t(),
                &mut s,
                t_len,
                false,
                1,
            );
            let l = softmax_rows(&mut s, rows, b, geom);
            let mut out = vec![0.0; t_len * d];
            matmul_into(
                t_len,
                d,
                t_len,
                Operand::new(&s, t_len),
                Operand::new(vs, kvd),
                &mut out,
                d,
                false,
                1,
            );
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
/// of the group, `P = exp(S − lse)`, `dV += Pᵀ·dO`, `dP = dO·Vᵀ`,
/// `dS = P ⊙ (dP − rowsum(dO ⊙ O)) · scale`, `dQ = dS·K`, `dK += dSᵀ·Q`.
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
            let mut p = vec![0.0; t_len * t_len];
            let mut dp = vec![0.0; t_len * t_len];
            for h in kvh * group..(kvh + 1) * group {
                let base = b * t_len * qd + h * d;
                let (qs, dos, os) = (&s.q[base..], &d_o[base..], &s.o[base..]);
                matmul_into(
                    t_len,
                    t_len,
                    d,
                    Operand::new(qs, qd),
                    Operand::new(ks, kvd).t(),
                    &mut p,
                    t_len,
                    false,
                    1,
                );
                for t in 0..t_len {
                    let lo = rows.lo(b, t, geom.window);
                    let l = s.lse[(b * t_len + t) * h_n + h];
                    let r = &mut p[t * t_len..(t + 1) * t_len];
                    for x in &mut r[lo..=t] {
                        *x = (*x * geom.scale - l).exp();
                    }
                    r[..lo].fill(0.0);
                    r[t + 1..].fill(0.0);
                }
                let dop = Operand::new(dos, qd);
                matmul_into(
                    t_len,
                    d,
                    t_len,
                    Operand::new(&p, t_len).t(),
                    dop,
                    &mut dv_l,
                    d,
                    true,
                    1,
                );
                matmul_into(
                    t_len,
                    t_len,
                    d,
                    dop,
                    Operand::new(vs, kvd).t(),
                    &mut dp,
                    t_len,
                    false,
                    1,
                );
                for t in 0..t_len {
                    let dot: f32 = (0..d).map(|c| dos[t * qd + c] * os[t * qd + c]).sum();
                    let (pr, dr) = (
                        &p[t * t_len..(t + 1) * t_len],
                        &mut dp[t * t_len..(t + 1) * t_len],
                    );
                    for (x, &pv) in dr.iter_mut().zip(pr) {
                        *x = pv * (*x - dot) * geom.scale;
                    }
                }
                let mut dq_h = vec![0.0; t_len * d];
                matmul_into(
                    t_len,
                    d,
                    t_len,
                    Operand::new(&dp, t_len),
                    Operand::new(ks, kvd),
                    &mut dq_h,
                    d,
                    false,
                    1,
                );
                matmul_into(
                    t_len,
                    d,
                    t_len,
                    Operand::new(&dp, t_len).t(),
                    Operand::new(qs, qd),
                    &mut dk_l,
                    d,
                    true,
                    1,
                );
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
