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

/// The first key of `k0..t1`, the keys queries `t0..t1` of sequence `b`
/// see (0 where a sink is: every query sees it).
fn block_keys(rows: &Rows, b: usize, t0: usize, t1: usize, geom: &AttnGeom) -> usize {
    if geom.sink > 0 {
        return 0;
    }
    (t0..t1)
        .map(|t| rows.lo(b, t, geom.window))
        .min()
        .unwrap_or(t0)
}

/// One block of queries of every head of a key/value group: the query
/// rows `t0..t1` of `heads` heads, stacked head by head, against keys
/// `k0..t1` of sequence `b`.
#[derive(Clone, Copy)]
struct Block {
    b: usize,
    t0: usize,
    t1: usize,
    k0: usize,
    heads: usize,
}

impl Block {
    /// Queries `t0..t0 + QB` (within the sequence) of `heads` heads of
    /// sequence `b`, with the keys they see.
    fn at(rows: &Rows, b: usize, t0: usize, heads: usize, geom: &AttnGeom) -> Block {
        let t1 = (t0 + QB).min(rows.seq);
        let k0 = block_keys(rows, b, t0, t1, geom);
        Block {
            b,
            t0,
            t1,
            k0,
            heads,
        }
    }

    /// Query rows per head.
    fn m(&self) -> usize {
        self.t1 - self.t0
    }
    /// Key columns.
    fn w(&self) -> usize {
        self.t1 - self.k0
    }
}

/// Scores `s (heads·m, w)` of one [`Block`] turned into probabilities in
/// place, with `p = exp(scale·s − lse)` when `lse_in` is given (backward,
/// indexed by stacked row) or a fresh softmax whose log-sum-exp is written
/// to `lse_out[row]` (forward).
fn probabilities(
    s: &mut [f32],
    rows: &Rows,
    blk: Block,
    geom: &AttnGeom,
    lse_in: Option<&[f32]>,
    lse_out: &mut [f32],
) {
    let (m, w) = (blk.m(), blk.w());
    for (row, r) in s.chunks_exact_mut(w).take(blk.heads * m).enumerate() {
        let t = blk.t0 + row % m;
        let lo = rows.lo(blk.b, t, geom.window) - blk.k0;
        let hi = t - blk.k0;
        // The sink's keys 0..ns (k0 is 0 when there is one), then lo..=hi.
        let ns = geom.sink.min(lo);
        let (head, tail) = r.split_at_mut(lo);
        let (sink, gap) = head.split_at_mut(ns);
        let live = &mut tail[..=hi - lo];
        match lse_in {
            Some(lse) => {
                fastmath::exp_shift(sink, geom.scale, lse[row]);
                fastmath::exp_shift(live, geom.scale, lse[row]);
            }
            None => {
                let m = fastmath::max(live).max(fastmath::max(sink)) * geom.scale;
                let sum =
                    fastmath::exp_sum(sink, geom.scale, m) + fastmath::exp_sum(live, geom.scale, m);
                fastmath::scale(sink, 1.0 / sum);
                fastmath::scale(live, 1.0 / sum);
                lse_out[row] = m + sum.ln();
            }
        }
        gap.fill(0.0);
        r[hi + 1..].fill(0.0);
    }
}

/// Rows `t0..t1` of heads `h0..h0 + heads` of sequence `b` of `x (N, H·d)`,
/// stacked head by head into `out (heads·m, d)`.
fn gather(
    x: &[f32],
    (b, t_len, qd, d): (usize, usize, usize, usize),
    h0: usize,
    blk: Block,
    out: &mut [f32],
) {
    let m = blk.m();
    for gi in 0..blk.heads {
        for t in blk.t0..blk.t1 {
            let src = (b * t_len + t) * qd + (h0 + gi) * d;
            let dst = (gi * m + t - blk.t0) * d;
            out[dst..dst + d].copy_from_slice(&x[src..src + d]);
        }
    }
}

/// `o (N, H·d)` and `lse (N, H)` from `q (N, H·d)`, `k`, `v (N, Hkv·d)`.
/// One task per (sequence, key/value head): the query heads that share a
/// key/value head are stacked into one product per block of queries.
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
    // Per task: its heads' outputs (heads·T, d) and log-sum-exps (heads·T).
    let parts: Vec<(usize, usize, Vec<f32>, Vec<f32>)> = (0..rows.batch * geom.n_kv_head)
        .into_par_iter()
        .map(|task| {
            let (b, kvh) = (task / geom.n_kv_head, task % geom.n_kv_head);
            let h0 = kvh * group;
            let ks = &k[b * t_len * kvd + kvh * d..];
            let vs = &v[b * t_len * kvd + kvh * d..];
            let mut out = vec![0.0; group * t_len * d];
            let mut l = vec![0.0; group * t_len];
            let mut s = vec![0.0; group * QB * t_len];
            let mut qg = vec![0.0; group * QB * d];
            let mut og = vec![0.0; group * QB * d];
            let mut lg = vec![0.0; group * QB];
            for t0 in (0..t_len).step_by(QB) {
                let blk = Block::at(rows, b, t0, group, geom);
                let (t1, k0) = (blk.t1, blk.k0);
                let (m, w) = (blk.m(), blk.w());
                gather(q, (b, t_len, qd, d), h0, blk, &mut qg);
                let ko = Operand::new(&ks[k0 * kvd..], kvd).t();
                matmul_into(
                    group * m,
                    w,
                    d,
                    Operand::new(&qg, d),
                    ko,
                    &mut s,
                    w,
                    false,
                    1,
                );
                probabilities(&mut s, rows, blk, geom, None, &mut lg);
                let vo = Operand::new(&vs[k0 * kvd..], kvd);
                matmul_into(
                    group * m,
                    d,
                    w,
                    Operand::new(&s, w),
                    vo,
                    &mut og,
                    d,
                    false,
                    1,
                );
                for gi in 0..group {
                    let dst = (gi * t_len + t0) * d;
                    out[dst..dst + m * d].copy_from_slice(&og[gi * m * d..(gi + 1) * m * d]);
                    l[gi * t_len + t0..gi * t_len + t1].copy_from_slice(&lg[gi * m..(gi + 1) * m]);
                }
            }
            (b, h0, out, l)
        })
        .collect();
    for (b, h0, out, l) in parts {
        for gi in 0..group {
            let h = h0 + gi;
            for t in 0..t_len {
                let r = b * t_len + t;
                let src = (gi * t_len + t) * d;
                o[r * qd + h * d..r * qd + (h + 1) * d].copy_from_slice(&out[src..src + d]);
                lse[r * h_n + h] = l[gi * t_len + t];
            }
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

/// `dq`, `dk`, `dv` from `do`: per (sequence, kv head), for each block of
/// queries of all the group's heads stacked, `P = exp(S − lse)`,
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
    type Part = (usize, usize, Vec<f32>, Vec<f32>, Vec<f32>);
    let parts: Vec<Part> = (0..rows.batch * geom.n_kv_head)
        .into_par_iter()
        .map(|task| {
            let (b, kvh) = (task / geom.n_kv_head, task % geom.n_kv_head);
            let h0 = kvh * group;
            let ks = &s.k[b * t_len * kvd + kvh * d..];
            let vs = &s.v[b * t_len * kvd + kvh * d..];
            let (mut dk_l, mut dv_l) = (vec![0.0; t_len * d], vec![0.0; t_len * d]);
            // The group's dq, stacked (heads·T, d).
            let mut dq_g = vec![0.0; group * t_len * d];
            let mut p = vec![0.0; group * QB * t_len];
            let mut dp = vec![0.0; group * QB * t_len];
            let (mut qg, mut dog, mut og, mut dqb) = (
                vec![0.0; group * QB * d],
                vec![0.0; group * QB * d],
                vec![0.0; group * QB * d],
                vec![0.0; group * QB * d],
            );
            let mut lg = vec![0.0; group * QB];
            let mut unused = [0.0f32; 0];
            let dims = (b, t_len, qd, d);
            for t0 in (0..t_len).step_by(QB) {
                let blk = Block::at(rows, b, t0, group, geom);
                let (t1, k0) = (blk.t1, blk.k0);
                let (m, w) = (blk.m(), blk.w());
                let gm = group * m;
                gather(s.q, dims, h0, blk, &mut qg);
                gather(d_o, dims, h0, blk, &mut dog);
                gather(s.o, dims, h0, blk, &mut og);
                for gi in 0..group {
                    for t in t0..t1 {
                        lg[gi * m + t - t0] = s.lse[(b * t_len + t) * h_n + h0 + gi];
                    }
                }
                let qo = Operand::new(&qg, d);
                let dop = Operand::new(&dog, d);
                let ko = Operand::new(&ks[k0 * kvd..], kvd);
                let vo = Operand::new(&vs[k0 * kvd..], kvd);
                matmul_into(gm, w, d, qo, ko.t(), &mut p, w, false, 1);
                probabilities(&mut p, rows, blk, geom, Some(&lg), &mut unused);
                let pt = Operand::new(&p, w).t();
                matmul_into(w, d, gm, pt, dop, &mut dv_l[k0 * d..], d, true, 1);
                matmul_into(gm, w, d, dop, vo.t(), &mut dp, w, false, 1);
                for row in 0..gm {
                    let dot =
                        fastmath::dot(&dog[row * d..(row + 1) * d], &og[row * d..(row + 1) * d]);
                    let (pr, dr) = (&p[row * w..(row + 1) * w], &mut dp[row * w..(row + 1) * w]);
                    fastmath::softmax_back(dr, pr, dot, geom.scale);
                }
                let ds = Operand::new(&dp, w);
                matmul_into(gm, d, w, ds, ko, &mut dqb, d, false, 1);
                matmul_into(w, d, gm, ds.t(), qo, &mut dk_l[k0 * d..], d, true, 1);
                for gi in 0..group {
                    let dst = (gi * t_len + t0) * d;
                    dq_g[dst..dst + m * d].copy_from_slice(&dqb[gi * m * d..(gi + 1) * m * d]);
                }
            }
            (b, kvh, dq_g, dk_l, dv_l)
        })
        .collect();
    for (b, kvh, dq_g, dk_l, dv_l) in parts {
        for t in 0..t_len {
            let r = b * t_len + t;
            let kv = r * kvd + kvh * d;
            dk[kv..kv + d].copy_from_slice(&dk_l[t * d..(t + 1) * d]);
            dv[kv..kv + d].copy_from_slice(&dv_l[t * d..(t + 1) * d]);
            for gi in 0..group {
                let h = kvh * group + gi;
                let src = (gi * t_len + t) * d;
                dq[r * qd + h * d..r * qd + (h + 1) * d].copy_from_slice(&dq_g[src..src + d]);
            }
        }
    }
}
