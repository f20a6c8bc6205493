//! Using a model: generation with a KV cache and sampling, scoring
//! (log-likelihood, perplexity), and throughput benchmarks.

mod bench;
mod generate;
mod sample;
mod score;

pub use bench::{bench, BenchOptions, BenchResult};
pub use generate::{generate, GenerateOptions, Generation, StopReason};
pub use sample::{argmax, Sampler, SamplingParams};
pub use score::{perplexity, Score};
