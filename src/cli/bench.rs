//! `edgetune bench`.

use super::{ModelArgs, emit, keep_going, print_json, progress_bar, report};
use clap::Args;
use edgetune::Error;
use edgetune::backend::cpu::MatvecMode;
use edgetune::infer::{BenchOptions, FormatBenchOptions, bench, bench_formats};
use edgetune::model::Model;
use edgetune::quant::GgmlType;
use std::time::Instant;

/// Arguments of `bench`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// What else to benchmark (default: inference).
    #[command(subcommand)]
    what: Option<BenchWhat>,
    #[command(flatten)]
    model: ModelArgs,
    /// Tokens in the prompt pass.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens generated one by one.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// Skip the per-format matrix product benchmark.
    #[arg(long)]
    no_formats: bool,
    /// Shape of the per-format product: TOKENS,ROWS,COLS
    /// [default: 256,1024,1024; 512,4096,4096 on a hardware GPU]
    #[arg(long, value_name = "T,R,C", value_parser = parse_shape)]
    matmul_shape: Option<[usize; 3]>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Other benchmarks.
#[derive(clap::Subcommand)]
enum BenchWhat {
    /// LoRA training steps: tokens/s, planned and measured peak memory, and
    /// where one step's time goes.
    Train(Box<super::bench_train::TrainBenchArgs>),
    /// Serving many LoRA adapters on one base: requests with distinct
    /// adapters in one batch, against one request or one adapter at a time.
    Adapters(super::bench_adapters::AdapterBenchArgs),
    /// Every PEFT method trained on the same data and steps: trainable
    /// parameters, peak RSS, tokens/s, train and eval loss.
    Methods(super::bench_methods::MethodBenchArgs),
}

fn parse_shape(s: &str) -> Result<[usize; 3], String> {
    let v: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("expected TOKENS,ROWS,COLS: {e}"))?;
    <[usize; 3]>::try_from(v).map_err(|_| "expected three numbers: TOKENS,ROWS,COLS".into())
}

pub fn run(a: BenchArgs) -> Result<(), Error> {
    match a.what {
        Some(BenchWhat::Train(t)) => return super::bench_train::run(*t),
        Some(BenchWhat::Adapters(t)) => return super::bench_adapters::run(t),
        Some(BenchWhat::Methods(t)) => return super::bench_methods::run(t),
        None => {}
    }
    let t = Instant::now();
    let model = Model::open(a.model.path()?)?;
    let decoder = a.model.decoder(&model, MatvecMode::Exact)?;
    let load_s = t.elapsed().as_secs_f64();
    let load_rss = peak_rss_mb();
    let opts = BenchOptions {
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        repetitions: a.repetitions,
    };
    let cpu = decoder.backend() == "cpu";
    let software = decoder.device_name().contains("software");
    let [tokens, rows, cols] = a.matmul_shape.unwrap_or(if cpu || software {
        [256, 1024, 1024]
    } else {
        [512, 4096, 4096]
    });
    let formats = if a.no_formats {
        Vec::new()
    } else {
        let pb = progress_bar(GgmlType::ALL.len(), "matrix products");
        let f = bench_formats(
            decoder.as_ref(),
            FormatBenchOptions {
                tokens,
                rows,
                cols,
                repetitions: a.repetitions,
            },
            &mut |done, _| {
                pb.set_position(done as u64);
                keep_going()
            },
        )?;
        pb.finish_and_clear();
        f
    };
    // Steps: prompt and exact generation runs, then (CPU) --fast generation runs.
    let gen_reps = if a.gen_tokens > 0 { a.repetitions } else { 0 };
    let first = gen_reps.saturating_add(if a.prompt_tokens > 0 {
        a.repetitions
    } else {
        0
    });
    let fast_reps = if cpu { gen_reps } else { 0 };
    let pb = progress_bar(first.saturating_add(fast_reps), "benchmarking");
    let r = bench(decoder.as_ref(), opts, &mut |done, _| {
        pb.set_position(done as u64);
        keep_going()
    })?;
    let q8 = if cpu {
        let fast = a.model.decoder(&model, MatvecMode::Q8)?;
        Some(bench(
            fast.as_ref(),
            BenchOptions {
                prompt_tokens: 0,
                ..opts
            },
            &mut |done, _| {
                pb.set_position(first.saturating_add(done) as u64);
                keep_going()
            },
        )?)
    } else {
        None
    };
    pb.finish_and_clear();
    let peak_rss = peak_rss_mb();
    if a.json {
        return print_json(&serde_json::json!({
            "result": r,
            "gen_tokens_per_s_q8": q8.map(|q| q.gen_tokens_per_s),
            "formats": formats,
            "load_seconds": load_s,
            "peak_rss_mb_after_load": load_rss,
            "peak_rss_mb": peak_rss,
        }));
    }
    let mut out = String::new();
    report!(
        out,
        "model       {} ({})",
        model.file().path().display(),
        model.spec().arch
    );
    report!(out, "device      {}", r.device);
    let mb = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.0} MB"));
    report!(
        out,
        "load        {:.3} s ({}), peak RSS {}",
        load_s,
        if cpu {
            "memory-mapped"
        } else {
            "memory-mapped, uploaded"
        },
        mb(load_rss)
    );
    if !formats.is_empty() {
        report!(out, "matmul      {tokens} tokens × {rows}×{cols} weights");
        for f in &formats {
            report!(
                out,
                "  {:<6} {:>9.2} GFLOP/s  ({:.2} ms)",
                f.format,
                f.gflops,
                f.seconds * 1e3
            );
        }
    }
    report!(
        out,
        "prompt      {:.1} tokens/s  (pp{})",
        r.prompt_tokens_per_s,
        r.prompt_tokens
    );
    report!(
        out,
        "generation  {:.1} tokens/s  (tg{}, exact)",
        r.gen_tokens_per_s,
        r.gen_tokens
    );
    report!(
        out,
        "generation  {:.1} tokens/s  (tg{}, sampled: temperature 0.8, top-k 40, top-p 0.95)",
        r.gen_sampled_tokens_per_s,
        r.gen_tokens
    );
    if let Some(q8) = q8 {
        report!(
            out,
            "generation  {:.1} tokens/s  (tg{}, --fast: 8-bit activations)",
            q8.gen_tokens_per_s,
            r.gen_tokens
        );
    }
    if r.dispatches_per_token > 0 {
        report!(
            out,
            "dispatches  {} per generated token, one submission",
            r.dispatches_per_token
        );
    }
    report!(out, "peak RSS    {}", mb(peak_rss));
    emit(&out)
}

/// The process's peak resident set size in MB (Linux `VmHWM`; `None` elsewhere).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
