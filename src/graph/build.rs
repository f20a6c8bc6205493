//! The forward graph of a decoder ([`DecoderSpec`]) for one training step,
//! with a hook at every frozen linear where a PEFT method adds its terms.

use super::{AttnGeom, Graph, Op, Phase, Shape, TensorId};
use crate::model::{DecoderSpec, LayerSpec, Weight};
use crate::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// The linear projections of a block that adapters can wrap.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Query projection.
    AttnQ,
    /// Key projection.
    AttnK,
    /// Value projection.
    AttnV,
    /// Attention output projection.
    AttnO,
    /// Feed-forward gate.
    FfnGate,
    /// Feed-forward up projection.
    FfnUp,
    /// Feed-forward down projection.
    FfnDown,
}

impl Target {
    /// All seven, in block order.
    pub const ALL: [Target; 7] = [
        Target::AttnQ,
        Target::AttnK,
        Target::AttnV,
        Target::AttnO,
        Target::FfnGate,
        Target::FfnUp,
        Target::FfnDown,
    ];

    /// The GGUF tensor-name part (`blk.N.<name>.weight`).
    pub fn name(self) -> &'static str {
        match self {
            Target::AttnQ => "attn_q",
            Target::AttnK => "attn_k",
            Target::AttnV => "attn_v",
            Target::AttnO => "attn_output",
            Target::FfnGate => "ffn_gate",
            Target::FfnUp => "ffn_up",
            Target::FfnDown => "ffn_down",
        }
    }

    /// The frozen weight of this target in `layer`.
    pub fn weight(self, layer: &LayerSpec) -> &Weight {
        match self {
            Target::AttnQ => &layer.wq,
            Target::AttnK => &layer.wk,
            Target::AttnV => &layer.wv,
            Target::AttnO => &layer.wo,
            Target::FfnGate => &layer.w_gate,
            Target::FfnUp => &layer.w_up,
            Target::FfnDown => &layer.w_down,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Target {
    type Err = Error;
    fn from_str(s: &str) -> Result<Target> {
        let s = s.trim();
        let found = Target::ALL
            .into_iter()
            .find(|t| t.name() == s || (s == "attn_o" && *t == Target::AttnO) || s == t.short());
        found.ok_or_else(|| {
            Error::Invalid(format!(
                "unknown target '{s}': expected one of attn_q, attn_k, attn_v, attn_o, \
                 ffn_gate, ffn_up, ffn_down (or q, k, v, o, gate, up, down)"
            ))
        })
    }
}

impl Target {
    fn short(self) -> &'static str {
        match self {
            Target::AttnQ => "q",
            Target::AttnK => "k",
            Target::AttnV => "v",
            Target::AttnO => "o",
            Target::FfnGate => "gate",
            Target::FfnUp => "up",
            Target::FfnDown => "down",
        }
    }
}

/// One frozen linear of the decoder, as seen by a PEFT method.
#[derive(Debug, Clone, Copy)]
pub struct LinearSite<'a> {
    /// Block index.
    pub layer: usize,
    /// Which projection.
    pub target: Target,
    /// Its frozen weight (`rows` = out, `cols` = in).
    pub weight: &'a Weight,
}

/// One RMSNorm of the decoder, as seen by a PEFT method.
#[derive(Debug, Clone, Copy)]
pub struct NormSite<'a> {
    /// Block index (`None`: the output norm).
    pub layer: Option<usize>,
    /// Its frozen weight (`cols` = the normalized width).
    pub weight: &'a Weight,
}

/// One sublayer (attention or feed-forward) of a block, as seen by an
/// adapter method.
#[derive(Debug, Clone, Copy)]
pub struct SublayerSite<'a> {
    /// Block index.
    pub layer: usize,
    /// The feed-forward sublayer (else attention).
    pub ffn: bool,
    /// Its output projection (`attn_output` or `ffn_down`), which names it.
    pub weight: &'a Weight,
}

/// Where a PEFT method rewrites the forward graph. Every hook returns the
/// tensor the rest of the graph uses instead of the one it was given (that
/// one itself where the method does nothing).
pub trait GraphHook {
    /// Called before the frozen linear of `site` is added, with its input.
    fn linear_input(&self, g: &mut Graph, site: &LinearSite, x: TensorId) -> TensorId {
        let _ = (g, site);
        x
    }

    /// Called after the frozen linear `y = x·Wᵀ` of `site` is added.
    fn linear(&self, g: &mut Graph, site: &LinearSite, x: TensorId, y: TensorId) -> TensorId;

    /// Called after the RMSNorm of `site` is added, with its output.
    fn norm(&self, g: &mut Graph, site: &NormSite, y: TensorId) -> TensorId {
        let _ = (g, site);
        y
    }

    /// Called with a sublayer's normalized input `x` and its output `y`
    /// (after its post-norm, if any), before the residual addition.
    fn sublayer(&self, g: &mut Graph, site: &SublayerSite, x: TensorId, y: TensorId) -> TensorId {
        let _ = (g, site, x);
        y
    }

    /// Virtual tokens the method puts at the start of every row (prompt
    /// and prefix tuning): the first `n` positions of each row are theirs,
    /// and every query sees them ([`AttnGeom::sink`]).
    fn virtual_tokens(&self) -> usize {
        0
    }

    /// Called on the token embeddings `(N, C)`.
    fn embed(&self, g: &mut Graph, x: TensorId) -> TensorId {
        let _ = g;
        x
    }

    /// Called on a layer's keys (after RoPE) and values, before attention.
    fn attention_kv(
        &self,
        g: &mut Graph,
        layer: usize,
        k: TensorId,
        v: TensorId,
    ) -> (TensorId, TensorId) {
        let _ = (g, layer);
        (k, v)
    }
}

/// The forward graph of a decoder ending in the loss.
pub struct DecoderGraph;

impl DecoderGraph {
    /// Build the forward graph of `spec` for `batch × seq` tokens, with
    /// `hook` adding its parameters at each linear.
    pub fn build(spec: &DecoderSpec, batch: usize, seq: usize, hook: &dyn GraphHook) -> Graph {
        let mut g = Graph::new(batch, seq);
        let n = batch * seq;
        let e = spec.n_embd;
        let (q_dim, kv_dim) = (spec.n_head * spec.head_dim, spec.n_kv_head * spec.head_dim);
        let fw = Phase::Forward;
        let emb = g.frozen(&spec.token_embd);
        let scale = spec.embed_scale.unwrap_or(1.0);
        let mut x = g.push(
            Op::Embed { w: emb, scale },
            &[],
            &[("embed", Shape::new(n, e))],
            None,
            fw,
        )[0];
        x = hook.embed(&mut g, x);
        let sink = hook.virtual_tokens();
        for (li, l) in spec.layers.iter().enumerate() {
            let at = Some(li);
            let norm = |g: &mut Graph, w: &Weight, x: TensorId, name: &str| {
                let id = g.frozen(w);
                let shape = g.shape(x);
                let eps = spec.norm_eps;
                let y = g.push(Op::RmsNorm { w: id, eps }, &[x], &[(name, shape)], at, fw)[0];
                let site = NormSite {
                    layer: Some(li),
                    weight: w,
                };
                hook.norm(g, &site, y)
            };
            let linear = |g: &mut Graph, t: Target, x: TensorId| {
                let w = t.weight(l);
                let id = g.frozen(w);
                let name = format!("blk.{li}.{}", t.name());
                let site = LinearSite {
                    layer: li,
                    target: t,
                    weight: w,
                };
                let x = hook.linear_input(g, &site, x);
                let y = g.push(
                    Op::Linear { w: id },
                    &[x],
                    &[(&name, Shape::new(n, w.rows))],
                    at,
                    fw,
                )[0];
                hook.linear(g, &site, x, y)
            };
            let h = norm(&mut g, &l.attn_norm, x, "attn_norm");
            let mut q = linear(&mut g, Target::AttnQ, h);
            let mut k = linear(&mut g, Target::AttnK, h);
            let v = linear(&mut g, Target::AttnV, h);
            if let Some(w) = &l.q_norm {
                q = norm(&mut g, w, q, "q_norm");
            }
            if let Some(w) = &l.k_norm {
                k = norm(&mut g, w, k, "k_norm");
            }
            let rope = Op::Rope {
                rope: l.rope,
                head_dim: spec.head_dim,
            };
            let q = g.push(
                rope.clone(),
                &[q],
                &[("q_rope", Shape::new(n, q_dim))],
                at,
                fw,
            )[0];
            let k = g.push(rope, &[k], &[("k_rope", Shape::new(n, kv_dim))], at, fw)[0];
            let (k, v) = hook.attention_kv(&mut g, li, k, v);
            let geom = AttnGeom {
                n_head: spec.n_head,
                n_kv_head: spec.n_kv_head,
                head_dim: spec.head_dim,
                scale: spec.attn_scale,
                window: l.window,
                sink,
            };
            let att = g.push(
                Op::Attention(geom),
                &[q, k, v],
                &[
                    ("attn", Shape::new(n, q_dim)),
                    ("attn_lse", Shape::new(n, spec.n_head)),
                ],
                at,
                fw,
            )[0];
            let mut o = linear(&mut g, Target::AttnO, att);
            if let Some(w) = &l.post_attn_norm {
                o = norm(&mut g, w, o, "post_attn_norm");
            }
            let site = SublayerSite {
                layer: li,
                ffn: false,
                weight: &l.wo,
            };
            let o = hook.sublayer(&mut g, &site, h, o);
            let x_mid = g.push(
                Op::Add,
                &[x, o],
                &[("resid_attn", Shape::new(n, e))],
                at,
                fw,
            )[0];
            let h = norm(&mut g, &l.ffn_norm, x_mid, "ffn_norm");
            let gate = linear(&mut g, Target::FfnGate, h);
            let up = linear(&mut g, Target::FfnUp, h);
            let act = g.push(
                Op::Gated {
                    act: spec.activation,
                },
                &[gate, up],
                &[("ffn_act", Shape::new(n, spec.n_ff))],
                at,
                fw,
            )[0];
            let mut d = linear(&mut g, Target::FfnDown, act);
            if let Some(w) = &l.post_ffn_norm {
                d = norm(&mut g, w, d, "post_ffn_norm");
            }
            let site = SublayerSite {
                layer: li,
                ffn: true,
                weight: &l.w_down,
            };
            let d = hook.sublayer(&mut g, &site, h, d);
            x = g.push(
                Op::Add,
                &[x_mid, d],
                &[("resid_ffn", Shape::new(n, e))],
                at,
                fw,
            )[0];
            g.checkpoints.push(x);
        }
        let on = g.frozen(&spec.output_norm);
        let eps = spec.norm_eps;
        let h = g.push(
            Op::RmsNorm { w: on, eps },
            &[x],
            &[("output_norm", Shape::new(n, e))],
            None,
            fw,
        )[0];
        let site = NormSite {
            layer: None,
            weight: &spec.output_norm,
        };
        let h = hook.norm(&mut g, &site, h);
        let out = g.frozen(&spec.output);
        let outs = g.push(
            Op::LossHead { w: out },
            &[h],
            &[("loss", Shape::new(1, 2)), ("loss_dx", Shape::new(n, e))],
            None,
            fw,
        );
        g.tensors[outs[0]].kind = super::TensorKind::Output;
        g.loss = Some(outs[0]);
        g
    }
}
