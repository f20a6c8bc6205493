//! LoKr (LyCORIS; Edalati et al., 2022): the update is a Kronecker product
//! `ΔW = s·W₁ ⊗ (B₂·A₂)` of a small full matrix `W₁ (out₁, in₁)` and a
//! rank-`r` product `(out₂, r)·(r, in₂)`, with `out = out₁·out₂`,
//! `in = in₁·in₂` split as PEFT's `factorization` splits them (the factor
//! pair nearest the square root, smaller first). As PEFT, `s = α/r`, `W₁`
//! starts at zero and the others Kaiming-uniform. `ΔW` is formed each step.

use super::lora::{LoraConfig, dropped_input};
use super::{Effect, Method, ParamMap};
use crate::Result;
use crate::graph::{Graph, GraphHook, LinearSite, Op, Param, Phase, Shape, TensorId};
use crate::model::Model;
use rand_chacha::ChaCha8Rng;

/// LoKr on the linears a [`LoraConfig`] selects.
pub struct Lokr {
    /// Rank, alpha, targets, layers, dropout.
    pub config: LoraConfig,
    n_layers: usize,
}

/// Name of a LoKr factor of a base weight: `w1`, `w2_a`, `w2_b` (PEFT's
/// `lokr_w1` …).
pub fn factor_name(base: &str, which: &str) -> String {
    format!("{base}.lokr_{which}")
}

/// `dimension = m·n` with `m ≤ n` the factor pair nearest √dimension
/// (PEFT's `factorization` with `factor = −1`).
pub fn factorization(dimension: usize) -> (usize, usize) {
    let (mut m, mut n) = (1, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n { (n, m) } else { (m, n) }
}

/// Shapes `(out₁, in₁)` of `W₁` and `(out₂, in₂)` of `B₂·A₂` for a weight of
/// `rows × cols`.
pub fn shapes(rows: usize, cols: usize) -> ((usize, usize), (usize, usize)) {
    let (out1, out2) = factorization(rows);
    let (in1, in2) = factorization(cols);
    ((out1, in1), (out2, in2))
}

impl Lokr {
    /// LoKr with `config` on an `n_layers` model.
    pub fn new(config: LoraConfig, n_layers: usize) -> Result<Lokr> {
        config.validate(n_layers)?;
        Ok(Lokr { config, n_layers })
    }
}

impl GraphHook for Lokr {
    fn linear(&self, g: &mut Graph, site: &LinearSite, x: TensorId, y: TensorId) -> TensorId {
        if !self.config.selects(self.n_layers, site.layer, site.target) {
            return y;
        }
        let (r, w) = (self.config.rank, site.weight);
        let ((o1, i1), (o2, i2)) = shapes(w.rows, w.cols);
        let at = Some(site.layer);
        let fw = Phase::Forward;
        let w1 = g.param(factor_name(&w.name, "w1"), Shape::new(o1, i1));
        let a = g.param(factor_name(&w.name, "w2_a"), Shape::new(o2, r));
        let b = g.param(factor_name(&w.name, "w2_b"), Shape::new(r, i2));
        let w2 = g.push(
            Op::MatmulNN,
            &[a, b],
            &[("lokr_w2", Shape::new(o2, i2))],
            at,
            fw,
        )[0];
        let full = Shape::new(w.rows, w.cols);
        let k = g.push(Op::Kron, &[w1, w2], &[("lokr_dw", full)], at, fw)[0];
        let ks = g.push(
            Op::Scale {
                s: self.config.scale(),
            },
            &[k],
            &[("lokr_dws", full)],
            at,
            fw,
        )[0];
        let xin = dropped_input(g, &self.config, site, x);
        let shape = g.shape(y);
        g.push(Op::MatmulTAdd, &[y, xin, ks], &[("lokr_y", shape)], at, fw)[0]
    }
}

impl Method for Lokr {
    fn name(&self) -> &'static str {
        "lokr"
    }

    fn owns(&self, name: &str) -> bool {
        name.contains(".lokr_")
    }

    fn init_param(&self, p: &Param, rng: &mut ChaCha8Rng) -> Vec<f32> {
        if p.name.ends_with(".lokr_w1") {
            vec![0.0; p.shape.numel()]
        } else {
            super::kaiming(p.shape.numel(), p.shape.cols, rng)
        }
    }

    fn effects(&self, params: &ParamMap, model: &Model) -> Result<Vec<(String, Effect)>> {
        let (r, s) = (self.config.rank, self.config.scale());
        let mut out = Vec::new();
        for (_, _, w) in super::sites(&self.config, model) {
            let ((o1, i1), (o2, i2)) = shapes(w.rows, w.cols);
            let f = |which: &str| super::param(params, &factor_name(&w.name, which));
            let (w1, a, b) = (f("w1")?, f("w2_a")?, f("w2_b")?);
            let mut w2 = vec![0.0f32; o2 * i2];
            for i in 0..o2 {
                for j in 0..i2 {
                    w2[i * i2 + j] = (0..r).map(|k| a[i * r + k] * b[k * i2 + j]).sum();
                }
            }
            let mut d = vec![0.0; w.rows * w.cols];
            crate::backend::cpu::train::peft_ops::kron(w1, (o1, i1), &w2, (o2, i2), &mut d);
            d.iter_mut().for_each(|v| *v *= s);
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

#[cfg(test)]
mod tests {
    #[test]
    fn factorization_is_peft_s() {
        // PEFT's docstring examples, and SmolLM2's widths.
        assert_eq!(super::factorization(256), (16, 16));
        assert_eq!(super::factorization(128), (8, 16));
        assert_eq!(super::factorization(127), (1, 127));
        assert_eq!(super::factorization(576), (24, 24));
        assert_eq!(super::factorization(1536), (32, 48));
        assert_eq!(super::factorization(192), (12, 16));
    }
}
