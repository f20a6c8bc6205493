//! Throughput of the forward pass: a prompt pass over `prompt_tokens`, and
//! token-by-token generation, as `llama-bench` measures them (pp512, tg).

use super::sample::argmax;
use crate::backend::cpu::{CpuDecoder, Logits};
use crate::{Error, Result};
use serde::Serialize;
use std::ops::ControlFlow;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    /// Tokens in the prompt pass.
    pub prompt_tokens: usize,
    /// Tokens generated one at a time (greedy, from an empty cache).
    pub gen_tokens: usize,
    /// Repetitions of each measurement; the median is reported.
    pub repetitions: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            prompt_tokens: 512,
            gen_tokens: 64,
            repetitions: 3,
        }
    }
}

/// Measured throughput.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// Tokens in the prompt pass.
    pub prompt_tokens: usize,
    /// Median prompt tokens per second.
    pub prompt_tokens_per_s: f64,
    /// Tokens generated per repetition.
    pub gen_tokens: usize,
    /// Median generated tokens per second.
    pub gen_tokens_per_s: f64,
    /// Repetitions.
    pub repetitions: usize,
    /// Worker threads.
    pub threads: usize,
}

/// Median of the measurements after the placeholder first element (0 if none).
fn median(mut v: Vec<f64>) -> f64 {
    if v.len() > 1 {
        v.remove(0);
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Run the benchmark; `progress(done, total)` after each measurement, `Break` cancels.
pub fn bench(
    decoder: &CpuDecoder,
    opts: BenchOptions,
    progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<BenchResult> {
    let s = decoder.spec();
    if opts.repetitions == 0 || opts.prompt_tokens.max(opts.gen_tokens) > s.context_length {
        return Err(Error::Invalid(format!(
            "bench needs repetitions ≥ 1, and prompt and generated tokens each ≤ context ({})",
            s.context_length
        )));
    }
    // A fixed, deterministic pseudo-random prompt: speed does not depend on the text.
    let prompt: Vec<u32> = (0..opts.prompt_tokens.max(1) as u64)
        .map(|i| ((i * 2_654_435_761 + 12_345) % (s.n_vocab as u64).min(30_000)) as u32)
        .collect();
    // A zero count skips that measurement (reported as 0 tokens/s).
    let (pp_reps, tg_reps) = (
        if opts.prompt_tokens > 0 {
            opts.repetitions
        } else {
            0
        },
        if opts.gen_tokens > 0 {
            opts.repetitions
        } else {
            0
        },
    );
    let total = pp_reps + tg_reps;
    let mut done = 0;
    let mut tick = |done: &mut usize| {
        *done += 1;
        if progress(*done, total).is_break() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    };
    let mut pp = vec![0.0];
    let mut cache = decoder.new_cache(opts.prompt_tokens.max(opts.gen_tokens + 1));
    for _ in 0..pp_reps {
        cache.clear();
        let t = Instant::now();
        decoder.forward(&prompt, &mut cache, Logits::Last)?;
        pp.push(opts.prompt_tokens as f64 / t.elapsed().as_secs_f64());
        tick(&mut done)?;
    }
    let mut tg = vec![0.0];
    for _ in 0..tg_reps {
        cache.clear();
        let mut tok = prompt[0];
        let t = Instant::now();
        for _ in 0..opts.gen_tokens {
            let logits = decoder.forward(&[tok], &mut cache, Logits::Last)?;
            tok = argmax(&logits);
        }
        tg.push(opts.gen_tokens as f64 / t.elapsed().as_secs_f64());
        tick(&mut done)?;
    }
    Ok(BenchResult {
        prompt_tokens: opts.prompt_tokens,
        prompt_tokens_per_s: median(pp),
        gen_tokens: opts.gen_tokens,
        gen_tokens_per_s: median(tg),
        repetitions: opts.repetitions,
        threads: decoder.threads(),
    })
}
