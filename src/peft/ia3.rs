//! (IA)³ (Liu et al., 2022): learned vectors that rescale the keys, the
//! values and the FFN's inner activation — the output of `attn_k` and
//! `attn_v`, the input of `ffn_down` — elementwise. They start at 1, so
//! training starts from the base model, and a layer costs `2·kv + ff`
//! parameters. As PEFT's `IA3Config`, any projection can be a target: the
//! FFN's down projection is scaled at its input, the others at their output.

use super::lora::LayerSelection;
use super::{Effect, Method, ParamMap};
use crate::Result;
use crate::graph::{Graph, GraphHook, LinearSite, Op, Param, Phase, Shape, Target, TensorId};
use crate::model::Model;
use rand_chacha::ChaCha8Rng;

/// (IA)³ on some projections of some layers.
pub struct Ia3 {
    targets: Vec<Target>,
    layers: LayerSelection,
    n_layers: usize,
}

/// Name of the scaling vector of a base weight.
pub fn vector_name(base: &str) -> String {
    format!("{base}.ia3")
}

/// Whether (IA)³ scales `target`'s input (the FFN's down projection) rather
/// than its output.
pub fn scales_input(target: Target) -> bool {
    target == Target::FfnDown
}

impl Ia3 {
    /// (IA)³ on `targets` of the selected layers of an `n_layers` model.
    pub fn new(targets: Vec<Target>, layers: LayerSelection, n_layers: usize) -> Ia3 {
        Ia3 {
            targets,
            layers,
            n_layers,
        }
    }

    fn adapts(&self, site: &LinearSite) -> bool {
        self.targets.contains(&site.target) && self.layers.contains(self.n_layers, site.layer)
    }

    fn scale(&self, g: &mut Graph, site: &LinearSite, t: TensorId, width: usize) -> TensorId {
        let v = g.param(vector_name(&site.weight.name), Shape::new(1, width));
        let shape = g.shape(t);
        g.push(
            Op::MulCols,
            &[t, v],
            &[("ia3", shape)],
            Some(site.layer),
            Phase::Forward,
        )[0]
    }
}

impl GraphHook for Ia3 {
    fn linear_input(&self, g: &mut Graph, site: &LinearSite, x: TensorId) -> TensorId {
        if !self.adapts(site) || !scales_input(site.target) {
            return x;
        }
        self.scale(g, site, x, site.weight.cols)
    }

    fn linear(&self, g: &mut Graph, site: &LinearSite, _x: TensorId, y: TensorId) -> TensorId {
        if !self.adapts(site) || scales_input(site.target) {
            return y;
        }
        self.scale(g, site, y, site.weight.rows)
    }
}

impl Method for Ia3 {
    fn name(&self) -> &'static str {
        "ia3"
    }

    fn owns(&self, name: &str) -> bool {
        name.ends_with(".ia3")
    }

    fn init_param(&self, p: &Param, _rng: &mut ChaCha8Rng) -> Vec<f32> {
        vec![1.0; p.shape.numel()]
    }

    fn effects(&self, params: &ParamMap, model: &Model) -> Result<Vec<(String, Effect)>> {
        let mut out = Vec::new();
        for l in &model.spec().layers {
            for t in Target::ALL {
                let base = &t.weight(l).name;
                let Some(v) = params.get(&vector_name(base)) else {
                    continue;
                };
                let e = if scales_input(t) {
                    Effect::InScale(v.clone())
                } else {
                    Effect::OutScale(v.clone())
                };
                out.push((base.clone(), e));
            }
        }
        Ok(out)
    }
}
