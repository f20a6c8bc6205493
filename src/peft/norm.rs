//! Norm tuning: train the RMSNorm weights of the selected layers (and the
//! output norm when every layer is selected), a few thousand parameters.
//! Each norm's output is multiplied by a trained vector that starts at 1:
//! `g·s` is the tuned weight, which a merge writes into the model.

use super::lora::LayerSelection;
use super::{Effect, Method, ParamMap};
use crate::Result;
use crate::graph::{Graph, GraphHook, LinearSite, NormSite, Op, Param, Phase, Shape, TensorId};
use crate::model::Model;
use rand_chacha::ChaCha8Rng;

/// Norm tuning on the selected layers.
pub struct NormTuning {
    layers: LayerSelection,
    n_layers: usize,
}

/// Name of the trained scale of a norm weight.
pub fn scale_name(base: &str) -> String {
    format!("{base}.norm_scale")
}

impl NormTuning {
    /// Norm tuning of the selected layers of an `n_layers` model.
    pub fn new(layers: LayerSelection, n_layers: usize) -> NormTuning {
        NormTuning { layers, n_layers }
    }
}

impl GraphHook for NormTuning {
    fn linear(&self, _g: &mut Graph, _site: &LinearSite, _x: TensorId, y: TensorId) -> TensorId {
        y
    }

    fn norm(&self, g: &mut Graph, site: &NormSite, y: TensorId) -> TensorId {
        let selected = match site.layer {
            Some(l) => self.layers.contains(self.n_layers, l),
            None => self.layers == LayerSelection::All,
        };
        if !selected {
            return y;
        }
        let w = site.weight;
        let v = g.param(scale_name(&w.name), Shape::new(1, w.numel()));
        let shape = g.shape(y);
        g.push(
            Op::MulCols,
            &[y, v],
            &[("norm_tuned", shape)],
            site.layer,
            Phase::Forward,
        )[0]
    }
}

impl Method for NormTuning {
    fn name(&self) -> &'static str {
        "norm"
    }

    fn owns(&self, name: &str) -> bool {
        name.ends_with(".norm_scale")
    }

    fn init_param(&self, p: &Param, _rng: &mut ChaCha8Rng) -> Vec<f32> {
        vec![1.0; p.shape.numel()]
    }

    fn effects(&self, params: &ParamMap, model: &Model) -> Result<Vec<(String, Effect)>> {
        Ok(model
            .spec()
            .weights()
            .into_iter()
            .filter_map(|w| {
                let v = params.get(&scale_name(&w.name))?;
                Some((w.name.clone(), Effect::NormScale(v.clone())))
            })
            .collect())
    }
}
