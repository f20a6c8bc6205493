//! DoRA (Liu et al., 2024): LoRA's update `W + s·B·A` split into a
//! direction, normalized per output row, and a learned magnitude `m` per
//! output: `y = m / ‖W + s·B·A‖ᵣₒ𝓌 ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ)`, as PEFT's
//! `use_dora` computes it.
//!
//! The row norms come from the quantized `W` without expanding it: with
//! `c = ‖Wᵢ‖²` decoded once when the method is made, each step needs only
//! `A·Wᵀ` (a frozen product over `r` rows) and `A·Aᵀ` ([`Op::DoraNorm`]).
//! The gradient flows through the norm too (PEFT detaches it, to save the
//! memory of the full `W + s·B·A` that it materializes; here the norm's
//! backward is a few `(r, out)` products, so the exact gradient is kept).
//! `m` starts at `‖W‖`, so training starts from the base model.

use super::lora::{LoraConfig, dropped_input, low_rank_term, param_name};
use super::{Effect, Method, ParamMap};
use crate::Result;
use crate::graph::{Graph, GraphHook, LinearSite, Op, Param, Phase, Shape, TensorId};
use crate::model::Model;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::Arc;

/// DoRA on the linears a [`LoraConfig`] selects.
pub struct Dora {
    /// Rank, alpha, targets, layers, dropout.
    pub config: LoraConfig,
    n_layers: usize,
    /// `‖Wᵢ‖²` of every adapted weight, by name.
    row_norms2: HashMap<String, Arc<[f32]>>,
}

/// Name of the magnitude vector of a base weight.
pub fn magnitude_name(base: &str) -> String {
    format!("{base}.dora_m")
}

/// `‖Wᵢ‖²` of each row of the decoded `w (rows, cols)`, summed in f64.
pub fn row_norms2(w: &[f32], cols: usize) -> Vec<f32> {
    w.chunks_exact(cols)
        .map(|r| r.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() as f32)
        .collect()
}

impl Dora {
    /// DoRA with `config` on `model` (decodes each adapted weight once, for
    /// its row norms).
    pub fn new(config: LoraConfig, model: &Model) -> Result<Dora> {
        let n_layers = model.spec().layers.len();
        config.validate(n_layers)?;
        let mut row = HashMap::new();
        for (_, _, w) in super::sites(&config, model) {
            let d = super::dequantize(model, w)?;
            row.insert(w.name.clone(), Arc::from(row_norms2(&d, w.cols)));
        }
        Ok(Dora {
            config,
            n_layers,
            row_norms2: row,
        })
    }
}

impl GraphHook for Dora {
    fn linear(&self, g: &mut Graph, site: &LinearSite, x: TensorId, y: TensorId) -> TensorId {
        if !self.config.selects(self.n_layers, site.layer, site.target) {
            return y;
        }
        let (r, w) = (self.config.rank, site.weight);
        let s = self.config.scale();
        let at = Some(site.layer);
        let fw = Phase::Forward;
        let a = g.param(param_name(&w.name, "a"), Shape::new(r, w.cols));
        let b = g.param(param_name(&w.name, "b"), Shape::new(w.rows, r));
        let m = g.param(magnitude_name(&w.name), Shape::new(1, w.rows));
        let norms = self.row_norms2[&w.name].clone();
        let c = g.constant(
            &format!("{}.dora_w2", w.name),
            Shape::new(1, w.rows),
            || norms,
        );
        let xin = dropped_input(g, &self.config, site, x);
        let yl = low_rank_term(g, site.layer, xin, y, (a, b), s);
        let wid = g.frozen(w);
        let wa = g.push(
            Op::Linear { w: wid },
            &[a],
            &[("dora_wa", Shape::new(r, w.rows))],
            at,
            fw,
        )[0];
        let gram = g.push(
            Op::MatmulT,
            &[a, a],
            &[("dora_gram", Shape::new(r, r))],
            at,
            fw,
        )[0];
        let n2 = g.push(
            Op::DoraNorm { s },
            &[c, wa, b, gram],
            &[("dora_n2", Shape::new(1, w.rows))],
            at,
            fw,
        )[0];
        let scale = g.push(
            Op::RsqrtMul,
            &[m, n2],
            &[("dora_scale", Shape::new(1, w.rows))],
            at,
            fw,
        )[0];
        let shape = g.shape(yl);
        g.push(Op::MulCols, &[yl, scale], &[("dora_y", shape)], at, fw)[0]
    }
}

impl Method for Dora {
    fn name(&self) -> &'static str {
        "dora"
    }

    fn owns(&self, name: &str) -> bool {
        name.ends_with(".lora_a") || name.ends_with(".lora_b") || name.ends_with(".dora_m")
    }

    fn init_param(&self, p: &Param, rng: &mut ChaCha8Rng) -> Vec<f32> {
        if p.name.ends_with(".lora_a") {
            super::kaiming(p.shape.numel(), p.shape.cols, rng)
        } else if let Some(base) = p.name.strip_suffix(".dora_m") {
            self.row_norms2[base].iter().map(|v| v.sqrt()).collect()
        } else {
            vec![0.0; p.shape.numel()]
        }
    }

    fn lr_multiplier(&self, name: &str) -> f32 {
        self.config.lr_multiplier(name)
    }

    fn effects(&self, params: &ParamMap, model: &Model) -> Result<Vec<(String, Effect)>> {
        dora_effects(params, self.config.rank, self.config.scale(), model)
    }
}

/// DoRA's effects: the low-rank term, then `m / ‖W + s·B·A‖` per output
/// row (computed here from the decoded weight of `model`).
pub fn dora_effects(
    params: &ParamMap,
    rank: usize,
    s: f32,
    model: &Model,
) -> Result<Vec<(String, Effect)>> {
    let mut out = Vec::new();
    for (base, low) in super::lora::low_rank_effects(params, rank, s)? {
        let Effect::LowRank { a, b, .. } = &low else {
            unreachable!("low_rank_effects makes low-rank effects")
        };
        let w = model.spec().weight(&base).ok_or_else(|| {
            crate::Error::Invalid(format!(
                "DoRA tensor for {base}: the model has no such weight"
            ))
        })?;
        let m = super::param(params, &magnitude_name(&base))?;
        let wf = super::dequantize(model, w)?;
        // ‖Wᵢ + (B·A′)ᵢ‖ with A′ = s·A (already scaled).
        let scale: Vec<f32> = (0..w.rows)
            .map(|i| {
                let mut n2 = 0.0f64;
                for j in 0..w.cols {
                    let mut v = f64::from(wf[i * w.cols + j]);
                    for k in 0..rank {
                        v += f64::from(b[i * rank + k]) * f64::from(a[k * w.cols + j]);
                    }
                    n2 += v * v;
                }
                (f64::from(m[i]) / n2.sqrt()) as f32
            })
            .collect();
        out.push((base.clone(), low));
        out.push((base, Effect::OutScale(scale)));
    }
    Ok(out)
}
