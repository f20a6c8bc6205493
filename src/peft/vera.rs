//! VeRA (Kopiczko et al., 2024): one pair of frozen random matrices
//! `A (r, in)`, `B (out, r)` shared by every adapted layer, and per layer
//! two trained vectors: `y += b ⊙ ((d ⊙ (x·Aᵀ))·Bᵀ)`. `d` starts at
//! `d_init` (0.1) and `b` at zero, so training starts from the base model;
//! a layer costs `r + out` parameters whatever its width.
//!
//! As PEFT, the shared matrices are made once at the largest width
//! (Kaiming-uniform, from a seed of their own) and each layer uses their
//! leading columns / rows. They are graph constants: regenerated from the
//! seed, never trained, stored with the adapter.

use super::lora::{LoraConfig, dropped_input};
use super::{Effect, Method, MethodSpec, ParamMap};
use crate::Result;
use crate::graph::{Graph, GraphHook, LinearSite, Op, Param, Phase, Shape, TensorId};
use crate::model::{DecoderSpec, Model};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

/// VeRA on the linears a [`LoraConfig`] selects (its rank and dropout; VeRA
/// has no alpha).
pub struct Vera {
    /// Rank, targets, layers, dropout.
    pub config: LoraConfig,
    n_layers: usize,
    d_init: f32,
    /// Shared `A (r, max_in)` and `B (max_out, r)`.
    a: Arc<[f32]>,
    b: Arc<[f32]>,
    max_in: usize,
}

/// Names of the scaling vectors `d` (`"d"`) and `b` of a base weight.
pub fn vector_name(base: &str, which: &str) -> String {
    format!("{base}.vera_{which}")
}

impl Vera {
    /// VeRA with `config` (rank, targets, layers) and `spec`'s VeRA settings.
    pub fn new(config: LoraConfig, spec: &MethodSpec, model: &DecoderSpec) -> Result<Vera> {
        let n_layers = model.layers.len();
        config.validate(n_layers)?;
        let sites = model
            .layers
            .iter()
            .enumerate()
            .flat_map(|(li, l)| config.targets.iter().map(move |t| (li, t.weight(l))))
            .filter(|(li, _)| config.layers.contains(n_layers, *li));
        let (mut max_in, mut max_out) = (0, 0);
        for (_, w) in sites {
            max_in = max_in.max(w.cols);
            max_out = max_out.max(w.rows);
        }
        let r = config.rank;
        let mut rng = ChaCha8Rng::seed_from_u64(spec.vera_seed);
        let a = super::kaiming(r * max_in, max_in, &mut rng);
        let b = super::kaiming(max_out * r, r, &mut rng);
        Ok(Vera {
            config,
            n_layers,
            d_init: spec.vera_d_init,
            a: a.into(),
            b: b.into(),
            max_in,
        })
    }

    /// The shared `A`'s first `cols` columns, `(r, cols)`.
    pub fn a_slice(&self, cols: usize) -> Vec<f32> {
        self.a
            .chunks_exact(self.max_in)
            .flat_map(|row| &row[..cols])
            .copied()
            .collect()
    }

    /// The shared `B`'s first `rows` rows, `(rows, r)`.
    pub fn b_slice(&self, rows: usize) -> Vec<f32> {
        self.b[..rows * self.config.rank].to_vec()
    }

    /// The shared matrices whole: `A (r, max_in)`, `B (max_out, r)`.
    pub fn shared(&self) -> (&[f32], &[f32]) {
        (&self.a, &self.b)
    }
}

impl GraphHook for Vera {
    fn linear(&self, g: &mut Graph, site: &LinearSite, x: TensorId, y: TensorId) -> TensorId {
        if !self.config.selects(self.n_layers, site.layer, site.target) {
            return y;
        }
        let (r, w) = (self.config.rank, site.weight);
        let n = g.shape(x).rows;
        let at = Some(site.layer);
        let fw = Phase::Forward;
        let a = g.constant(&format!("vera_A.{}", w.cols), Shape::new(r, w.cols), || {
            self.a_slice(w.cols).into()
        });
        let b = g.constant(&format!("vera_B.{}", w.rows), Shape::new(w.rows, r), || {
            self.b_slice(w.rows).into()
        });
        let d = g.param(vector_name(&w.name, "d"), Shape::new(1, r));
        let bv = g.param(vector_name(&w.name, "b"), Shape::new(1, w.rows));
        let xin = dropped_input(g, &self.config, site, x);
        let h = g.push(
            Op::MatmulT,
            &[xin, a],
            &[("vera_h", Shape::new(n, r))],
            at,
            fw,
        )[0];
        let hd = g.push(
            Op::MulCols,
            &[h, d],
            &[("vera_hd", Shape::new(n, r))],
            at,
            fw,
        )[0];
        let z = g.push(
            Op::MatmulT,
            &[hd, b],
            &[("vera_z", Shape::new(n, w.rows))],
            at,
            fw,
        )[0];
        let zb = g.push(
            Op::MulCols,
            &[z, bv],
            &[("vera_zb", Shape::new(n, w.rows))],
            at,
            fw,
        )[0];
        g.push(
            Op::Add,
            &[y, zb],
            &[("vera_y", Shape::new(n, w.rows))],
            at,
            fw,
        )[0]
    }
}

impl Method for Vera {
    fn name(&self) -> &'static str {
        "vera"
    }

    fn owns(&self, name: &str) -> bool {
        name.ends_with(".vera_d") || name.ends_with(".vera_b")
    }

    fn init_param(&self, p: &Param, _rng: &mut ChaCha8Rng) -> Vec<f32> {
        let v = if p.name.ends_with(".vera_d") {
            self.d_init
        } else {
            0.0
        };
        vec![v; p.shape.numel()]
    }

    /// A low-rank effect per layer: `A′ = diag(d)·A`, `B′ = diag(b)·B`.
    fn effects(&self, params: &ParamMap, model: &Model) -> Result<Vec<(String, Effect)>> {
        let r = self.config.rank;
        let mut out = Vec::new();
        for (_, _, w) in super::sites(&self.config, model) {
            let d = super::param(params, &vector_name(&w.name, "d"))?;
            let bv = super::param(params, &vector_name(&w.name, "b"))?;
            let mut a = self.a_slice(w.cols);
            for (row, &dk) in a.chunks_exact_mut(w.cols).zip(d) {
                row.iter_mut().for_each(|v| *v *= dk);
            }
            let mut b = self.b_slice(w.rows);
            for (row, &bi) in b.chunks_exact_mut(r).zip(bv) {
                row.iter_mut().for_each(|v| *v *= bi);
            }
            out.push((w.name.clone(), Effect::LowRank { rank: r, a, b }));
        }
        Ok(out)
    }
}
