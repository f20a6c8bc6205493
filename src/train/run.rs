//! The training loop: data → planned steps → AdamW → checkpoints → adapter.

use super::adapter::AdapterMeta;
use super::budget::{MemoryReport, PlannedStep, StepShape, fit, plan_step};
use super::config::{Duration, Optimizer, TrainConfig};
use super::mezo::{MezoConfig, mezo_step};
use super::optim::{AdamWState, all_finite, clip_scale, global_norm};
use super::schedule::LrSchedule;
use super::{checkpoint, plot};
use crate::backend::gpu::train::GpuOptim;
use crate::data::{self, Batch, DataOptions, Dataset, Packer, PackerState};
use crate::graph::{DecoderGraph, MemoryPlan};
use crate::model::Model;
use crate::peft::Method;
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// File names inside a run's output folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.bin";
/// The trained adapter, in llama.cpp's GGUF LoRA format.
pub const ADAPTER_FILE: &str = "adapter.gguf";
/// The loss curve.
pub const CURVE_FILE: &str = "loss.svg";
/// The run's summary and loss history.
pub const SUMMARY_FILE: &str = "train.json";

/// A training run to make.
pub struct TrainRequest<'a> {
    /// The base model.
    pub model: &'a Model,
    /// Its tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// Its chat template, for `messages` data.
    pub template: Option<&'a ChatTemplate>,
    /// Training data (file or folder).
    pub data: &'a Path,
    /// Held-out data; `None` splits `config.eval_split` off the training data.
    pub eval_data: Option<&'a Path>,
    /// Output folder.
    pub out: &'a Path,
    /// The configuration (ignored when resuming: the checkpoint's is used).
    pub config: TrainConfig,
    /// CPU worker threads (0: one per core).
    pub threads: usize,
    /// The device running the steps.
    pub device: super::TrainDevice,
    /// Continue the run checkpointed in `out`.
    pub resume: bool,
}

/// What happened, reported as it happens.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainEvent {
    /// The plan, before the first step.
    Planned {
        /// Memory bill.
        memory: MemoryReport,
        /// Optimizer steps of the whole run.
        total_steps: u64,
        /// Step to start from (non-zero when resuming).
        start_step: u64,
        /// Training examples.
        train_examples: usize,
        /// Held-out examples.
        eval_examples: usize,
        /// Trainable parameters.
        params: usize,
    },
    /// An optimizer step finished.
    Step {
        /// 1-based step number.
        step: u64,
        /// Steps in the run.
        total_steps: u64,
        /// Mean training loss of the step (NaN when skipped).
        loss: f32,
        /// Learning rate used.
        lr: f32,
        /// Gradient norm before clipping.
        grad_norm: f32,
        /// Tokens per second over this step.
        tokens_per_s: f32,
        /// Why the step was skipped, if it was.
        skipped: Option<String>,
    },
    /// Held-out loss after `step`.
    Eval {
        /// Step evaluated after.
        step: u64,
        /// Mean held-out loss.
        loss: f32,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// Step saved.
        step: u64,
        /// File written.
        path: PathBuf,
    },
    /// Evaluation stopped improving.
    EarlyStop {
        /// Step stopped at.
        step: u64,
        /// Step of the best evaluation (its adapter is the one written).
        best_step: u64,
    },
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Steps completed.
    pub steps: u64,
    /// Steps skipped for non-finite values.
    pub skipped_steps: u64,
    /// Mean training loss of the first and last steps.
    pub first_loss: f32,
    /// Mean training loss of the last step.
    pub last_loss: f32,
    /// Held-out loss before training, if evaluated.
    pub eval_before: Option<f32>,
    /// Best held-out loss and its step.
    pub best_eval: Option<(u64, f32)>,
    /// Training tokens per second (batch × seq per step, over this
    /// session's steps; evaluation and saving excluded).
    pub tokens_per_s: f32,
    /// Time spent in this session's steps.
    pub seconds: f64,
    /// The adapter written.
    pub adapter: PathBuf,
    /// Training loss per step.
    pub train_history: Vec<(u64, f32)>,
    /// Held-out loss per evaluation.
    pub eval_history: Vec<(u64, f32)>,
}

/// Identifies the model and data a checkpoint belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Fingerprint {
    arch: String,
    layers: usize,
    n_embd: usize,
    n_vocab: usize,
    weight_bytes: u64,
    data: u64,
}

/// Everything needed to continue a run exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Checkpoint {
    config: TrainConfig,
    fingerprint: Fingerprint,
    micro_batch: usize,
    grad_accum: usize,
    recomputed_layers: usize,
    total_steps: u64,
    step: u64,
    param_names: Vec<String>,
    params: Vec<Vec<f32>>,
    adam: AdamWState,
    packer: PackerState,
    train_history: Vec<(u64, f32)>,
    eval_history: Vec<(u64, f32)>,
    eval_before: Option<f32>,
    best: Option<(u64, f32, Vec<Vec<f32>>)>,
    evals_since_best: u32,
    skipped: u64,
    /// Set when the run ended (a resume then has nothing to do).
    finished: bool,
}

fn dataset_hash(ds: &Dataset) -> u64 {
    let mut bytes = Vec::with_capacity(ds.tokens() * 5);
    for e in &ds.examples {
        for (&t, &m) in e.tokens.iter().zip(&e.trainable) {
            bytes.extend_from_slice(&t.to_le_bytes());
            bytes.push(m as u8);
        }
        bytes.push(0xFF);
    }
    checkpoint::fnv1a64(&bytes)
}

/// The dropout seed of micro-batch `micro` of step `step`.
fn micro_seed(seed: u64, step: u64, micro: usize) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (micro as u64) << 56;
    z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 29)
}

/// Load training and held-out data, reporting bad lines before any work.
fn load_data(req: &TrainRequest, cfg: &TrainConfig) -> Result<(Dataset, Dataset)> {
    let opts = DataOptions {
        seq: cfg.seq,
        train_on_prompt: cfg.train_on_prompt,
    };
    let train = data::load(req.data, req.tokenizer, req.template, &opts)?;
    Ok(match req.eval_data {
        Some(p) => (train, data::load(p, req.tokenizer, req.template, &opts)?),
        None if cfg.eval_split > 0.0 => train.split(cfg.eval_split, cfg.seed),
        None => {
            let empty = Dataset {
                examples: Vec::new(),
                ..train.clone()
            };
            (train, empty)
        }
    })
}

/// The rows of the step graph: `seq` data tokens after the method's
/// virtual tokens. Errors when those would leave a sliding window (the
/// graph's attention sink assumes the window does not bind).
pub fn graph_seq(
    spec: &crate::model::DecoderSpec,
    method: &dyn Method,
    seq: usize,
) -> Result<usize> {
    let n = method.virtual_tokens();
    let rows = seq + n;
    if n > 0
        && let Some(w) = spec.layers.iter().filter_map(|l| l.window).min()
        && rows > w
    {
        return Err(Error::Invalid(format!(
            "--seq {seq} plus {n} virtual tokens is longer than the model's sliding window of \
             {w}: use --seq {} or less with {}",
            w.saturating_sub(n),
            method.name()
        )));
    }
    Ok(rows)
}

/// Mean held-out loss of `params`.
fn evaluate(
    model: &Model,
    method: &dyn Method,
    eval: &Dataset,
    micro: usize,
    seq: usize,
    device: (&super::TrainDevice, usize),
    params: &[Vec<f32>],
) -> Result<f32> {
    let n = method.virtual_tokens();
    let rows = graph_seq(model.spec(), method, seq)?;
    let g = DecoderGraph::build(model.spec(), micro, rows, method);
    let plan = MemoryPlan::new(&g);
    // Held-out loss is the exact f32 forward's, whatever the steps use.
    let mut step = device.0.step(model, g, plan, device.1, false)?;
    let (mut sum, mut count) = (0.0, 0);
    for b in data::eval_batches(eval, seq, micro) {
        let b = b.with_virtual(n);
        let (s, c) = step.run(&b.step_inputs(0.0, 0), params)?;
        sum += s;
        count += c;
    }
    Ok(if count == 0 {
        f32::NAN
    } else {
        (sum / count as f64) as f32
    })
}

/// Train an adapter as `req` says, reporting through `progress`
/// (return `Break` to stop: the run is checkpointed and can be resumed).
pub fn train(
    req: &TrainRequest,
    progress: &mut dyn FnMut(&TrainEvent) -> ControlFlow<()>,
) -> Result<TrainSummary> {
    let ckpt_path = req.out.join(CHECKPOINT_FILE);
    let resumed: Option<Checkpoint> = if req.resume {
        if !ckpt_path.exists() {
            return Err(Error::Invalid(format!(
                "--resume: {} has no {CHECKPOINT_FILE} to continue from",
                req.out.display()
            )));
        }
        Some(checkpoint::load(&ckpt_path)?)
    } else {
        for f in [CHECKPOINT_FILE, ADAPTER_FILE] {
            if req.out.join(f).exists() {
                return Err(Error::Invalid(format!(
                    "{} already holds a run ({f}); pass --resume to continue it, or choose another --out",
                    req.out.display()
                )));
            }
        }
        None
    };
    let cfg = resumed
        .as_ref()
        .map_or_else(|| req.config.clone(), |c| c.config.clone());
    let threads = crate::backend::cpu::resolve_threads(req.threads);
    cfg.validate()?;
    let spec = req.model.spec();
    let method = crate::peft::build(&cfg.method, &cfg.lora, req.model)?;
    let method: &dyn Method = &*method;
    let mezo = match cfg.optimizer {
        Optimizer::AdamW => None,
        Optimizer::Mezo { eps } => Some(MezoConfig {
            eps,
            weight_decay: cfg.adamw.weight_decay,
        }),
    };
    let (train_ds, eval_ds) = load_data(req, &cfg)?;
    let fingerprint = Fingerprint {
        arch: spec.arch.clone(),
        layers: spec.layers.len(),
        n_embd: spec.n_embd,
        n_vocab: spec.n_vocab,
        weight_bytes: super::budget::weight_bytes(spec),
        data: dataset_hash(&train_ds) ^ dataset_hash(&eval_ds).rotate_left(1),
    };
    if let Some(c) = &resumed
        && c.fingerprint != fingerprint
    {
        return Err(Error::Invalid(format!(
            "--resume: {} was made with another model or other data ({:?}), not this one ({:?})",
            ckpt_path.display(),
            c.fingerprint,
            fingerprint
        )));
    }
    let shape = StepShape {
        spec,
        method,
        seq: graph_seq(spec, method, cfg.seq)?,
        threads,
        data_bytes: ((train_ds.tokens() + eval_ds.tokens()) * 5) as u64,
        keep_best: cfg.early_stop > 0,
        gpu: matches!(req.device, super::TrainDevice::Gpu(_)),
        zeroth_order: mezo.is_some(),
        fast: cfg.fast,
    };
    let PlannedStep {
        graph,
        plan,
        report,
    } = match &resumed {
        Some(c) => plan_step(&shape, c.micro_batch, c.grad_accum, c.recomputed_layers)?,
        None => fit(
            &shape,
            cfg.batch,
            cfg.grad_accum,
            cfg.memory_budget,
            cfg.recompute,
        )?,
    };
    let (micro, accum) = (report.micro_batch, report.grad_accum);
    let mut packer = Packer::new(&train_ds, cfg.seq, micro, cfg.seed)?;
    let total_steps = match &resumed {
        Some(c) => c.total_steps,
        None => match cfg.duration {
            Duration::Steps(s) => s,
            Duration::Epochs(e) => ((packer.steps_per_epoch() as f64 * e as f64) / accum as f64)
                .ceil()
                .max(1.0) as u64,
        },
    };
    let schedule = LrSchedule {
        peak: cfg.lr,
        warmup: cfg.warmup.unwrap_or((total_steps / 20).min(100)),
        total: total_steps,
        kind: cfg.schedule,
        min_ratio: cfg.min_lr_ratio,
    };
    let names: Vec<String> = graph.params.iter().map(|p| p.name.clone()).collect();
    let sizes: Vec<usize> = graph.params.iter().map(|p| p.shape.numel()).collect();
    let lr_mult: Vec<f32> = names.iter().map(|n| method.lr_multiplier(n)).collect();
    let mut st = match resumed {
        Some(c) => {
            if c.param_names != names {
                return Err(Error::Invalid(format!(
                    "--resume: {} holds other adapter tensors than this configuration makes",
                    ckpt_path.display()
                )));
            }
            packer.restore(c.packer)?;
            c
        }
        None => Checkpoint {
            config: cfg.clone(),
            fingerprint,
            micro_batch: micro,
            grad_accum: accum,
            recomputed_layers: report.recomputed_layers,
            total_steps,
            step: 0,
            param_names: names.clone(),
            params: method.init(&graph, cfg.seed),
            // MeZO keeps no moments.
            adam: AdamWState::new(if mezo.is_some() { &[] } else { &sizes }),
            packer: packer.state(),
            train_history: Vec::new(),
            eval_history: Vec::new(),
            eval_before: None,
            best: None,
            evals_since_best: 0,
            skipped: 0,
            finished: false,
        },
    };
    std::fs::create_dir_all(req.out).map_err(|e| Error::io(req.out, e))?;
    let n_params = sizes.iter().sum();
    let planned = TrainEvent::Planned {
        memory: report,
        total_steps,
        start_step: st.step,
        train_examples: train_ds.len(),
        eval_examples: eval_ds.len(),
        params: n_params,
    };
    let _ = progress(&planned);
    let mut step = req.device.step(req.model, graph, plan, threads, cfg.fast)?;
    // On a device with a fused optimizer (the GPU), parameters and AdamW
    // moments stay on the device and a whole step is one submission;
    // gradient accumulation keeps the host path.
    let fused = accum == 1 && mezo.is_none() && step.fused_optimizer().is_some();
    if let (true, Some(g)) = (fused, step.fused_optimizer()) {
        g.load_params(&st.params)?;
        if st.adam.step > 0 {
            g.set_moments(&st.adam.m, &st.adam.v)?;
        }
    }
    // Bring resident parameters and moments back to the host (before an
    // evaluation, a checkpoint or the adapter is written).
    let sync =
        |step: &mut Box<dyn crate::backend::TrainStep + '_>, st: &mut Checkpoint| -> Result<()> {
            if let (true, Some(g)) = (fused, step.fused_optimizer()) {
                st.params = g.params()?;
                (st.adam.m, st.adam.v) = g.moments()?;
            }
            Ok(())
        };
    let has_eval = !eval_ds.is_empty();
    let eval = |params: &[Vec<f32>]| {
        evaluate(
            req.model,
            method,
            &eval_ds,
            micro,
            cfg.seq,
            (&req.device, threads),
            params,
        )
    };
    if has_eval && st.step == 0 && st.eval_before.is_none() {
        let l = eval(&st.params)?;
        st.eval_before = Some(l);
        if progress(&TrainEvent::Eval { step: 0, loss: l }).is_break() {
            return Err(Error::Cancelled);
        }
    }
    let save = |st: &mut Checkpoint, packer: &Packer| -> Result<()> {
        st.packer = packer.state();
        checkpoint::save(&ckpt_path, st)
    };
    let mut grads: Vec<Vec<f32>> = match mezo {
        Some(_) => Vec::new(),
        None => sizes.iter().map(|&n| vec![0.0; n]).collect(),
    };
    let mut perturbed: Vec<Vec<f32>> = Vec::new();
    let mut step_seconds = 0.0f64;
    let mut session_steps = 0u64;
    let mut early_stop = false;
    while st.step < total_steps && !st.finished {
        let t0 = Instant::now();
        let s = st.step;
        let lr = schedule.lr_at(s);
        let n_virtual = method.virtual_tokens();
        let batches: Vec<Batch> = (0..accum)
            .map(|_| packer.next_batch().with_virtual(n_virtual))
            .collect();
        let targets: usize = batches.iter().map(|b| b.target_count()).sum();
        let mut skipped = None;
        let (mut loss_sum, mut norm) = (0.0f64, 0.0f64);
        let mut applied = false;
        if targets == 0 {
            skipped = Some("no target tokens in this step's batches".to_string());
        } else if let Some(m) = &mezo {
            // Both passes see the same batches and dropout masks; the
            // direction's seed is the step's.
            let mut loss = |p: &[Vec<f32>]| -> Result<f64> {
                let mut sum = 0.0;
                for (mi, b) in batches.iter().enumerate() {
                    sum += step
                        .run(&b.step_inputs(0.0, micro_seed(cfg.seed, s, mi)), p)?
                        .0;
                }
                Ok(sum / targets as f64)
            };
            let z_seed = micro_seed(cfg.seed ^ 0x4d65_5a4f, s, 0);
            let r = mezo_step(&mut st.params, &mut perturbed, m, lr, z_seed, &mut loss)?;
            loss_sum = 0.5 * (r.loss_plus + r.loss_minus) * targets as f64;
            norm = r.projected_grad.abs();
            if r.applied {
                applied = true;
            } else {
                skipped = Some(format!(
                    "non-finite loss ({} at +ε, {} at −ε)",
                    r.loss_plus, r.loss_minus
                ));
            }
        } else if let (true, Some(g)) = (fused, step.fused_optimizer()) {
            let opt = GpuOptim {
                cfg: cfg.adamw,
                lrs: lr_mult.iter().map(|m| m * lr).collect(),
                max_grad_norm: cfg.max_grad_norm,
                t: st.adam.step + 1,
            };
            let seed = micro_seed(cfg.seed, s, 0);
            let r = g.train_step(&batches[0].step_inputs(1.0 / targets as f32, seed), &opt)?;
            (loss_sum, norm) = (r.nll_sum, f64::from(r.grad_norm));
            if r.skipped {
                skipped = Some(if loss_sum.is_finite() {
                    "non-finite gradients".to_string()
                } else {
                    format!("non-finite loss ({loss_sum})")
                });
            } else {
                st.adam.step += 1;
                applied = true;
            }
        } else {
            let scale = 1.0 / targets as f32;
            for (mi, b) in batches.iter().enumerate() {
                let (l, _) = step.run(
                    &b.step_inputs(scale, micro_seed(cfg.seed, s, mi)),
                    &st.params,
                )?;
                loss_sum += l;
                for (i, g) in grads.iter_mut().enumerate() {
                    step.read_grad(i, g, mi > 0)?;
                }
            }
            let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
            norm = global_norm(&refs);
            if !loss_sum.is_finite() {
                skipped = Some(format!("non-finite loss ({loss_sum})"));
            } else if !all_finite(&refs) || !norm.is_finite() {
                skipped = Some("non-finite gradients".to_string());
            }
        }
        let loss = (loss_sum / targets.max(1) as f64) as f32;
        if skipped.is_none() {
            if !applied {
                let c = clip_scale(norm, cfg.max_grad_norm);
                if c != 1.0 {
                    grads.iter_mut().flatten().for_each(|g| *g *= c);
                }
                let lrs: Vec<f32> = lr_mult.iter().map(|m| m * lr).collect();
                let mut ps: Vec<&mut [f32]> =
                    st.params.iter_mut().map(|p| p.as_mut_slice()).collect();
                let gs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
                st.adam.step(&cfg.adamw, &mut ps, &gs, &lrs);
            }
            st.train_history.push((s + 1, loss));
        } else {
            st.skipped += 1;
        }
        st.step += 1;
        session_steps += 1;
        let secs = t0.elapsed().as_secs_f64();
        step_seconds += secs;
        let ev = TrainEvent::Step {
            step: st.step,
            total_steps,
            loss: if skipped.is_some() { f32::NAN } else { loss },
            lr,
            grad_norm: norm as f32,
            tokens_per_s: ((micro * cfg.seq * accum) as f64 / secs) as f32,
            skipped,
        };
        let mut stop = progress(&ev).is_break();
        let last = st.step == total_steps;
        if has_eval && ((cfg.eval_every > 0 && st.step % cfg.eval_every == 0) || last) {
            sync(&mut step, &mut st)?;
            let l = eval(&st.params)?;
            st.eval_history.push((st.step, l));
            stop |= progress(&TrainEvent::Eval {
                step: st.step,
                loss: l,
            })
            .is_break();
            let improved = st.best.as_ref().is_none_or(|b| l < b.1);
            if improved {
                st.evals_since_best = 0;
                if cfg.early_stop > 0 {
                    st.best = Some((st.step, l, st.params.clone()));
                }
            } else {
                st.evals_since_best += 1;
                if cfg.early_stop > 0 && st.evals_since_best >= cfg.early_stop {
                    early_stop = true;
                    let best_step = st.best.as_ref().map_or(st.step, |b| b.0);
                    let _ = progress(&TrainEvent::EarlyStop {
                        step: st.step,
                        best_step,
                    });
                }
            }
            if cfg.early_stop == 0 && improved {
                st.best = Some((st.step, l, Vec::new()));
            }
        }
        if early_stop {
            st.finished = true;
        }
        if stop || (cfg.save_every > 0 && st.step % cfg.save_every == 0 && !last && !early_stop) {
            sync(&mut step, &mut st)?;
            save(&mut st, &packer)?;
            let _ = progress(&TrainEvent::Checkpoint {
                step: st.step,
                path: ckpt_path.clone(),
            });
        }
        if stop {
            return Err(Error::Cancelled);
        }
        if early_stop {
            break;
        }
    }
    st.finished = true;
    // The adapter: the best evaluation's when early stopping kept one.
    sync(&mut step, &mut st)?;
    let final_params = match &st.best {
        Some((_, _, p)) if cfg.early_stop > 0 && !p.is_empty() => p.clone(),
        _ => st.params.clone(),
    };
    let adapter_path = req.out.join(ADAPTER_FILE);
    let meta = AdapterMeta {
        config: &cfg,
        steps: st.step,
        base: req.model.file().path(),
    };
    super::adapter::write_adapter(
        &adapter_path,
        req.model,
        method,
        &names,
        &final_params,
        &meta,
    )?;
    save(&mut st, &packer)?;
    let seconds = step_seconds;
    let summary = TrainSummary {
        steps: st.step,
        skipped_steps: st.skipped,
        first_loss: st.train_history.first().map_or(f32::NAN, |x| x.1),
        last_loss: st.train_history.last().map_or(f32::NAN, |x| x.1),
        eval_before: st.eval_before,
        best_eval: st.best.as_ref().map(|b| (b.0, b.1)),
        tokens_per_s: ((session_steps as usize * micro * cfg.seq * accum) as f64
            / seconds.max(1e-9)) as f32,
        seconds,
        adapter: adapter_path,
        train_history: st.train_history.clone(),
        eval_history: st.eval_history.clone(),
    };
    let mut eval_pts = st.eval_history.clone();
    if let Some(l) = st.eval_before {
        eval_pts.insert(0, (0, l));
    }
    let title = format!("{} on {}", super::adapter::describe(&cfg), spec.arch);
    let svg = plot::loss_curve_svg(&title, &st.train_history, &eval_pts);
    checkpoint::write_atomic(&req.out.join(CURVE_FILE), svg.as_bytes())?;
    let json = serde_json::to_vec_pretty(&summary).map_err(|e| Error::Invalid(e.to_string()))?;
    checkpoint::write_atomic(&req.out.join(SUMMARY_FILE), &json)?;
    Ok(summary)
}
