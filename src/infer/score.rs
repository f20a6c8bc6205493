//! Scoring text: mean negative log-likelihood and perplexity over windows,
//! exactly as `tests/reference/README.md` defines them.

use crate::backend::cpu::CpuDecoder;
use crate::backend::cpu::ops::log_sum_exp;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use serde::Serialize;
use std::ops::ControlFlow;

/// Logit values computed at once (64 MB): bounds memory to this instead of a
/// whole window's `n_tok × n_vocab`, while keeping chunks long enough that the
/// output matrix is decoded only a few times per window.
const LOGIT_BUDGET: usize = 16 << 20;

/// The result of [`perplexity`].
#[derive(Debug, Clone, Serialize)]
pub struct Score {
    /// Tokens of the text (no special tokens).
    pub text_tokens: usize,
    /// Tokens predicted (each has at least one token before it in its window).
    pub predicted_tokens: usize,
    /// Windows evaluated.
    pub windows: usize,
    /// Whether each window was prefixed with BOS.
    pub bos_prefixed: bool,
    /// Mean negative log-likelihood (natural log).
    pub nll: f64,
    /// `exp(nll)`.
    pub perplexity: f64,
}

/// Perplexity of `text` in windows of `context` text tokens. Windows are
/// evaluated independently, as `[BOS] + window` when the tokenizer adds BOS
/// by default. `progress(done, total)` is called after each window and may
/// cancel by returning `Break`.
pub fn perplexity(
    decoder: &CpuDecoder,
    tokenizer: &Tokenizer,
    text: &str,
    context: usize,
    progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<Score> {
    if context < 2 {
        return Err(Error::Invalid(format!(
            "--context must be at least 2, got {context}"
        )));
    }
    let ids = tokenizer.encode(text, false)?;
    let bos = if tokenizer.add_bos() {
        tokenizer.bos_id()
    } else {
        None
    };
    let windows: Vec<&[u32]> = ids.chunks(context).filter(|w| w.len() >= 2).collect();
    if windows.is_empty() {
        return Err(Error::Invalid(format!(
            "the text has {} token(s): at least 2 are needed to score",
            ids.len()
        )));
    }
    let need = context.saturating_add(usize::from(bos.is_some()));
    if need > decoder.spec().context_length {
        return Err(Error::Invalid(format!(
            "--context {context} exceeds the model's context of {}",
            decoder.spec().context_length
        )));
    }
    let mut cache = decoder.new_cache(need);
    let (mut sum, mut count) = (0.0f64, 0usize);
    let n_embd = decoder.spec().n_embd;
    let n_vocab = decoder.spec().n_vocab;
    let chunk = (LOGIT_BUDGET / n_vocab).max(1);
    if progress(0, windows.len()).is_break() {
        return Err(Error::Cancelled);
    }
    for (wi, window) in windows.iter().enumerate() {
        let seq: Vec<u32> = bos.into_iter().chain(window.iter().copied()).collect();
        cache.clear();
        let hidden = decoder.forward_hidden(&seq, &mut cache)?;
        // Position p predicts seq[p + 1].
        let n_pred = seq.len() - 1;
        for start in (0..n_pred).step_by(chunk) {
            let end = (start + chunk).min(n_pred);
            let logits = decoder.logits(&hidden[start * n_embd..end * n_embd])?;
            for (p, row) in (start..end).zip(logits.chunks_exact(n_vocab)) {
                sum += log_sum_exp(row) - row[seq[p + 1] as usize] as f64;
            }
        }
        count += n_pred;
        if progress(wi + 1, windows.len()).is_break() {
            return Err(Error::Cancelled);
        }
    }
    let nll = sum / count as f64;
    Ok(Score {
        text_tokens: ids.len(),
        predicted_tokens: count,
        windows: windows.len(),
        bos_prefixed: bos.is_some(),
        nll,
        perplexity: nll.exp(),
    })
}
