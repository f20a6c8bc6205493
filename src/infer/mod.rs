//! Using a model: generation with a KV cache and sampling, scoring
//! (log-likelihood, perplexity), and throughput benchmarks.

mod bench;
mod generate;
mod sample;
mod score;

pub use bench::{
    BenchOptions, BenchResult, FormatBenchOptions, FormatFigure, bench, bench_formats,
};
pub use generate::{GenerateOptions, Generation, StopReason, generate};
pub use sample::{Sampler, SamplingParams, argmax};
pub use score::{Score, perplexity};
