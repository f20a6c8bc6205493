//! The training benchmark: real LoRA steps (forward, backward, AdamW) on a
//! fixed token stream, timed per step, with the planned and the measured
//! peak memory and a per-op profile of one step.
//!
//! Run side by side with `shared/bench/pytorch-peft` on the same text (the
//! Debian licence texts GPL-3, Apache-2.0 and GPL-2, each tokenized without
//! special tokens and followed by EOS, concatenated; step `i` uses tokens
//! `[i·b·s, (i+1)·b·s)` as `b` sequences of `s`).

use super::budget::{MemoryReport, PlannedStep, Recompute, StepShape, fit};
use super::optim::{AdamWConfig, AdamWState};
use crate::backend::cpu::train::StepProfile;
use crate::backend::gpu::train::GpuOptim;
use crate::graph::StepInputs;
use crate::model::Model;
use crate::peft::Method;
use crate::peft::lora::{Lora, LoraConfig};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use serde::Serialize;
use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

/// The files of the benchmark text, in order.
pub const CORPUS_FILES: [&str; 3] = ["GPL-3", "Apache-2.0", "GPL-2"];

/// The benchmark's token stream: each file of `dir` in [`CORPUS_FILES`]
/// tokenized without special tokens and followed by EOS.
pub fn corpus_tokens(tok: &Tokenizer, dir: &Path) -> Result<Vec<u32>> {
    let eos = tok
        .eos_id()
        .ok_or_else(|| Error::Invalid("the tokenizer has no EOS token".into()))?;
    let mut ids = Vec::new();
    for f in CORPUS_FILES {
        let p = dir.join(f);
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        ids.extend(tok.encode_with(&text, false, false)?);
        ids.push(eos);
    }
    Ok(ids)
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct TrainBenchOptions {
    /// The adapter.
    pub lora: LoraConfig,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// Memory budget to fit.
    pub memory_budget: Option<u64>,
    /// Layer recomputation.
    pub recompute: Recompute,
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// Learning rate of the AdamW steps.
    pub lr: f32,
    /// The device running the steps.
    pub device: super::TrainDevice,
    /// 8-bit frozen-weight products on the CPU ([`super::TrainConfig::fast`]).
    pub fast: bool,
}

impl Default for TrainBenchOptions {
    fn default() -> Self {
        TrainBenchOptions {
            lora: LoraConfig::default(),
            batch: 4,
            seq: 256,
            warmup: 2,
            steps: 10,
            memory_budget: None,
            recompute: Recompute::Auto,
            threads: 0,
            lr: 2e-4,
            device: super::TrainDevice::Cpu,
            fast: false,
        }
    }
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBenchResult {
    /// The plan (micro-batch, recomputation, memory bill).
    pub plan: MemoryReport,
    /// Tokens (batch × seq) per second over the timed steps.
    pub tokens_per_s: f64,
    /// Seconds of each timed step.
    pub step_seconds: Vec<f64>,
    /// Mean loss of every step, warm-up included.
    pub losses: Vec<f32>,
    /// Peak resident set of the process, when the OS reports it.
    pub peak_rss: Option<u64>,
    /// Seconds per op kind in one step (the mean over timed steps),
    /// largest first.
    pub profile: Vec<(String, usize, f64)>,
    /// Worker threads used.
    pub threads: usize,
    /// The device, for people.
    pub device: String,
    /// Device work items per step (GPU dispatches, CPU graph nodes).
    pub launches: usize,
}

/// The process's peak resident set in bytes (Linux `VmHWM`).
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Run `warmup + steps` LoRA training steps on `tokens`, reporting
/// `(steps done, total)` through `progress`.
pub fn bench_train(
    model: &Model,
    tokens: &[u32],
    o: &TrainBenchOptions,
    progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<TrainBenchResult> {
    let spec = model.spec();
    let threads = crate::backend::cpu::resolve_threads(o.threads);
    let lora = Lora::new(o.lora.clone(), spec.layers.len())?;
    let per_step = o.batch * o.seq;
    let total = o.warmup + o.steps;
    if tokens.len() < total * per_step {
        return Err(Error::Invalid(format!(
            "the benchmark text has {} tokens; {total} steps of {} × {} need {}",
            tokens.len(),
            o.batch,
            o.seq,
            total * per_step
        )));
    }
    let shape = StepShape {
        zeroth_order: false,
        spec,
        method: &lora,
        seq: o.seq,
        threads,
        data_bytes: (tokens.len() * 4) as u64,
        keep_best: false,
        gpu: matches!(o.device, crate::train::TrainDevice::Gpu(_)),
        fast: o.fast,
    };
    let PlannedStep {
        graph,
        plan,
        report,
    } = fit(&shape, o.batch, 1, o.memory_budget, o.recompute)?;
    let (micro, accum) = (report.micro_batch, report.grad_accum);
    let mut params = lora.init(&graph, 1);
    let sizes: Vec<usize> = params.iter().map(|p| p.len()).collect();
    let mut adam = AdamWState::new(&sizes);
    let mut grads: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    let param_names: Vec<String> = graph.params.iter().map(|p| p.name.clone()).collect();
    let mut step = o.device.step(model, graph, plan, threads, o.fast)?;
    let positions: Vec<u32> = (0..micro * o.seq).map(|i| (i % o.seq) as u32).collect();
    let seg: Vec<u32> = vec![0; micro * o.seq];
    let (mut step_seconds, mut losses) = (Vec::new(), Vec::new());
    let mut profile = StepProfile::default();
    let mut adam_seconds = 0.0;
    // The GPU keeps parameters and moments resident and runs the optimizer
    // in the step's submission.
    let fused = accum == 1 && step.fused_optimizer().is_some();
    if let (true, Some(g)) = (fused, step.fused_optimizer()) {
        g.load_params(&params)?;
    }
    let lrs: Vec<f32> = param_names
        .iter()
        .map(|n| o.lr * lora.lr_multiplier(n))
        .collect();
    for s in 0..total {
        if s == o.warmup {
            step.enable_profile();
        }
        let t0 = Instant::now();
        let chunk = &tokens[s * per_step..(s + 1) * per_step];
        let mut loss = 0.0;
        let n_targets = (o.batch * (o.seq - 1)) as f32;
        for m in 0..accum {
            let rows = &chunk[m * micro * o.seq..(m + 1) * micro * o.seq];
            let targets: Vec<u32> = (0..rows.len())
                .map(|i| {
                    if i % o.seq == o.seq - 1 {
                        u32::MAX
                    } else {
                        rows[i + 1]
                    }
                })
                .collect();
            let inp = StepInputs {
                tokens: rows,
                targets: &targets,
                positions: &positions,
                seg_start: &seg,
                loss_scale: 1.0 / n_targets,
                seed: s as u64,
            };
            if let (true, Some(g)) = (fused, step.fused_optimizer()) {
                let opt = GpuOptim {
                    cfg: AdamWConfig::default(),
                    lrs: lrs.clone(),
                    max_grad_norm: 0.0,
                    t: s as u64 + 1,
                };
                loss += g.train_step(&inp, &opt)?.nll_sum;
                continue;
            }
            let (l, _) = step.run(&inp, &params)?;
            loss += l;
            for (i, g) in grads.iter_mut().enumerate() {
                step.read_grad(i, g, m > 0)?;
            }
        }
        if !fused {
            let ta = Instant::now();
            let mut ps: Vec<&mut [f32]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
            let gs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
            adam.step(&AdamWConfig::default(), &mut ps, &gs, &lrs);
            if s >= o.warmup {
                adam_seconds += ta.elapsed().as_secs_f64();
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        losses.push((loss / n_targets as f64) as f32);
        if s >= o.warmup {
            step_seconds.push(secs);
        }
        if progress(s + 1, total).is_break() {
            return Err(Error::Cancelled);
        }
    }
    if let Some(p) = step.profile() {
        profile = p.clone();
    }
    let timed: f64 = step_seconds.iter().sum();
    let mut ops: Vec<(String, usize, f64)> = profile
        .ops
        .iter()
        .map(|(n, c, s)| (n.to_string(), c / o.steps.max(1), s / o.steps.max(1) as f64))
        .collect();
    if !fused {
        ops.push(("adamw".into(), 1, adam_seconds / o.steps.max(1) as f64));
    }
    ops.sort_by(|a, b| b.2.total_cmp(&a.2));
    Ok(TrainBenchResult {
        plan: report,
        tokens_per_s: (o.steps * per_step) as f64 / timed.max(1e-9),
        step_seconds,
        losses,
        peak_rss: peak_rss(),
        profile: ops,
        threads,
        device: o.device.name(),
        launches: step.launches(),
    })
}
