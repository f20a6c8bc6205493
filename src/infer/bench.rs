//! Throughput of the forward pass: a prompt pass over `prompt_tokens`, and
//! token-by-token generation, as `llama-bench` measures them (pp512, tg).

use super::sample::{Sampler, SamplingParams};
use crate::backend::{Decoder, Pick};
use crate::quant::{GgmlType, quantize_row};
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
    /// Median generated tokens per second when sampling (temperature 0.8,
    /// top-k 40, top-p 0.95).
    pub gen_sampled_tokens_per_s: f64,
    /// Repetitions.
    pub repetitions: usize,
    /// The device, as [`Decoder::device_name`] gives it.
    pub device: String,
    /// Kernel launches per generated token (GPU; 0 on the CPU).
    pub dispatches_per_token: usize,
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
    decoder: &dyn Decoder,
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
    let mut session = decoder.session(opts.prompt_tokens.max(opts.gen_tokens + 1))?;
    for _ in 0..pp_reps {
        session.clear();
        let t = Instant::now();
        session.forward_pick(&prompt, &Pick::Greedy)?;
        pp.push(opts.prompt_tokens as f64 / t.elapsed().as_secs_f64());
        tick(&mut done)?;
    }
    let (mut tg, mut tg_sampled) = (vec![0.0], vec![0.0]);
    for _ in 0..tg_reps {
        // Greedy, then sampled (where the choice itself costs more).
        for (sampled, out) in [(false, &mut tg), (true, &mut tg_sampled)] {
            let mut sampler = Sampler::new(SamplingParams {
                temperature: 0.8,
                top_k: 40,
                top_p: 0.95,
                seed: 1,
            });
            session.clear();
            let mut tok = prompt[0];
            let t = Instant::now();
            for _ in 0..opts.gen_tokens {
                let pick = if sampled {
                    sampler.pick()
                } else {
                    Pick::Greedy
                };
                tok = session.forward_pick(&[tok], &pick)?;
            }
            out.push(opts.gen_tokens as f64 / t.elapsed().as_secs_f64());
        }
        tick(&mut done)?;
    }
    Ok(BenchResult {
        prompt_tokens: opts.prompt_tokens,
        prompt_tokens_per_s: median(pp),
        gen_tokens: opts.gen_tokens,
        gen_tokens_per_s: median(tg),
        gen_sampled_tokens_per_s: median(tg_sampled),
        repetitions: opts.repetitions,
        device: decoder.device_name(),
        dispatches_per_token: session.dispatches_per_token(),
    })
}

/// Shape of the per-format product [`bench_formats`] times.
#[derive(Debug, Clone, Copy)]
pub struct FormatBenchOptions {
    /// Tokens (rows of `x`).
    pub tokens: usize,
    /// Rows of `W` (outputs).
    pub rows: usize,
    /// Columns of `W` (inputs; a multiple of 256 suits every format).
    pub cols: usize,
    /// Repetitions; the median is reported.
    pub repetitions: usize,
}

/// Throughput of one product on one format.
#[derive(Debug, Clone, Serialize)]
pub struct FormatFigure {
    /// The weight format.
    pub format: String,
    /// Tokens, rows, columns of the product.
    pub shape: [usize; 3],
    /// Median seconds per product.
    pub seconds: f64,
    /// `2 · tokens · rows · cols / seconds`, in GFLOP/s.
    pub gflops: f64,
}

/// Time `y = x·Wᵀ` for every weight format on `decoder`'s device, with
/// deterministic pseudo-random weights; `progress(done, total)` after each
/// format, `Break` cancels.
pub fn bench_formats(
    decoder: &dyn Decoder,
    opts: FormatBenchOptions,
    progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<Vec<FormatFigure>> {
    let FormatBenchOptions {
        tokens,
        rows,
        cols,
        repetitions,
    } = opts;
    if tokens == 0 || rows == 0 || cols == 0 || !cols.is_multiple_of(256) {
        return Err(Error::Invalid(format!(
            "the format benchmark needs tokens and rows ≥ 1 and columns a multiple of 256, \
             got {tokens}×{rows}×{cols}"
        )));
    }
    let mut out = Vec::new();
    let total = GgmlType::ALL.len();
    for (i, ty) in GgmlType::ALL.into_iter().enumerate() {
        let row_bytes = ty.row_bytes(cols).expect("cols is a multiple of 256");
        let mut data = vec![0u8; rows * row_bytes];
        let mut vals = vec![0.0f32; cols];
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ i as u64;
        for row in data.chunks_exact_mut(row_bytes) {
            for v in vals.iter_mut() {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                *v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
            }
            quantize_row(ty, &vals, row)?;
        }
        let seconds = decoder.time_matmul(ty, rows, cols, &data, tokens, repetitions)?;
        out.push(FormatFigure {
            format: ty.name().to_string(),
            shape: [tokens, rows, cols],
            seconds,
            gflops: 2.0 * (tokens * rows * cols) as f64 / seconds / 1e9,
        });
        if progress(i + 1, total).is_break() {
            return Err(Error::Cancelled);
        }
    }
    Ok(out)
}
