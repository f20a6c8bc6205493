//! Scoring text: mean negative log-likelihood and perplexity over windows,
//! exactly as `tests/reference/README.md` defines them.

use crate::backend::Decoder;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use serde::Serialize;
use std::ops::ControlFlow;

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
    decoder: &dyn Decoder,
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
    let mut session = decoder.session(need)?;
    let (mut sum, mut count) = (0.0f64, 0usize);
    if progress(0, windows.len()).is_break() {
        return Err(Error::Cancelled);
    }
    for (wi, window) in windows.iter().enumerate() {
        let seq: Vec<u32> = bos.into_iter().chain(window.iter().copied()).collect();
        session.clear();
        // Position p predicts seq[p + 1].
        let nll = session.forward_nll(&seq[..seq.len() - 1], &seq[1..])?;
        sum += nll.iter().sum::<f64>();
        count += nll.len();
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
