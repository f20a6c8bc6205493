//! `edgetune bench train`: LoRA training steps per second and peak memory,
//! on the text PyTorch+PEFT's side-by-side benchmark uses.

use super::plan::{LoraArgs, StepArgs};
use super::{keep_going, model_path, print_json, progress_bar, report};
use clap::Args;
use edgetune::Error;
use edgetune::model::Model;
use edgetune::peft::lora::Lora;
use edgetune::tokenizer::Tokenizer;
use edgetune::train::bench::{TrainBenchOptions, bench_train, corpus_tokens};
use edgetune::train::budget::fmt_bytes;
use std::path::PathBuf;

/// Arguments of `bench train`.
#[derive(Args)]
pub struct TrainBenchArgs {
    /// GGUF model file [default: models/SmolLM2-135M-Instruct.Q4_1.gguf, or $EDGETUNE_MODEL]
    #[arg(value_name = "MODEL")]
    model: Option<PathBuf>,
    #[command(flatten)]
    lora: LoraArgs,
    #[command(flatten)]
    step: StepArgs,
    /// Untimed steps before the timed ones.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Folder holding the benchmark texts GPL-3, Apache-2.0 and GPL-2.
    #[arg(long, value_name = "DIR", default_value = "/usr/share/common-licenses")]
    text_dir: PathBuf,
    /// Device to train on: `auto` takes a hardware GPU when there is one,
    /// else the CPU; `gpu` also accepts a software adapter.
    #[arg(long, value_enum, default_value = "auto")]
    device: super::Device,
    /// GPU adapter: part of its name or its index in `info --devices`.
    #[arg(long, value_name = "NAME")]
    gpu_adapter: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: TrainBenchArgs) -> Result<(), Error> {
    let device = super::train_device(a.device, a.gpu_adapter.clone())?;
    let model = Model::open(model_path(a.model.as_deref())?)?;
    let tok = Tokenizer::from_gguf(model.file())?;
    let tokens = corpus_tokens(&tok, &a.text_dir)?;
    let lora_cfg = a.lora.config()?;
    Lora::new(lora_cfg.clone(), model.spec().layers.len())?;
    let o = TrainBenchOptions {
        lora: lora_cfg,
        batch: a.step.batch,
        seq: a.step.seq,
        warmup: a.warmup,
        steps: a.steps,
        memory_budget: a.step.memory_budget,
        recompute: a.step.recompute.into(),
        threads: a.step.threads(),
        lr: 2e-4,
        device,
        fast: a.step.fast,
    };
    let pb = progress_bar(o.warmup + o.steps, "training steps");
    let r = bench_train(&model, &tokens, &o, &mut |done, _| {
        pb.set_position(done as u64);
        keep_going()
    })?;
    pb.finish_and_clear();
    if a.json {
        return print_json(&r);
    }
    let p = &r.plan;
    let mut out = String::new();
    report!(out, "model        {}", model.file().path().display());
    report!(
        out,
        "device       {} ({} launches per step)",
        r.device,
        r.launches
    );
    report!(
        out,
        "config       LoRA r={} alpha={} on {} targets, batch {} × seq {}, {} threads{}",
        o.lora.rank,
        o.lora.alpha,
        o.lora.targets.len(),
        o.batch,
        o.seq,
        r.threads,
        if o.fast {
            ", 8-bit frozen-weight products (--fast)"
        } else {
            ""
        }
    );
    report!(
        out,
        "plan         micro-batch {} × accumulation {}, {} of {} layers recomputed, peak {}",
        p.micro_batch,
        p.grad_accum,
        p.recomputed_layers,
        p.layers,
        fmt_bytes(p.total())
    );
    report!(
        out,
        "train        {:.1} tokens/s over {} steps",
        r.tokens_per_s,
        o.steps
    );
    if let Some(rss) = r.peak_rss {
        let ratio = rss as f64 / p.total() as f64;
        report!(
            out,
            "peak RSS     {} ({:.0}% of the plan)",
            fmt_bytes(rss),
            ratio * 100.0
        );
    }
    report!(
        out,
        "loss         {:.3} → {:.3}",
        r.losses.first().copied().unwrap_or(f32::NAN),
        r.losses.last().copied().unwrap_or(f32::NAN)
    );
    if !r.profile.is_empty() {
        let step: f64 = r.profile.iter().map(|e| e.2).sum();
        report!(out, "one step     {step:.2} s:");
        for (name, calls, secs) in r.profile.iter().take(12) {
            report!(
                out,
                "  {name:<16} {calls:>5} calls {secs:>8.3} s {:>5.1}%",
                100.0 * secs / step.max(1e-12)
            );
        }
    }
    print!("{out}");
    Ok(())
}
