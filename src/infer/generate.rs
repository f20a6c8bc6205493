//! Text generation with a KV cache: the prompt in one batched pass, then one
//! token at a time, streamed to a callback as complete UTF-8 text.

use super::sample::{Sampler, SamplingParams};
use crate::backend::Decoder;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use std::ops::ControlFlow;
use std::time::Instant;

/// Prompt tokens run in one batched pass; longer prompts take several.
pub(crate) const PREFILL_CHUNK: usize = 512;

/// Options of [`generate`].
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How tokens are picked.
    pub sampling: SamplingParams,
    /// Stop at the model's end-of-generation tokens (EOS, end-of-turn).
    pub stop_at_end: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop_at_end: true,
        }
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-generation token.
    EndOfGeneration,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The model's context is full.
    ContextFull,
    /// The callback asked to stop.
    Stopped,
}

/// What [`generate`] produced, with timings.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Generated token ids (including a final end token, if any).
    pub tokens: Vec<u32>,
    /// Generated text (without a final end token).
    pub text: String,
    /// Why it stopped.
    pub stop: StopReason,
    /// Seconds spent on the prompt pass.
    pub prompt_seconds: f64,
    /// Seconds spent generating after the prompt.
    pub generate_seconds: f64,
}

/// Generate after `prompt` (token ids, special tokens included), calling
/// `on_text` after each token with the text it completed (possibly empty:
/// a character can span tokens); it may stop generation by returning
/// `Break`. Long prompts are run in chunks, with an empty `on_text` call
/// after each full chunk; `Break` there returns [`Error::Cancelled`].
pub fn generate(
    decoder: &dyn Decoder,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation> {
    opts.sampling.validate()?;
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt is empty (no tokens)".into()));
    }
    let ctx = decoder.spec().context_length;
    if prompt.len() >= ctx {
        return Err(Error::Invalid(format!(
            "the prompt has {} tokens; the model's context is {ctx}",
            prompt.len()
        )));
    }
    let capacity = prompt.len().saturating_add(opts.max_tokens).min(ctx);
    let mut session = decoder.session(capacity)?;
    let mut sampler = Sampler::new(opts.sampling);
    let mut stream = tokenizer.stream_decoder();
    let mut text = String::new();
    let mut tokens = Vec::new();

    let t0 = Instant::now();
    // The prompt in chunks: bounded activation memory for long prompts, and
    // a chance to stop between chunks (the callback sees an empty piece).
    // The last chunk also chooses the first generated token.
    let n_chunks = prompt.len().div_ceil(PREFILL_CHUNK);
    let mut next = 0;
    for (i, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
        if i + 1 < n_chunks {
            session.run(chunk)?;
            if on_text("").is_break() {
                return Err(Error::Cancelled);
            }
        } else {
            next = session.forward_pick(chunk, &sampler.pick())?;
        }
    }
    let prompt_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let stop = loop {
        if tokens.len() >= opts.max_tokens {
            break StopReason::MaxTokens;
        }
        let id = next;
        tokens.push(id);
        if opts.stop_at_end && tokenizer.is_end_of_generation(id) {
            break StopReason::EndOfGeneration;
        }
        let piece = stream.push(tokenizer, id);
        text.push_str(&piece);
        // Called for every token, even one that completes no character yet
        // (empty `piece`), so the caller can always stop between tokens.
        if on_text(&piece).is_break() {
            break StopReason::Stopped;
        }
        if session.len() >= capacity {
            // max_tokens is checked first, so a full cache here is the model's context.
            break StopReason::ContextFull;
        }
        next = session.forward_pick(&[id], &sampler.pick())?;
    };
    let rest = stream.finish();
    if !rest.is_empty() {
        text.push_str(&rest);
        if stop != StopReason::Stopped {
            let _ = on_text(&rest);
        }
    }
    Ok(Generation {
        prompt_tokens: prompt.len(),
        tokens,
        text,
        stop,
        prompt_seconds,
        generate_seconds: t1.elapsed().as_secs_f64(),
    })
}
