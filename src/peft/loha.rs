//! LoHa (FedPara, Hyeon-Woo et al., 2022; LyCORIS): the update is the
//! Hadamard product of two rank-`r` products,
//! `ΔW = s·(B₁·A₁) ⊙ (B₂·A₂)`, of rank up to `r²` for the parameters of two
//! LoRAs. As PEFT, `s = α/r`; `B₁`, `A₁`, `B₂` start Kaiming-uniform and
//! `A₂` at zero. `ΔW (out, in)` is formed each step (as PEFT does), so a
//! site costs an `(out, in)` activation while it is alive.

use super::lora::{LoraConfig, dropped_input};
use super::{Effect, Method, ParamMap};
use crate::Result;
use crate::graph::{Graph, GraphHook, LinearSite, Op, Param, Phase, Shape, TensorId};
use crate::model::Model;
use rand_chacha::ChaCha8Rng;

/// LoHa on the linears a [`LoraConfig`] selects.
pub struct Loha {
    /// Rank, alpha, targets, layers, dropout.
    pub config: LoraConfig,
    n_layers: usize,
}

/// Name of a LoHa factor of a base weight: `w1_a (out, r)`, `w1_b (r, in)`,
/// `w2_a`, `w2_b` (PEFT's `hada_w1_a` …).
pub fn factor_name(base: &str, which: &str) -> String {
    format!("{base}.hada_{which}")
}

impl Loha {
    /// LoHa with `config` on an `n_layers` model.
    pub fn new(config: LoraConfig, n_layers: usize) -> Result<Loha> {
        config.validate(n_layers)?;
        Ok(Loha { config, n_layers })
    }
}

/// `(B₁·A₁) ⊙ (B₂·A₂)` of `(out, r)` / `(r, in)` factors, `(out, in)`.
pub fn delta(w1a: &[f32], w1b: &[f32], w2a: &[f32], w2b: &[f32], r: usize, s: f32) -> Vec<f32> {
    let (out, inn) = (w1a.len() / r, w1b.len() / r);
    let mut d = vec![0.0; out * inn];
    for i in 0..out {
        for j in 0..inn {
            let (mut p1, mut p2) = (0.0f32, 0.0f32);
            for k in 0..r {
                p1 += w1a[i * r + k] * w1b[k * inn + j];
                p2 += w2a[i * r + k] * w2b[k * inn + j];
            }
            d[i * inn + j] = s * p1 * p2;
        }
    }
    d
}

impl GraphHook for Loha {
    fn linear(&self, g: &mut Graph, site: &LinearSite, x: TensorId, y: TensorId) -> TensorId {
        if !self.config.selects(self.n_layers, site.layer, site.target) {
            return y;
        }
        let (r, w) = (self.config.rank, site.weight);
        let at = Some(site.layer);
        let fw = Phase::Forward;
        let full = Shape::new(w.rows, w.cols);
        let product = |g: &mut Graph, i: usize| {
            let a = g.param(
                factor_name(&w.name, &format!("w{i}_a")),
                Shape::new(w.rows, r),
            );
            let b = g.param(
                factor_name(&w.name, &format!("w{i}_b")),
                Shape::new(r, w.cols),
            );
            g.push(Op::MatmulNN, &[a, b], &[("loha_p", full)], at, fw)[0]
        };
        let p1 = product(g, 1);
        let p2 = product(g, 2);
        let d = g.push(Op::Mul, &[p1, p2], &[("loha_dw", full)], at, fw)[0];
        let ds = g.push(
            Op::Scale {
                s: self.config.scale(),
            },
            &[d],
            &[("loha_dws", full)],
            at,
            fw,
        )[0];
        let xin = dropped_input(g, &self.config, site, x);
        let shape = g.shape(y);
        g.push(Op::MatmulTAdd, &[y, xin, ds], &[("loha_y", shape)], at, fw)[0]
    }
}

impl Method for Loha {
    fn name(&self) -> &'static str {
        "loha"
    }

    fn owns(&self, name: &str) -> bool {
        name.contains(".hada_")
    }

    fn init_param(&self, p: &Param, rng: &mut ChaCha8Rng) -> Vec<f32> {
        if p.name.ends_with(".hada_w2_b") {
            vec![0.0; p.shape.numel()]
        } else {
            super::kaiming(p.shape.numel(), p.shape.cols, rng)
        }
    }

    fn effects(&self, params: &ParamMap, model: &Model) -> Result<Vec<(String, Effect)>> {
        let r = self.config.rank;
        let mut out = Vec::new();
        for (_, _, w) in super::sites(&self.config, model) {
            let f = |which: &str| super::param(params, &factor_name(&w.name, which));
            let d = delta(
                f("w1_a")?,
                f("w1_b")?,
                f("w2_a")?,
                f("w2_b")?,
                r,
                self.config.scale(),
            );
            let (rows, cols) = (w.rows, w.cols);
            out.push((
                w.name.clone(),
                Effect::Dense {
                    rows,
                    cols,
                    delta: d,
                },
            ));
        }
        Ok(out)
    }
}
