//! Using a model: generation with a KV cache and sampling, scoring
//! (log-likelihood, perplexity), many requests with different adapters
//! generated together, and throughput benchmarks.

mod batch;
mod batch_bench;
mod bench;
mod generate;
mod sample;
mod score;

pub use batch::{Batch, BatchEvent, BatchOptions, RequestId};
pub use batch_bench::{
    AdapterBenchOptions, AdapterFigure, bench_adapters, random_adapter, random_lora,
};
pub use bench::{
    BenchOptions, BenchResult, FormatBenchOptions, FormatFigure, bench, bench_formats,
};
pub use generate::{GenerateOptions, Generation, StopReason, generate};
pub use sample::{Sampler, SamplingParams, argmax};
pub use score::{Score, perplexity};
