//! `edgetune plan`, and the LoRA and step-shape options it shares with `train`.

use super::{emit, model_path, print_json, report};
use clap::{Args, ValueEnum};
use edgetune::Error;
use edgetune::graph::Target;
use edgetune::model::Model;
use edgetune::peft::MethodSpec;
use edgetune::peft::lora::{LayerSelection, LoraConfig};
use edgetune::train::budget::{PlannedStep, StepShape, fit, fmt_bytes, parse_bytes};
use edgetune::train::{MemoryReport, Optimizer, Recompute};
use std::path::PathBuf;

/// The adapter being trained: method and LoRA hyper-parameters.
#[derive(Args, Clone, Debug)]
pub struct LoraArgs {
    /// Fine-tuning method, or several comma-separated (a hybrid): lora,
    /// dora, vera, pissa, loha, lokr (each rewrites the adapted linears; one
    /// per run), ia3, norm, prompt, prefix (one of these two per run),
    /// adapter, parallel-adapter.
    #[arg(long, value_name = "METHOD[,METHOD…]", default_value = "lora")]
    pub method: String,
    /// (IA)³: projections to rescale (the FFN's down projection at its
    /// input, the others at their output).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "k,v,down", value_parser = parse_target)]
    pub ia3_targets: Vec<TargetArg>,
    /// VeRA: initial value of the scaling vector d.
    #[arg(long, value_name = "D", default_value_t = 0.1)]
    pub vera_d_init: f32,
    /// Bottleneck adapters (adapter, parallel-adapter): width.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub adapter_size: usize,
    /// Prompt and prefix tuning: virtual tokens before every sequence.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub virtual_tokens: usize,
    /// Prompt and prefix tuning: start the virtual tokens from this text's
    /// tokens (repeated to --virtual-tokens) instead of a vocabulary sample.
    #[arg(long, value_name = "TEXT")]
    pub prompt_init: Option<String>,
    /// Rank r of the low-rank methods (LoRA, DoRA, VeRA, PiSSA, LoHa, LoKr).
    #[arg(long, value_name = "R", default_value_t = 8)]
    pub rank: usize,
    /// LoRA scale numerator α (the update is scaled by α/r).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// Dropout on the adapter's input while training, in [0, 1).
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    pub dropout: f32,
    /// rsLoRA: scale by α/√r instead of α/r.
    #[arg(long)]
    pub rslora: bool,
    /// LoRA+: learning rate of the B matrices relative to A (1: plain LoRA).
    #[arg(long, value_name = "RATIO", default_value_t = 1.0)]
    pub lora_plus_ratio: f32,
    /// Projections to adapt, comma-separated: q,k,v,o,gate,up,down
    /// (or attn_q … ffn_down), or all.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "all",
        value_parser = parse_target
    )]
    pub targets: Vec<TargetArg>,
    /// Layers to adapt: all, or N for the last N.
    #[arg(long, value_name = "all|N", default_value = "all", value_parser = parse_layers)]
    pub layers: LayerSelection,
}

/// One `--targets` item: a projection, or all of them.
#[derive(Clone, Copy, Debug)]
pub enum TargetArg {
    /// Every projection.
    All,
    /// One projection.
    One(Target),
}

fn parse_target(s: &str) -> Result<TargetArg, String> {
    if s.trim().eq_ignore_ascii_case("all") {
        return Ok(TargetArg::All);
    }
    s.parse()
        .map(TargetArg::One)
        .map_err(|e: Error| e.to_string())
}

fn parse_layers(s: &str) -> Result<LayerSelection, String> {
    if s.trim().eq_ignore_ascii_case("all") {
        return Ok(LayerSelection::All);
    }
    match s.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(LayerSelection::Last(n)),
        _ => Err(format!(
            "'{s}': expected all, or a number of last layers (at least 1)"
        )),
    }
}

/// The projections of a `--targets`-style list, each once.
fn targets(list: &[TargetArg]) -> Vec<Target> {
    let mut targets = Vec::new();
    for t in list {
        let add: &[Target] = match t {
            TargetArg::All => &Target::ALL,
            TargetArg::One(t) => std::slice::from_ref(t),
        };
        for t in add {
            if !targets.contains(t) {
                targets.push(*t);
            }
        }
    }
    targets
}

impl LoraArgs {
    /// The methods these options name, with their own settings.
    pub fn method_spec(&self) -> Result<MethodSpec, Error> {
        let spec = MethodSpec {
            kinds: MethodSpec::parse_kinds(&self.method)?,
            vera_d_init: self.vera_d_init,
            ia3_targets: targets(&self.ia3_targets),
            virtual_tokens: self.virtual_tokens,
            adapter_size: self.adapter_size,
            prompt_init: self.prompt_init.clone(),
            ..MethodSpec::default()
        };
        spec.validate()?;
        Ok(spec)
    }

    /// The low-rank configuration these options describe.
    pub fn config(&self) -> Result<LoraConfig, Error> {
        let targets = targets(&self.targets);
        Ok(LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            targets,
            layers: self.layers,
            rslora: self.rslora,
            lr_ratio_b: self.lora_plus_ratio,
        })
    }
}

/// The optimizer options of `train` and `plan`.
#[derive(Args, Clone, Debug)]
pub struct OptimizerArgs {
    /// `adamw`: gradients from a backward pass. `mezo`: zeroth-order, two
    /// forward passes per step and no backward pass, so a step needs
    /// inference's memory; it learns more slowly (use a larger --lr, such
    /// as 1e-3, and more steps).
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: OptimizerArg,
    /// MeZO's perturbation size ε.
    #[arg(long, value_name = "EPS", default_value_t = 1e-3)]
    pub mezo_eps: f32,
}

/// The optimizers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    /// AdamW with decoupled weight decay.
    Adamw,
    /// MeZO (zeroth-order SPSA from two forward passes).
    Mezo,
}

impl OptimizerArgs {
    /// The library's optimizer.
    pub fn optimizer(&self) -> Optimizer {
        match self.optimizer {
            OptimizerArg::Adamw => Optimizer::AdamW,
            OptimizerArg::Mezo => Optimizer::Mezo { eps: self.mezo_eps },
        }
    }
}

/// How layers are recomputed in the backward pass to save memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RecomputeArg {
    /// Only as many layers as --memory-budget needs (none without a budget).
    Auto,
    /// Every layer: least memory, about a third more compute.
    All,
    /// None: fastest; a budget that needs recomputation is refused.
    Off,
}

impl From<RecomputeArg> for Recompute {
    fn from(r: RecomputeArg) -> Recompute {
        match r {
            RecomputeArg::Auto => Recompute::Auto,
            RecomputeArg::All => Recompute::All,
            RecomputeArg::Off => Recompute::Off,
        }
    }
}

/// The shape of a training step and the memory it may take.
#[derive(Args, Clone, Debug)]
pub struct StepArgs {
    /// Sequences per optimizer step (before --grad-accum); a memory budget
    /// may split them into smaller micro-batches.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, value_name = "TOKENS", default_value_t = 256)]
    pub seq: usize,
    /// Batches whose gradients are summed per optimizer step.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak memory allowed, like 512MB or 1.5GB: the plan lowers the
    /// micro-batch and recomputes layers to fit, or refuses naming the
    /// smallest budget that works [default: no limit].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory_budget: Option<u64>,
    /// Layer recomputation in the backward pass.
    #[arg(long, value_enum, default_value = "auto")]
    pub recompute: RecomputeArg,
    /// CPU worker threads (default: one per core).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub threads: usize,
    /// CPU: compute the frozen weights' products in 8-bit integer
    /// arithmetic: forward, Q4_0/Q4_1 weights against inputs rounded to 8
    /// bits per block of 32 as llama.cpp's inference does; backward, dY
    /// rounded likewise against Wᵀ rounded to 5 bits per block of 32
    /// (1.3–1.6× faster products; the loss head, the adapter's products
    /// and held-out losses stay f32).
    #[arg(long)]
    pub fast: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    parse_bytes(s).map_err(|e| e.to_string())
}

impl StepArgs {
    /// Worker threads, with 0 resolved to one per core (the memory plan
    /// sizes per-thread scratch, so it needs the real count).
    pub fn threads(&self) -> usize {
        edgetune::backend::cpu::resolve_threads(self.threads)
    }
}

/// Arguments of `plan`.
#[derive(Args)]
pub struct PlanArgs {
    /// GGUF model file [default: models/SmolLM2-135M-Instruct.Q4_1.gguf, or $EDGETUNE_MODEL]
    #[arg(value_name = "MODEL")]
    model: Option<PathBuf>,
    #[command(flatten)]
    lora: LoraArgs,
    #[command(flatten)]
    step: StepArgs,
    /// Read options from a TOML file: each key a long option (`lr = 1e-3`,
    /// `method = ["lora", "prompt"]`, `rslora = true`), plus `model` and
    /// `data` for the paths; the command line overrides the file.
    #[arg(long, value_name = "FILE")]
    #[allow(dead_code)] // read by cli::config before parsing
    config: Option<PathBuf>,
    #[command(flatten)]
    optim: OptimizerArgs,
    /// Print the plan as one JSON object (sizes in bytes).
    #[arg(long)]
    json: bool,
}

pub fn run(a: PlanArgs) -> Result<(), Error> {
    let model = Model::open(model_path(a.model.as_deref())?)?;
    let spec = model.spec();
    let method = edgetune::peft::build(&a.lora.method_spec()?, &a.lora.config()?, &model)?;
    let shape = StepShape {
        zeroth_order: a.optim.optimizer == OptimizerArg::Mezo,
        spec,
        method: &*method,
        seq: edgetune::train::graph_seq(spec, &*method, a.step.seq)?,
        threads: a.step.threads(),
        data_bytes: 0,
        keep_best: false,
        gpu: false,
        fast: a.step.fast,
    };
    if a.step.batch == 0 || a.step.grad_accum == 0 {
        return Err(Error::Invalid(
            "--batch and --grad-accum must be at least 1".into(),
        ));
    }
    if a.step.seq < 2 {
        return Err(Error::Invalid(format!(
            "--seq must be at least 2 tokens, got {}",
            a.step.seq
        )));
    }
    let PlannedStep { graph, report, .. } = fit(
        &shape,
        a.step.batch,
        a.step.grad_accum,
        a.step.memory_budget,
        a.step.recompute.into(),
    )?;
    let params: usize = graph.params.iter().map(|p| p.shape.numel()).sum();
    if a.json {
        let mut v = serde_json::to_value(report)
            .map_err(|e| Error::Invalid(format!("JSON output: {e}")))?;
        v["total"] = report.total().into();
        v["budget"] = a.step.memory_budget.into();
        v["params"] = params.into();
        v["threads"] = shape.threads.into();
        return print_json(&v);
    }
    let mut out = memory_table(&report, a.step.memory_budget);
    report!(out, "{:<16}{}", "trainable", count(params));
    report!(
        out,
        "(the tokenized data adds about 5 bytes per token when training)"
    );
    emit(&out)
}

/// The memory plan as aligned lines: one per component, the total, then
/// the step's shape.
pub fn memory_table(r: &MemoryReport, budget: Option<u64>) -> String {
    let mut out = String::new();
    let (adapter, activations) = if r.forward_only {
        (
            "parameters and MeZO's perturbed copy",
            "activations (forward passes only)",
        )
    } else {
        (
            "parameters, AdamW moments, gradient buffers",
            "activations and gradients",
        )
    };
    let rows = [
        ("weights", r.weights, "the mapped base model"),
        ("adapter", r.adapter, adapter),
        ("activations", r.activations, activations),
        (
            "workspace",
            r.workspace,
            "dequantized weights, logits, attention",
        ),
        ("runtime", r.runtime, "code, tokenizer, threads, data"),
    ];
    for (name, bytes, what) in rows {
        report!(out, "{name:<16}{:>10}  {what}", fmt_bytes(bytes));
    }
    let total = fmt_bytes(r.total());
    match budget {
        Some(b) => report!(
            out,
            "{:<16}{total:>10}  of a {} budget",
            "total",
            fmt_bytes(b)
        ),
        None => report!(out, "{:<16}{total:>10}", "total"),
    }
    report!(
        out,
        "{:<16}{} sequence{} per pass × {} accumulated",
        "micro-batch",
        r.micro_batch,
        if r.micro_batch == 1 { "" } else { "s" },
        r.grad_accum
    );
    report!(
        out,
        "{:<16}{} of {} layers",
        "recomputed",
        r.recomputed_layers,
        r.layers
    );
    out
}

/// `1234567` → `"1,234,567"`.
pub fn count(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
