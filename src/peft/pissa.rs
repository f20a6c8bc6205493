//! PiSSA (Meng et al., 2024): LoRA whose `A` and `B` start at the principal
//! singular vectors of the frozen weight, `s·B·A = U_r·Σ_r·V_rᵀ`, so
//! training moves the weight's main directions instead of a random
//! subspace. PEFT then subtracts `s·B₀·A₀` from the base weight; here the
//! base file stays untouched (it is quantized and shared) and the graph
//! holds `s·B₀·A₀` as a frozen correction instead:
//! `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ − s·(x·A₀ᵀ)·B₀ᵀ`, zero at the start.
//!
//! The SVD is of the decoded weight, by randomized subspace iteration
//! ([`super::svd`]), once per weight when the method is made. The trained
//! adapter is a rank-`2r` LoRA (`[A; A₀]`, `[B, −B₀]`), which llama.cpp and
//! PEFT load as plain LoRA.

use super::lora::{LoraConfig, dropped_input, low_rank_term, param_name};
use super::{Effect, Method, MethodSpec, ParamMap};
use crate::Result;
use crate::graph::{Graph, GraphHook, LinearSite, Param, Shape, TensorId};
use crate::model::Model;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::Arc;

/// `(A₀ (r, in), B₀ (out, r))` of one weight.
type Factors = (Arc<[f32]>, Arc<[f32]>);

/// PiSSA on the linears a [`LoraConfig`] selects.
pub struct Pissa {
    /// Rank, alpha, targets, layers, dropout.
    pub config: LoraConfig,
    n_layers: usize,
    /// `(A₀ (r, in), B₀ (out, r))` of every adapted weight, by name.
    init: HashMap<String, Factors>,
}

impl Pissa {
    /// PiSSA with `config` on `model`: the SVD of every adapted weight.
    pub fn new(config: LoraConfig, spec: &MethodSpec, model: &Model) -> Result<Pissa> {
        let n_layers = model.spec().layers.len();
        config.validate(n_layers)?;
        let (r, s) = (config.rank, config.scale());
        let mut init = HashMap::new();
        for (i, (_, _, w)) in super::sites(&config, model).enumerate() {
            if r > w.rows.min(w.cols) {
                return Err(crate::Error::Invalid(format!(
                    "PiSSA rank {r} is more than {} × {} allows (its smaller side): use --rank {} or less",
                    w.name,
                    w.rows,
                    w.rows.min(w.cols)
                )));
            }
            let wf = super::dequantize(model, w)?;
            let svd = super::svd::top_singular(&wf, w.rows, w.cols, r, spec.pissa_iters, i as u64);
            // s·B·A = U Σ Vᵀ with A = √(Σ/s)·Vᵀ, B = U·√(Σ/s).
            let root: Vec<f32> = svd.s.iter().map(|v| (v / s).sqrt()).collect();
            let a: Vec<f32> = svd
                .vt
                .chunks_exact(w.cols)
                .zip(&root)
                .flat_map(|(row, &k)| row.iter().map(move |v| v * k))
                .collect();
            let b: Vec<f32> = svd
                .u
                .chunks_exact(r)
                .flat_map(|row| row.iter().zip(&root).map(|(v, k)| v * k))
                .collect();
            init.insert(w.name.clone(), (a.into(), b.into()));
        }
        Ok(Pissa {
            config,
            n_layers,
            init,
        })
    }
}

impl GraphHook for Pissa {
    fn linear(&self, g: &mut Graph, site: &LinearSite, x: TensorId, y: TensorId) -> TensorId {
        if !self.config.selects(self.n_layers, site.layer, site.target) {
            return y;
        }
        let (r, w) = (self.config.rank, site.weight);
        let s = self.config.scale();
        let a = g.param(param_name(&w.name, "a"), Shape::new(r, w.cols));
        let b = g.param(param_name(&w.name, "b"), Shape::new(w.rows, r));
        let (a0, b0) = self.init[&w.name].clone();
        let a0 = g.constant(
            &format!("{}.pissa_a0", w.name),
            Shape::new(r, w.cols),
            || a0,
        );
        let b0 = g.constant(
            &format!("{}.pissa_b0", w.name),
            Shape::new(w.rows, r),
            || b0,
        );
        let xin = dropped_input(g, &self.config, site, x);
        let y = low_rank_term(g, site.layer, xin, y, (a, b), s);
        // The correction belongs to the frozen weight: it reads the input
        // without dropout, as PEFT's residual weight does.
        low_rank_term(g, site.layer, x, y, (a0, b0), -s)
    }
}

impl Method for Pissa {
    fn name(&self) -> &'static str {
        "pissa"
    }

    fn owns(&self, name: &str) -> bool {
        name.ends_with(".lora_a") || name.ends_with(".lora_b")
    }

    fn init_param(&self, p: &Param, _rng: &mut ChaCha8Rng) -> Vec<f32> {
        if let Some(base) = p.name.strip_suffix(".lora_a") {
            self.init[base].0.to_vec()
        } else if let Some(base) = p.name.strip_suffix(".lora_b") {
            self.init[base].1.to_vec()
        } else {
            vec![0.0; p.shape.numel()]
        }
    }

    fn lr_multiplier(&self, name: &str) -> f32 {
        self.config.lr_multiplier(name)
    }

    /// One rank-`2r` low-rank effect per weight: `[s·A; −s·A₀]`, `[B, B₀]`.
    fn effects(&self, params: &ParamMap, _model: &Model) -> Result<Vec<(String, Effect)>> {
        let (r, s) = (self.config.rank, self.config.scale());
        let mut out = Vec::new();
        for (base, low) in super::lora::low_rank_effects(params, r, s)? {
            let Effect::LowRank { a, b, .. } = low else {
                unreachable!("low_rank_effects makes low-rank effects")
            };
            let (a0, b0) = &self.init[&base];
            let mut a2 = a;
            a2.extend(a0.iter().map(|v| -s * v));
            let out_rows = b.len() / r;
            let mut b2 = Vec::with_capacity(out_rows * 2 * r);
            for i in 0..out_rows {
                b2.extend_from_slice(&b[i * r..(i + 1) * r]);
                b2.extend_from_slice(&b0[i * r..(i + 1) * r]);
            }
            out.push((
                base,
                Effect::LowRank {
                    rank: 2 * r,
                    a: a2,
                    b: b2,
                },
            ));
        }
        Ok(out)
    }
}
