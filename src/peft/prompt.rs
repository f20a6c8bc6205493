//! Prompt tuning (Lester et al., 2021): `n` trained embeddings put before
//! every sequence as virtual tokens; the model is untouched. They start at
//! the embeddings of a text (`prompt_init`, repeated to `n` tokens) or of
//! `n` tokens drawn from the vocabulary (a fixed seed), as the paper
//! recommends over random vectors.
//!
//! In a packed row the virtual tokens take the row's first `n` positions
//! and every example of the row sees them ([`crate::graph::AttnGeom::sink`]),
//! its own tokens at positions `n…`: what each example would see alone.
//! At inference they are run before the prompt, filling the first `n`
//! slots of the KV cache.

use super::{Effect, Method, MethodSpec, ParamMap};
use crate::graph::{Graph, GraphHook, LinearSite, Op, Param, Phase, Shape, TensorId};
use crate::model::Model;
use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Name of the virtual-token embeddings.
pub const EMBEDDINGS: &str = "prompt.embeddings";

/// Seed of the vocabulary sample that starts prompt and prefix tuning
/// without a text.
const SAMPLE_SEED: u64 = 0x7072_6f6d_7074;

/// The `n` token ids virtual tokens start from: `text`'s, repeated (or cut)
/// to `n`, else `n` drawn from the vocabulary.
pub(crate) fn init_tokens(model: &Model, n: usize, text: Option<&str>) -> Result<Vec<u32>> {
    let vocab = model.spec().n_vocab as u32;
    match text {
        Some(t) => {
            let tok = crate::tokenizer::Tokenizer::from_gguf(model.file())?;
            let ids = tok.encode(t, false)?;
            if ids.is_empty() {
                return Err(Error::Invalid("prompt_init: the text has no tokens".into()));
            }
            Ok(ids.iter().copied().cycle().take(n).collect())
        }
        None => {
            let mut rng = ChaCha8Rng::seed_from_u64(SAMPLE_SEED);
            Ok((0..n).map(|_| rng.random_range(0..vocab)).collect())
        }
    }
}

/// Prompt tuning with `n` virtual tokens.
pub struct PromptTuning {
    n: usize,
    /// `(n, n_embd)` starting embeddings.
    init: Vec<f32>,
}

impl PromptTuning {
    /// `spec.virtual_tokens` virtual tokens for `model`, started from
    /// `spec.prompt_init` or a vocabulary sample.
    pub fn new(spec: &MethodSpec, model: &Model) -> Result<PromptTuning> {
        let n = spec.virtual_tokens;
        let ids = init_tokens(model, n, spec.prompt_init.as_deref())?;
        let dec = crate::backend::cpu::CpuDecoder::new(model)?;
        Ok(PromptTuning {
            n,
            init: dec.embed(&ids)?,
        })
    }
}

impl GraphHook for PromptTuning {
    fn linear(&self, _g: &mut Graph, _site: &LinearSite, _x: TensorId, y: TensorId) -> TensorId {
        y
    }

    fn virtual_tokens(&self) -> usize {
        self.n
    }

    fn embed(&self, g: &mut Graph, x: TensorId) -> TensorId {
        let c = g.shape(x).cols;
        let p = g.param(EMBEDDINGS, Shape::new(self.n, c));
        let (n, seq) = (self.n, g.seq);
        let shape = g.shape(x);
        g.push(
            Op::PrefixRows { n, seq },
            &[x, p],
            &[("prompt_x", shape)],
            None,
            Phase::Forward,
        )[0]
    }
}

impl Method for PromptTuning {
    fn name(&self) -> &'static str {
        "prompt"
    }

    fn owns(&self, name: &str) -> bool {
        name == EMBEDDINGS
    }

    fn init_param(&self, _p: &Param, _rng: &mut ChaCha8Rng) -> Vec<f32> {
        self.init.clone()
    }

    fn effects(&self, params: &ParamMap, model: &Model) -> Result<Vec<(String, Effect)>> {
        let e = super::param(params, EMBEDDINGS)?.to_vec();
        let base = model.spec().token_embd.name.clone();
        Ok(vec![(
            base,
            Effect::Prefix {
                rows: self.n,
                values: e,
            },
        )])
    }
}
