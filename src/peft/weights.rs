//! An adapter loaded for inference: per frozen tensor, the [`Effect`]s a
//! trained method has there, applied by the CPU decoder around its frozen
//! products and norms, in the order the training graph applied them.

use super::Effect;
use crate::backend::cpu::gemm::{Operand, matmul_into};
use crate::backend::cpu::invariant;
use crate::{Error, Result};
use std::collections::HashMap;

/// `(base, rank, A′ (rank, in) carrying the scale, B (out, rank))`.
pub type LowRankPair = (String, usize, Vec<f32>, Vec<f32>);

/// An adapter loaded for inference (LoRA, or any method's effects), keyed
/// by the base tensor's name.
#[derive(Debug, Clone, Default)]
pub struct AdapterWeights {
    by_base: HashMap<String, Vec<SiteEffect>>,
}

#[derive(Debug, Clone)]
enum SiteEffect {
    LowRank(LowRank),
    Dense {
        n_in: usize,
        n_out: usize,
        /// `(n_out, n_in)`.
        delta: Vec<f32>,
    },
    OutScale(Vec<f32>),
    InScale(Vec<f32>),
    NormScale(Vec<f32>),
    Prefix {
        rows: usize,
        values: Vec<f32>,
    },
    Bottleneck {
        size: usize,
        /// `(size, C)`.
        down: Vec<f32>,
        /// `(C, size)`.
        up: Vec<f32>,
        scale: f32,
        parallel: bool,
        act: crate::model::Activation,
    },
}

#[derive(Debug, Clone)]
struct LowRank {
    rank: usize,
    n_in: usize,
    n_out: usize,
    /// `(rank, n_in)`, pre-multiplied by the scale.
    a: Vec<f32>,
    /// `(n_out, rank)`.
    b: Vec<f32>,
}

impl SiteEffect {
    fn is_additive(&self) -> bool {
        matches!(self, SiteEffect::LowRank(_) | SiteEffect::Dense { .. })
    }
}

/// `1 + strength·(v − 1)`: a scale at `strength` (1 as trained, 0 none).
fn at_strength(v: Vec<f32>, strength: f32) -> Vec<f32> {
    if strength == 1.0 {
        return v;
    }
    v.into_iter().map(|x| 1.0 + strength * (x - 1.0)).collect()
}

impl AdapterWeights {
    /// The pairs of a GGUF LoRA `file`, each scaled by the file's scale
    /// times `strength` (1 for the adapter as trained). `check_base` has
    /// verified names and shapes against the base model.
    pub fn new(file: &crate::export::gguf_lora::LoraFile, strength: f32) -> AdapterWeights {
        let s = file.scale() * strength;
        let mut w = AdapterWeights::default();
        for p in &file.pairs {
            let low = LowRank {
                rank: file.rank,
                n_in: p.n_in,
                n_out: p.n_out,
                a: p.a.iter().map(|v| v * s).collect(),
                b: p.b.clone(),
            };
            w.push(&p.base, SiteEffect::LowRank(low));
        }
        w
    }

    /// Effects (as a method's [`super::Method::effects`] or an adapter file
    /// gives them) at `strength`: additive terms are multiplied by it,
    /// scales moved from 1 by that fraction of their change.
    pub fn from_effects(effects: Vec<(String, Effect)>, strength: f32) -> Result<AdapterWeights> {
        let mut w = AdapterWeights::default();
        for (base, e) in effects {
            let bad = |m: String| Err(Error::Invalid(format!("adapter effect on {base}: {m}")));
            let site = match e {
                Effect::LowRank { rank, a, b } => {
                    if rank == 0 || a.len() % rank != 0 || b.len() % rank != 0 {
                        return bad(format!(
                            "{} and {} values for rank {rank}",
                            a.len(),
                            b.len()
                        ));
                    }
                    SiteEffect::LowRank(LowRank {
                        rank,
                        n_in: a.len() / rank,
                        n_out: b.len() / rank,
                        a: a.into_iter().map(|v| v * strength).collect(),
                        b,
                    })
                }
                Effect::Dense { rows, cols, delta } => {
                    if delta.len() != rows * cols {
                        return bad(format!("{} values for {rows} × {cols}", delta.len()));
                    }
                    let delta = delta.into_iter().map(|v| v * strength).collect();
                    SiteEffect::Dense {
                        n_in: cols,
                        n_out: rows,
                        delta,
                    }
                }
                Effect::OutScale(v) => SiteEffect::OutScale(at_strength(v, strength)),
                Effect::InScale(v) => SiteEffect::InScale(at_strength(v, strength)),
                Effect::NormScale(v) => SiteEffect::NormScale(at_strength(v, strength)),
                Effect::Bottleneck {
                    size,
                    down,
                    up,
                    scale,
                    parallel,
                    act,
                } => {
                    if size == 0 || down.len() % size != 0 || down.len() != up.len() {
                        return bad(format!(
                            "{} and {} values for a width of {size}",
                            down.len(),
                            up.len()
                        ));
                    }
                    SiteEffect::Bottleneck {
                        size,
                        down,
                        up,
                        scale: scale * strength,
                        parallel,
                        act,
                    }
                }
                Effect::Prefix { rows, values } => {
                    if strength != 1.0 {
                        return bad(format!(
                            "virtual tokens have no strength (got {strength}): load a prompt or \
                             prefix adapter at 1"
                        ));
                    }
                    if rows == 0 || values.len() % rows != 0 {
                        return bad(format!("{} values for {rows} virtual rows", values.len()));
                    }
                    SiteEffect::Prefix { rows, values }
                }
            };
            w.push(&base, site);
        }
        Ok(w)
    }

    fn push(&mut self, base: &str, e: SiteEffect) {
        self.by_base.entry(base.to_string()).or_default().push(e);
    }

    /// Number of adapted tensors.
    pub fn len(&self) -> usize {
        self.by_base.len()
    }

    /// Whether no tensor is adapted.
    pub fn is_empty(&self) -> bool {
        self.by_base.is_empty()
    }

    /// Whether the base tensor named `base` is adapted.
    pub fn adapts(&self, base: &str) -> bool {
        self.by_base.contains_key(base)
    }

    /// The names of the tensors the adapter acts on, sorted.
    pub fn bases(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.by_base.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Fold the effects on `base` into its decoded weight `w` (`rows ×
    /// cols`; a norm vector is one row): terms added and output scales
    /// applied in order. Input scales are not applied: they scale what
    /// every adapter's terms read, so a merge multiplies the columns by
    /// all adapters' [`AdapterWeights::in_scale`] once they are all folded.
    /// Virtual tokens and bottleneck adapters add computation no weight
    /// holds: an error naming the tensor.
    pub fn fold_into(&self, base: &str, w: &mut [f32], rows: usize, cols: usize) -> Result<()> {
        use crate::backend::cpu::gemm::{Operand, matmul_into};
        let bad = |m: String| Err(Error::Invalid(format!("{base}: {m}")));
        for e in self.by_base.get(base).into_iter().flatten() {
            match e {
                SiteEffect::LowRank(d) => {
                    if (d.n_in, d.n_out) != (cols, rows) {
                        return bad(format!(
                            "a {} × {} update for a {rows} × {cols} weight",
                            d.n_out, d.n_in
                        ));
                    }
                    // W (rows × cols) += B (rows × r) · A′ (r × cols).
                    let (b, a) = (Operand::new(&d.b, d.rank), Operand::new(&d.a, cols));
                    matmul_into(rows, cols, d.rank, b, a, w, cols, true, 0);
                }
                SiteEffect::Dense { n_in, n_out, delta } => {
                    if (*n_in, *n_out) != (cols, rows) {
                        return bad(format!(
                            "a {n_out} × {n_in} update for a {rows} × {cols} weight"
                        ));
                    }
                    w.iter_mut().zip(delta).for_each(|(w, d)| *w += d);
                }
                SiteEffect::OutScale(v) | SiteEffect::NormScale(v) if rows == 1 => {
                    w.iter_mut().zip(v).for_each(|(w, v)| *w *= v);
                }
                SiteEffect::OutScale(v) => {
                    for (row, s) in w.chunks_exact_mut(cols).zip(v) {
                        row.iter_mut().for_each(|w| *w *= s);
                    }
                }
                SiteEffect::InScale(_) => {}
                SiteEffect::NormScale(_) => return bad("a norm scale on a matrix".into()),
                SiteEffect::Prefix { .. } => {
                    return bad(
                        "virtual tokens (prompt or prefix tuning) are not a change to any weight: \
                         use the adapter at run time (--adapter)"
                            .into(),
                    );
                }
                SiteEffect::Bottleneck { .. } => {
                    return bad(
                        "a bottleneck adapter adds layers no weight holds: use it at run time \
                         (--adapter)"
                            .into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// The adapter as GGUF LoRA pairs `(base, rank, A′, B)` (A′ carrying the
    /// scale), when all its effects are low-rank of one rank: what
    /// llama.cpp's LoRA can hold. `None` otherwise.
    pub fn low_rank_pairs(&self) -> Option<Vec<LowRankPair>> {
        let mut out = Vec::new();
        for base in self.bases() {
            for e in &self.by_base[base] {
                let SiteEffect::LowRank(d) = e else {
                    return None;
                };
                out.push((base.to_string(), d.rank, d.a.clone(), d.b.clone()));
            }
        }
        let one_rank = out.windows(2).all(|w| w[0].1 == w[1].1);
        let one_per_base = out.windows(2).all(|w| w[0].0 != w[1].0);
        (one_rank && one_per_base && !out.is_empty()).then_some(out)
    }

    /// Whether every effect only adds a term beside a frozen product (LoRA,
    /// PiSSA, VeRA, LoHa, LoKr): what requests batched with others can use.
    pub fn is_additive(&self) -> bool {
        self.by_base.values().flatten().all(SiteEffect::is_additive)
    }

    /// Virtual tokens the adapter puts before every sequence (prompt and
    /// prefix tuning), 0 for none.
    pub fn virtual_rows(&self) -> usize {
        self.by_base
            .values()
            .flatten()
            .filter_map(|e| match e {
                SiteEffect::Prefix { rows, .. } => Some(*rows),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// The virtual rows put before `base`'s output (the embeddings for
    /// the token table, a layer's keys or values for `attn_k` / `attn_v`).
    pub fn prefix(&self, base: &str) -> Option<&[f32]> {
        self.by_base.get(base)?.iter().find_map(|e| match e {
            SiteEffect::Prefix { values, .. } => Some(values.as_slice()),
            _ => None,
        })
    }

    /// The bottleneck adapters of the sublayer whose output projection is
    /// `base`, on its output `y (n, C)`, given its normalized input `x`.
    pub fn apply_sublayer(&self, base: &str, x: &[f32], y: &mut [f32]) {
        use crate::backend::cpu::gemm::{Operand, matmul_into};
        for e in self.by_base.get(base).into_iter().flatten() {
            let SiteEffect::Bottleneck {
                size,
                down,
                up,
                scale,
                parallel,
                act,
            } = e
            else {
                continue;
            };
            let (r, c) = (*size, down.len() / size);
            let n = y.len() / c;
            let src = if *parallel { x.to_vec() } else { y.to_vec() };
            let mut h = vec![0.0; n * r];
            let d = Operand::new(down, c).t();
            matmul_into(n, r, c, Operand::new(&src, c), d, &mut h, r, false, 1);
            crate::backend::cpu::ops::gated_activation(&mut h, &vec![1.0; n * r], *act);
            h.iter_mut().for_each(|v| *v *= scale);
            let u = Operand::new(up, r).t();
            matmul_into(n, c, r, Operand::new(&h, r), u, y, c, true, 1);
        }
    }

    /// The product of the input scales of `base`, if it has any.
    pub fn in_scale(&self, base: &str) -> Option<Vec<f32>> {
        let mut out: Option<Vec<f32>> = None;
        for e in self.by_base.get(base)? {
            if let SiteEffect::InScale(v) = e {
                match &mut out {
                    Some(o) => o.iter_mut().zip(v).for_each(|(o, v)| *o *= v),
                    None => out = Some(v.clone()),
                }
            }
        }
        out
    }

    /// `x (n, width) ⊙= v` for each norm scale of the norm weight `base`.
    pub fn apply_norm(&self, base: &str, x: &mut [f32]) {
        for e in self.by_base.get(base).into_iter().flatten() {
            if let SiteEffect::NormScale(v) = e {
                scale_rows(x, v);
            }
        }
    }

    /// `out (n, n_out) += Δ(x (n, n_in))` of the additive effects of `base`.
    pub fn apply(&self, base: &str, x: &[f32], out: &mut [f32]) {
        self.apply_with(base, x, out, false)
    }

    /// [`AdapterWeights::apply`]; `invariant` computes each row's products
    /// exactly as it would alone (see [`crate::backend::cpu::invariant`]).
    pub fn apply_with(&self, base: &str, x: &[f32], out: &mut [f32], invariant: bool) {
        for e in self.by_base.get(base).into_iter().flatten() {
            add_term(e, x, out, invariant);
        }
    }

    /// Every effect of `base` after its frozen product `out` of the (already
    /// input-scaled) `x`, in order: additive terms added, output scales
    /// multiplied.
    pub fn apply_site(&self, base: &str, x: &[f32], out: &mut [f32], invariant: bool) {
        for e in self.by_base.get(base).into_iter().flatten() {
            match e {
                SiteEffect::OutScale(v) => scale_rows(out, v),
                e => add_term(e, x, out, invariant),
            }
        }
    }
}

/// `x (n, k·m) ⊙= v (m)` row by row.
fn scale_rows(x: &mut [f32], v: &[f32]) {
    for row in x.chunks_exact_mut(v.len()) {
        row.iter_mut().zip(v).for_each(|(x, v)| *x *= v);
    }
}

/// `out += Δ(x)` for an additive effect (nothing for the others).
fn add_term(e: &SiteEffect, x: &[f32], out: &mut [f32], invariant: bool) {
    match e {
        SiteEffect::LowRank(d) => {
            let n = x.len() / d.n_in;
            let mut h = vec![0.0; n * d.rank];
            if invariant {
                invariant::matmul_f32(x, &d.a, d.n_in, &mut h, false);
                invariant::matmul_f32(&h, &d.b, d.rank, out, true);
                return;
            }
            let a = Operand::new(&d.a, d.n_in).t();
            matmul_into(
                n,
                d.rank,
                d.n_in,
                Operand::new(x, d.n_in),
                a,
                &mut h,
                d.rank,
                false,
                1,
            );
            let b = Operand::new(&d.b, d.rank).t();
            matmul_into(
                n,
                d.n_out,
                d.rank,
                Operand::new(&h, d.rank),
                b,
                out,
                d.n_out,
                true,
                1,
            );
        }
        SiteEffect::Dense { n_in, n_out, delta } => {
            if invariant {
                invariant::matmul_f32(x, delta, *n_in, out, true);
                return;
            }
            let n = x.len() / n_in;
            let d = Operand::new(delta, *n_in).t();
            matmul_into(
                n,
                *n_out,
                *n_in,
                Operand::new(x, *n_in),
                d,
                out,
                *n_out,
                true,
                1,
            );
        }
        _ => {}
    }
}
