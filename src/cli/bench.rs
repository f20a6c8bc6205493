//! `edgetune bench`.

use super::{ModelArgs, emit, keep_going, print_json, progress_bar, report};
use clap::Args;
use edgetune::Error;
use edgetune::backend::cpu::MatvecMode;
use edgetune::infer::{BenchOptions, bench};
use edgetune::model::Model;
use std::time::Instant;

/// Arguments of `bench`.
#[derive(Args)]
pub struct BenchArgs {
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
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: BenchArgs) -> Result<(), Error> {
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
    // Steps: prompt and exact generation runs, then --fast generation runs.
    let gen_reps = if a.gen_tokens > 0 { a.repetitions } else { 0 };
    let first = gen_reps.saturating_add(if a.prompt_tokens > 0 {
        a.repetitions
    } else {
        0
    });
    let pb = progress_bar(first.saturating_add(gen_reps), "benchmarking");
    let r = bench(&decoder, opts, &mut |done, _| {
        pb.set_position(done as u64);
        keep_going()
    })?;
    let fast = a.model.decoder(&model, MatvecMode::Q8)?;
    let q8 = bench(
        &fast,
        BenchOptions {
            prompt_tokens: 0,
            ..opts
        },
        &mut |done, _| {
            pb.set_position(first.saturating_add(done) as u64);
            keep_going()
        },
    )?;
    pb.finish_and_clear();
    let peak_rss = peak_rss_mb();
    if a.json {
        return print_json(&serde_json::json!({
            "result": r,
            "gen_tokens_per_s_q8": q8.gen_tokens_per_s,
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
    report!(out, "device      cpu, {} threads", r.threads);
    let mb = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.0} MB"));
    report!(
        out,
        "load        {:.3} s (memory-mapped), peak RSS {}",
        load_s,
        mb(load_rss)
    );
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
        "generation  {:.1} tokens/s  (tg{}, --fast: 8-bit activations)",
        q8.gen_tokens_per_s,
        r.gen_tokens
    );
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
