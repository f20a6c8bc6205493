//! `edgetune bench adapters`: serving many LoRA adapters on one base, mixed
//! in one batch against one request (or one adapter) at a time.

use super::{keep_going, model_path, print_json, progress_bar, report};
use clap::Args;
use edgetune::Error;
use edgetune::backend::cpu::{CpuDecoder, CpuOptions, MatvecMode};
use edgetune::infer::{AdapterBenchOptions, bench_adapters};
use edgetune::model::Model;
use edgetune::tokenizer::Tokenizer;
use std::path::PathBuf;

/// Arguments of `bench adapters`.
#[derive(Args)]
pub struct AdapterBenchArgs {
    /// GGUF model file [default: models/SmolLM2-135M-Instruct.Q4_1.gguf, or $EDGETUNE_MODEL]
    #[arg(value_name = "MODEL")]
    model: Option<PathBuf>,
    /// Requests generated together.
    #[arg(long, default_value_t = 16)]
    requests: usize,
    /// Distinct adapters among the requests, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    adapters: Vec<usize>,
    /// Rank of the random adapters (all seven targets of every layer).
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    /// Run the batch's frozen products as one GEMM over all requests instead
    /// of row by row (faster on wide batches; tokens may differ in the last
    /// bits from unbatched generation).
    #[arg(long)]
    gemm: bool,
    /// 8-bit activations in the products (as `generate --fast`).
    #[arg(long)]
    fast: bool,
    /// CPU worker threads (default: one per core).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    threads: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: AdapterBenchArgs) -> Result<(), Error> {
    let model = Model::open(model_path(a.model.as_deref())?)?;
    let tok = Tokenizer::from_gguf(model.file())?;
    let decoder = CpuDecoder::with_options(
        &model,
        CpuOptions {
            threads: a.threads,
            matvec: if a.fast {
                MatvecMode::Q8
            } else {
                MatvecMode::Exact
            },
        },
    )?;
    let o = AdapterBenchOptions {
        requests: a.requests,
        distinct: a.adapters.clone(),
        rank: a.rank,
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        invariant: !a.gemm,
    };
    let pb = progress_bar(o.distinct.len() * 3, "benchmarking");
    let figures = bench_adapters(&decoder, &tok, &o, &mut |done, _| {
        pb.set_position(done as u64);
        keep_going()
    })?;
    pb.finish_and_clear();
    if a.json {
        return print_json(&serde_json::json!({
            "device": format!("cpu ({} threads)", decoder.threads()),
            "invariant": o.invariant,
            "rank": o.rank,
            "prompt_tokens": o.prompt_tokens,
            "gen_tokens": o.gen_tokens,
            "figures": figures,
        }));
    }
    let mut out = String::new();
    report!(
        out,
        "{} requests × ({} prompt + {} generated tokens), LoRA r={} on all 7 targets, cpu ({} threads), {}",
        o.requests,
        o.prompt_tokens,
        o.gen_tokens,
        o.rank,
        decoder.threads(),
        if o.invariant { "row by row" } else { "GEMM" }
    );
    report!(
        out,
        "generated tokens/s while decoding (with prompt passes in brackets)"
    );
    report!(
        out,
        "{:>8}  {:>20}  {:>20}  {:>20}  {:>9}",
        "adapters",
        "mixed batch",
        "a batch per adapter",
        "one by one",
        "speed-up"
    );
    for f in &figures {
        let cell = |d: f64, t: f64| format!("{d:.1} ({t:.1})");
        report!(
            out,
            "{:>8}  {:>20}  {:>20}  {:>20}  {:>8.2}×",
            f.adapters,
            cell(f.batched_tokens_per_s, f.batched_total_tokens_per_s),
            cell(f.per_adapter_tokens_per_s, f.per_adapter_total_tokens_per_s),
            cell(f.sequential_tokens_per_s, f.sequential_total_tokens_per_s),
            f.batched_tokens_per_s / f.sequential_tokens_per_s
        );
    }
    super::emit(&out)
}
