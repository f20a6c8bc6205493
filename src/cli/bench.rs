//! `edgetune bench`.

use super::{print_json, progress_bar, ModelArgs};
use clap::Args;
use edgetune::backend::cpu::CpuDecoder;
use edgetune::infer::{bench, BenchOptions};
use edgetune::model::Model;
use edgetune::Error;
use std::ops::ControlFlow;
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
    let decoder = CpuDecoder::new(&model)?;
    let load_s = t.elapsed().as_secs_f64();
    let opts = BenchOptions { prompt_tokens: a.prompt_tokens, gen_tokens: a.gen_tokens, repetitions: a.repetitions };
    let pb = progress_bar(2 * a.repetitions, "benchmarking");
    let r = bench(&decoder, opts, &mut |done, _| {
        pb.set_position(done as u64);
        ControlFlow::Continue(())
    })?;
    pb.finish_and_clear();
    if a.json {
        return print_json(&r);
    }
    println!("model       {} ({})", model.file().path().display(), model.spec().arch);
    println!("device      cpu, {} threads", r.threads);
    println!("load        {:.3} s (memory-mapped)", load_s);
    println!("prompt      {:.1} tokens/s  (pp{})", r.prompt_tokens_per_s, r.prompt_tokens);
    println!("generation  {:.1} tokens/s  (tg{})", r.gen_tokens_per_s, r.gen_tokens);
    Ok(())
}
