//! Prefix tuning (Li and Liang, 2021): every layer's attention gets `n`
//! trained key and value rows before the sequence's own, which every query
//! sees; the model is untouched. The keys are used as they are (no RoPE),
//! as PEFT passes them in the cache. They start at the keys and values the
//! base model computes for a text (`prompt_init`) or a vocabulary sample,
//! so the prefix starts as real context rather than noise. (Li and Liang
//! train through a reparameterizing MLP for stability; this trains the
//! rows directly, as PEFT's `prefix_projection = false`.)
//!
//! In the training graph the rows take the first `n` positions of every
//! packed row (their queries' outputs are discarded), and each layer's
//! keys and values there are replaced by the trained ones after RoPE. At
//! inference they fill the first `n` slots of the KV cache.

use super::{Effect, Method, MethodSpec, ParamMap};
use crate::Result;
use crate::graph::{Graph, GraphHook, LinearSite, Op, Param, Phase, Shape, TensorId};
use crate::model::Model;
use rand_chacha::ChaCha8Rng;

/// Name of layer `layer`'s trained keys (`"k"`) or values (`"v"`).
pub fn rows_name(layer: usize, which: &str) -> String {
    format!("blk.{layer}.prefix_{which}")
}

/// Prefix tuning with `n` rows per layer.
pub struct PrefixTuning {
    n: usize,
    /// Per layer: starting keys and values, `(n, kv)` each.
    init: Vec<(Vec<f32>, Vec<f32>)>,
}

impl PrefixTuning {
    /// `spec.virtual_tokens` rows per layer of `model`, started from the
    /// base model's keys and values for `spec.prompt_init` or a
    /// vocabulary sample.
    pub fn new(spec: &MethodSpec, model: &Model) -> Result<PrefixTuning> {
        let n = spec.virtual_tokens;
        let ids = super::prompt::init_tokens(model, n, spec.prompt_init.as_deref())?;
        let dec = crate::backend::cpu::CpuDecoder::new(model)?;
        let mut cache = dec.new_cache(n);
        dec.forward_hidden(&ids, &mut cache)?;
        let init = (0..model.spec().layers.len())
            .map(|l| {
                let (k, v) = cache.layer(l);
                (k.to_vec(), v.to_vec())
            })
            .collect();
        Ok(PrefixTuning { n, init })
    }
}

impl GraphHook for PrefixTuning {
    fn linear(&self, _g: &mut Graph, _site: &LinearSite, _x: TensorId, y: TensorId) -> TensorId {
        y
    }

    fn virtual_tokens(&self) -> usize {
        self.n
    }

    fn attention_kv(
        &self,
        g: &mut Graph,
        layer: usize,
        k: TensorId,
        v: TensorId,
    ) -> (TensorId, TensorId) {
        let (n, seq) = (self.n, g.seq);
        let put = |g: &mut Graph, t: TensorId, which: &str| {
            let shape = g.shape(t);
            let p = g.param(rows_name(layer, which), Shape::new(n, shape.cols));
            let op = Op::PrefixRows { n, seq };
            g.push(
                op,
                &[t, p],
                &[("prefix_kv", shape)],
                Some(layer),
                Phase::Forward,
            )[0]
        };
        let k = put(g, k, "k");
        let v = put(g, v, "v");
        (k, v)
    }
}

impl Method for PrefixTuning {
    fn name(&self) -> &'static str {
        "prefix"
    }

    fn owns(&self, name: &str) -> bool {
        name.ends_with(".prefix_k") || name.ends_with(".prefix_v")
    }

    fn init_param(&self, p: &Param, _rng: &mut ChaCha8Rng) -> Vec<f32> {
        let layer: usize = p
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse().ok())
            .expect("prefix parameters are named blk.N.prefix_k|v");
        let (k, v) = &self.init[layer];
        if p.name.ends_with(".prefix_k") {
            k.clone()
        } else {
            v.clone()
        }
    }

    fn effects(&self, params: &ParamMap, model: &Model) -> Result<Vec<(String, Effect)>> {
        let mut out = Vec::new();
        for (li, l) in model.spec().layers.iter().enumerate() {
            for (which, w) in [("k", &l.wk), ("v", &l.wv)] {
                let values = super::param(params, &rows_name(li, which))?.to_vec();
                out.push((
                    w.name.clone(),
                    Effect::Prefix {
                        rows: self.n,
                        values,
                    },
                ));
            }
        }
        Ok(out)
    }
}
