//! Bottleneck adapters: a small two-layer network beside a sublayer,
//! `a(h) = U·act(D·h)` with `D (r, C)`, `U (C, r)` and the model's own
//! activation; `U` starts at zero, so training starts from the base model.
//!
//! - **Serial** (Houlsby et al., 2019): after each sublayer (attention and
//!   feed-forward), on its output: `y + a(y)`.
//! - **Parallel** (He et al., 2022): beside the feed-forward sublayer, on
//!   its input, scaled: `y + s·a(x)` with `s = 4`, the paper's best setting.
//!
//! Both are applied before the residual addition (after Gemma's post-norms).
//! They have no biases (as LoRA has none).

use super::lora::LayerSelection;
use super::{Effect, Method, ParamMap};
use crate::Result;
use crate::graph::{Graph, GraphHook, LinearSite, Op, Param, Phase, Shape, SublayerSite, TensorId};
use crate::model::{Activation, Model};
use rand_chacha::ChaCha8Rng;

/// Scale of the parallel adapter's output.
pub const PARALLEL_SCALE: f32 = 4.0;

/// A serial or parallel bottleneck adapter.
pub struct Bottleneck {
    /// Parallel (on the feed-forward input) rather than serial.
    pub parallel: bool,
    /// Bottleneck width `r`.
    pub size: usize,
    layers: LayerSelection,
    n_layers: usize,
    act: Activation,
}

/// Name of a factor (`"down"`, `"up"`) of the adapter of a sublayer named
/// by its output projection `base`.
pub fn factor_name(base: &str, parallel: bool, which: &str) -> String {
    let kind = if parallel { "padapter" } else { "adapter" };
    format!("{base}.{kind}_{which}")
}

impl Bottleneck {
    /// An adapter of width `size` on the selected layers of `model`.
    pub fn new(parallel: bool, size: usize, layers: LayerSelection, model: &Model) -> Bottleneck {
        Bottleneck {
            parallel,
            size,
            layers,
            n_layers: model.spec().layers.len(),
            act: model.spec().activation,
        }
    }

    fn scale(&self) -> f32 {
        if self.parallel { PARALLEL_SCALE } else { 1.0 }
    }

    fn adapts(&self, site: &SublayerSite) -> bool {
        self.layers.contains(self.n_layers, site.layer) && (site.ffn || !self.parallel)
    }
}

impl GraphHook for Bottleneck {
    fn linear(&self, _g: &mut Graph, _site: &LinearSite, _x: TensorId, y: TensorId) -> TensorId {
        y
    }

    fn sublayer(&self, g: &mut Graph, site: &SublayerSite, x: TensorId, y: TensorId) -> TensorId {
        if !self.adapts(site) {
            return y;
        }
        let src = if self.parallel { x } else { y };
        let (n, c, r) = (g.shape(y).rows, g.shape(y).cols, self.size);
        let at = Some(site.layer);
        let fw = Phase::Forward;
        let base = &site.weight.name;
        let d = g.param(factor_name(base, self.parallel, "down"), Shape::new(r, c));
        let u = g.param(factor_name(base, self.parallel, "up"), Shape::new(c, r));
        let h = g.push(
            Op::MatmulT,
            &[src, d],
            &[("adapter_h", Shape::new(n, r))],
            at,
            fw,
        )[0];
        // act(h) as the gated op against ones (no separate activation op).
        let ones = g.constant(&format!("ones.{n}x{r}"), Shape::new(n, r), || {
            vec![1.0; n * r].into()
        });
        let a = g.push(
            Op::Gated { act: self.act },
            &[h, ones],
            &[("adapter_a", Shape::new(n, r))],
            at,
            fw,
        )[0];
        let a = if self.parallel {
            let s = self.scale();
            g.push(
                Op::Scale { s },
                &[a],
                &[("adapter_as", Shape::new(n, r))],
                at,
                fw,
            )[0]
        } else {
            a
        };
        g.push(
            Op::MatmulTAdd,
            &[y, a, u],
            &[("adapter_y", Shape::new(n, c))],
            at,
            fw,
        )[0]
    }
}

impl Method for Bottleneck {
    fn name(&self) -> &'static str {
        if self.parallel {
            "parallel-adapter"
        } else {
            "adapter"
        }
    }

    fn owns(&self, name: &str) -> bool {
        let kind = if self.parallel {
            ".padapter_"
        } else {
            ".adapter_"
        };
        name.contains(kind)
    }

    fn init_param(&self, p: &Param, rng: &mut ChaCha8Rng) -> Vec<f32> {
        if p.name.ends_with("_down") {
            super::kaiming(p.shape.numel(), p.shape.cols, rng)
        } else {
            vec![0.0; p.shape.numel()]
        }
    }

    fn effects(&self, params: &ParamMap, model: &Model) -> Result<Vec<(String, Effect)>> {
        let mut out = Vec::new();
        for l in &model.spec().layers {
            for w in [&l.wo, &l.w_down] {
                let down = factor_name(&w.name, self.parallel, "down");
                let Some(d) = params.get(&down) else {
                    continue;
                };
                let u = super::param(params, &factor_name(&w.name, self.parallel, "up"))?;
                out.push((
                    w.name.clone(),
                    Effect::Bottleneck {
                        size: self.size,
                        down: d.clone(),
                        up: u.to_vec(),
                        scale: self.scale(),
                        parallel: self.parallel,
                        act: self.act,
                    },
                ));
            }
        }
        Ok(out)
    }
}
