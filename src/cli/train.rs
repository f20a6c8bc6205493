//! `edgetune train`.

use super::plan::{LoraArgs, OptimizerArgs, StepArgs, count, memory_table};
use super::{Device, emit, keep_going, model_path, print_json, report};
use clap::Args;
use edgetune::Error;
use edgetune::model::Model;
use edgetune::tokenizer::{ChatTemplate, Tokenizer};
use edgetune::train::optim::AdamWConfig;
use edgetune::train::schedule::ScheduleKind;
use edgetune::train::{
    ADAPTER_FILE, CHECKPOINT_FILE, CURVE_FILE, Duration, SUMMARY_FILE, TrainConfig, TrainEvent,
    TrainRequest, TrainSummary, train,
};
use indicatif::ProgressBar;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

/// Arguments of `train`.
#[derive(Args)]
pub struct TrainArgs {
    /// [MODEL] DATA: the GGUF model (default: models/SmolLM2-135M-Instruct.Q4_1.gguf,
    /// or $EDGETUNE_MODEL) and the training data: a .jsonl file
    /// ({"prompt","completion"}, {"messages"} or {"text"} lines), a .txt/.md
    /// file, or a folder of notes.
    #[arg(value_name = "PATH", num_args = 1..=2, required = true)]
    paths: Vec<PathBuf>,
    /// Output folder: adapter.gguf, loss.svg, train.json and checkpoint.bin
    /// are written there. It must not hold a run already, unless --resume.
    #[arg(long, short, value_name = "DIR")]
    out: PathBuf,
    /// Read options from a TOML file: each key a long option (`lr = 1e-3`,
    /// `method = ["lora", "prompt"]`, `rslora = true`), plus `model` and
    /// `data` for the paths; the command line overrides the file.
    #[arg(long, value_name = "FILE")]
    #[allow(dead_code)] // read by cli::config before parsing
    config: Option<PathBuf>,
    /// Continue the run checkpointed in --out, with its saved settings (the
    /// training options given now are not used).
    #[arg(long)]
    resume: bool,
    /// Held-out data to evaluate on, in the same formats as DATA
    /// [default: --eval-split of DATA, or none].
    #[arg(long, value_name = "PATH")]
    eval_data: Option<PathBuf>,
    /// A Jinja chat template file for {"messages"} data, for models without
    /// one or to override the model's.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    #[command(flatten)]
    lora: LoraArgs,
    /// Peak learning rate.
    #[arg(long, value_name = "RATE", default_value_t = 2e-4)]
    lr: f32,
    /// Learning-rate decay after warmup: constant, linear or cosine.
    #[arg(long, value_name = "KIND", default_value = "cosine")]
    schedule: ScheduleKind,
    /// Warmup steps [default: 5% of the run, at most 100].
    #[arg(long, value_name = "STEPS")]
    warmup: Option<u64>,
    /// Learning rate at the end of the decay, as a fraction of the peak.
    #[arg(long, value_name = "RATIO", default_value_t = 0.0)]
    min_lr_ratio: f32,
    /// AdamW decoupled weight decay.
    #[arg(long, value_name = "W", default_value_t = 0.0)]
    weight_decay: f32,
    /// Passes over the training data (fractions allowed) [default: 1].
    #[arg(long, value_name = "N", conflicts_with = "steps")]
    epochs: Option<f32>,
    /// Optimizer steps to run, instead of --epochs.
    #[arg(long, value_name = "N")]
    steps: Option<u64>,
    #[command(flatten)]
    step: StepArgs,
    #[command(flatten)]
    optim: OptimizerArgs,
    /// Clip the gradients' global norm to this (0: no clipping).
    #[arg(long, value_name = "NORM", default_value_t = 1.0)]
    max_grad_norm: f32,
    /// Fraction of DATA held out for evaluation when no --eval-data is given.
    #[arg(long, value_name = "FRACTION", default_value_t = 0.0)]
    eval_split: f32,
    /// Evaluate every N steps (0: before and after the run only).
    #[arg(long, value_name = "N", default_value_t = 0)]
    eval_every: u64,
    /// Stop after N evaluations without improvement and keep the best
    /// adapter (0: never).
    #[arg(long, value_name = "N", default_value_t = 0)]
    early_stop: u32,
    /// Checkpoint every N steps (0: at the end, and on Ctrl-C).
    #[arg(long, value_name = "N", default_value_t = 0)]
    save_every: u64,
    /// Train on the prompt and user tokens too, not only on completions and
    /// assistant turns.
    #[arg(long)]
    train_on_prompt: bool,
    /// Seed of initialization, shuffling, the eval split and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device to train on: `auto` takes a hardware GPU when there is one,
    /// else the CPU; `gpu` also accepts a software adapter.
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// GPU adapter: part of its name or its index in `info --devices`
    /// [default: $EDGETUNE_ADAPTER, else the best]. Implies the GPU.
    #[arg(long, value_name = "NAME")]
    gpu_adapter: Option<String>,
    /// Print each event (planned, step, eval, checkpoint, early_stop) as one
    /// JSON line, then a final {"event":"summary",…} line.
    #[arg(long)]
    json: bool,
}

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig, Error> {
        Ok(TrainConfig {
            method: self.lora.method_spec()?,
            lora: self.lora.config()?,
            lr: self.lr,
            schedule: self.schedule,
            warmup: self.warmup,
            min_lr_ratio: self.min_lr_ratio,
            optimizer: self.optim.optimizer(),
            adamw: AdamWConfig {
                weight_decay: self.weight_decay,
                ..AdamWConfig::default()
            },
            duration: match (self.steps, self.epochs) {
                (Some(s), _) => Duration::Steps(s),
                (None, Some(e)) => Duration::Epochs(e),
                (None, None) => Duration::Epochs(1.0),
            },
            batch: self.step.batch,
            seq: self.step.seq,
            grad_accum: self.step.grad_accum,
            max_grad_norm: self.max_grad_norm,
            eval_split: self.eval_split,
            eval_every: self.eval_every,
            early_stop: self.early_stop,
            save_every: self.save_every,
            memory_budget: self.step.memory_budget,
            recompute: self.step.recompute.into(),
            fast: self.step.fast,
            train_on_prompt: self.train_on_prompt,
            seed: self.seed,
        })
    }
}

pub fn run(a: TrainArgs) -> Result<(), Error> {
    let device = super::train_device(a.device, a.gpu_adapter.clone())?;
    let config = a.config()?;
    if !a.resume {
        config.validate()?;
    }
    // With one path it is the DATA, and the model is the default.
    let (model, data) = match a.paths.as_slice() {
        [data] => (model_path(None)?, data.clone()),
        [model, data] => (model.clone(), data.clone()),
        _ => unreachable!("clap takes one or two paths"),
    };
    let model = Model::open(model)?;
    let tokenizer = Tokenizer::from_gguf(model.file())?;
    let template = match &a.chat_template {
        Some(p) => Some(ChatTemplate::for_model(model.file(), &tokenizer, Some(p))?),
        None => {
            ChatTemplate::from_gguf(model.file())?.map(|t| t.with_special_tokens_of(&tokenizer))
        }
    };
    let req = TrainRequest {
        model: &model,
        tokenizer: &tokenizer,
        template: template.as_ref(),
        data: &data,
        eval_data: a.eval_data.as_deref(),
        out: &a.out,
        config,
        threads: a.step.threads(),
        device,
        resume: a.resume,
    };
    let mut view = Progress::new(a.json, a.step.memory_budget);
    let result = train(&req, &mut |ev| view.event(ev));
    view.finish();
    match result {
        Ok(s) => view.summary(&s, &a.out),
        // Output failed: the run stopped (and checkpointed) because of it.
        Err(Error::Cancelled) if view.error.is_some() => Err(view.error.take().unwrap()),
        Err(Error::Cancelled) => {
            match view.saved_step {
                Some(step) => eprintln!(
                    "stopped at step {step}; continue with: {}",
                    resume_command()
                ),
                None => eprintln!(
                    "stopped before the first checkpoint; nothing to resume (run the same command to start over)"
                ),
            }
            Err(Error::Cancelled)
        }
        Err(e) => Err(e),
    }
}

/// What the user sees while training: the plan, a bar, eval lines, or
/// JSON lines.
struct Progress {
    json: bool,
    budget: Option<u64>,
    bar: Option<ProgressBar>,
    /// Exponential moving average of the training loss.
    ema: Option<f32>,
    last_eval: Option<f32>,
    tokens_per_s: f32,
    /// When the bar is hidden (stderr not a terminal), log a line this often.
    log_every: u64,
    /// Step of the last checkpoint written.
    saved_step: Option<u64>,
    /// The first error writing JSON (a closed pipe is not one).
    error: Option<Error>,
}

impl Progress {
    fn new(json: bool, budget: Option<u64>) -> Progress {
        Progress {
            json,
            budget,
            bar: None,
            ema: None,
            last_eval: None,
            tokens_per_s: 0.0,
            log_every: 1,
            saved_step: None,
            error: None,
        }
    }

    fn println(&self, line: &str) {
        match &self.bar {
            Some(b) if !b.is_hidden() => b.println(line),
            _ => eprintln!("{line}"),
        }
    }

    fn event(&mut self, ev: &TrainEvent) -> ControlFlow<()> {
        if self.json
            && let Err(e) = print_json(ev)
        {
            self.error.get_or_insert(e);
            return ControlFlow::Break(());
        }
        match ev {
            TrainEvent::Planned {
                memory,
                total_steps,
                start_step,
                train_examples,
                eval_examples,
                params,
            } => {
                if !self.json {
                    let mut out = String::from("memory plan:\n");
                    for line in memory_table(memory, self.budget).lines() {
                        report!(out, "  {line}");
                    }
                    report!(
                        out,
                        "{train_examples} training examples, {eval_examples} held out; {} trainable parameters; {} steps{}",
                        count(*params),
                        total_steps,
                        if *start_step > 0 {
                            format!(", resuming after step {start_step}")
                        } else {
                            String::new()
                        }
                    );
                    eprint!("{out}");
                }
                let bar = ProgressBar::new(*total_steps);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "training [{bar:30}] {pos}/{len} {msg} {elapsed_precise} ETA {eta}",
                    )
                    .expect("static template")
                    .progress_chars("=> "),
                );
                bar.set_position(*start_step);
                bar.reset_eta();
                self.log_every = (total_steps / 20).max(1);
                self.bar = Some(bar);
            }
            TrainEvent::Step {
                step,
                total_steps,
                loss,
                tokens_per_s,
                skipped,
                ..
            } => {
                if loss.is_finite() {
                    self.ema = Some(self.ema.map_or(*loss, |e| 0.9 * e + 0.1 * loss));
                }
                self.tokens_per_s = *tokens_per_s;
                let msg = self.status();
                if let Some(bar) = &self.bar {
                    bar.set_position(*step);
                    bar.set_message(msg.clone());
                    if bar.is_hidden()
                        && !self.json
                        && (step % self.log_every == 0 || step == total_steps)
                    {
                        eprintln!("step {step}/{total_steps} {msg}");
                    }
                }
                if let Some(why) = skipped
                    && !self.json
                {
                    self.println(&format!("step {step} skipped: {why}"));
                }
            }
            TrainEvent::Eval { step, loss } => {
                self.last_eval = Some(*loss);
                if !self.json {
                    self.println(&format!("eval after step {step}: loss {loss:.4}"));
                }
                if let Some(bar) = &self.bar {
                    bar.set_message(self.status());
                }
            }
            TrainEvent::Checkpoint { step, path } => {
                self.saved_step = Some(*step);
                if !self.json {
                    self.println(&format!("checkpoint at step {step}: {}", path.display()));
                }
            }
            TrainEvent::EarlyStop { step, best_step } => {
                if !self.json {
                    self.println(&format!(
                        "early stop at step {step}: no improvement since step {best_step}, whose adapter is kept"
                    ));
                }
            }
        }
        keep_going()
    }

    /// `loss 2.345 eval 2.210 1234 tok/s`
    fn status(&self) -> String {
        let mut s = match self.ema {
            Some(l) => format!("loss {l:.3}"),
            None => "loss -".to_string(),
        };
        if let Some(e) = self.last_eval {
            s += &format!(" eval {e:.3}");
        }
        s + &format!(" {:.0} tok/s", self.tokens_per_s)
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    fn summary(&mut self, s: &TrainSummary, out: &Path) -> Result<(), Error> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.json {
            let mut v = serde_json::Map::new();
            v.insert("event".into(), "summary".into());
            let fields =
                serde_json::to_value(s).map_err(|e| Error::Invalid(format!("JSON output: {e}")))?;
            if let serde_json::Value::Object(m) = fields {
                v.extend(m);
            }
            v.insert("out".into(), out.display().to_string().into());
            return print_json(&v);
        }
        let mut text = String::new();
        report!(
            text,
            "{:<12}{} ({} skipped) in {:.1} s, {:.0} tok/s",
            "steps",
            s.steps,
            s.skipped_steps,
            s.seconds,
            s.tokens_per_s
        );
        report!(
            text,
            "{:<12}{:.4} → {:.4}",
            "train loss",
            s.first_loss,
            s.last_loss
        );
        match (s.eval_before, s.best_eval) {
            (Some(before), Some((step, best))) => report!(
                text,
                "{:<12}{before:.4} → best {best:.4} at step {step}",
                "eval loss"
            ),
            (None, Some((step, best))) => {
                report!(text, "{:<12}best {best:.4} at step {step}", "eval loss")
            }
            (Some(before), None) => report!(text, "{:<12}{before:.4}", "eval loss"),
            (None, None) => {}
        }
        for (i, f) in [ADAPTER_FILE, CURVE_FILE, SUMMARY_FILE, CHECKPOINT_FILE]
            .iter()
            .enumerate()
        {
            let label = if i == 0 { "wrote" } else { "" };
            report!(text, "{label:<12}{}", out.join(f).display());
        }
        emit(&text)
    }
}

/// This command line, with --resume added: what continues the run.
fn resume_command() -> String {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--resume") {
        args.push("--resume".into());
    }
    let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    format!("edgetune {}", quoted.join(" "))
}

fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
