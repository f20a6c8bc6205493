//! Argument parsing, shared options, and error reporting with exit codes.

mod adapters;
mod bench;
mod bench_adapters;
mod bench_methods;
mod bench_train;
mod config;
mod generate;
mod info;
mod plan;
mod score;
mod serve;
mod train;

use clap::{Args, Parser, Subcommand, ValueEnum};
use edgetune::Error;
use edgetune::backend::Decoder;
use edgetune::backend::cpu::{CpuDecoder, CpuOptions, MatvecMode};
use edgetune::backend::gpu::{GpuContext, GpuDecoder, GpuOptions};
use edgetune::model::Model;
use edgetune::peft::AdapterWeights;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The model `models/fetch` downloads and every command uses by default.
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Exit code for errors in input, model or runtime.
const EXIT_FAILURE: u8 = 1;
/// Exit code when the user cancelled (Ctrl-C is the shell's 130).
const EXIT_CANCELLED: u8 = 130;

/// Fine-tune and run quantized language models on this machine.
#[derive(Parser)]
#[command(name = "edgetune", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a GGUF model's architecture, hyper-parameters, tensors and tokenizer.
    Info(info::InfoArgs),
    /// Generate text from a prompt, streaming tokens as they come.
    Generate(generate::GenerateArgs),
    /// Perplexity of a text file.
    Score(score::ScoreArgs),
    /// Prompt and generation throughput.
    Bench(bench::BenchArgs),
    /// Write an adapter in another format: GGUF (llama.cpp) or a Hugging Face PEFT directory.
    Export(adapters::ExportArgs),
    /// Read a Hugging Face PEFT LoRA directory into a GGUF adapter.
    Import(adapters::ImportArgs),
    /// Fold adapters into the base model and write the whole model as one GGUF.
    Merge(adapters::MergeArgs),
    /// List and describe adapters.
    #[command(subcommand)]
    Adapters(adapters::AdaptersCommand),
    /// Serve the model and many adapters at once over an OpenAI-compatible
    /// HTTP API on localhost (requests with different adapters share passes).
    Serve(serve::ServeArgs),
    /// Fine-tune a LoRA adapter on a data file or folder of notes.
    Train(train::TrainArgs),
    /// The memory a training run would need, before running it.
    Plan(plan::PlanArgs),
    /// Internal: exit 0 when a hardware GPU adapter opens, else 3 (run in a
    /// child process so the drivers it loads stay out of the trainer's memory).
    #[command(name = "__probe-gpu", hide = true)]
    ProbeGpu,
}

/// Exit code of `__probe-gpu` when no hardware adapter opens.
const EXIT_NO_GPU: u8 = 3;

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// A hardware GPU when one is present, else the CPU.
    Auto,
    /// The CPU backend.
    Cpu,
    /// The GPU backend on the best adapter, a software one included.
    Gpu,
}

/// Where and how a model runs.
#[derive(Args, Clone)]
pub struct RunArgs {
    /// Device to run on.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: Device,
    /// GPU adapter: part of its name or its index in `info --devices`
    /// [default: $EDGETUNE_ADAPTER, else the best]. Implies the GPU.
    #[arg(long, value_name = "NAME")]
    pub gpu_adapter: Option<String>,
    /// Keep the GPU's KV cache in f16: half its memory, on GPUs with
    /// shader-f16 (keys and values rounded to 11 significant bits).
    #[arg(long)]
    pub kv_f16: bool,
    /// CPU worker threads (default: one per core).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub threads: usize,
}

impl RunArgs {
    /// The decoder for `model` on the chosen device.
    pub fn decoder<'m>(
        &self,
        model: &'m Model,
        matvec: MatvecMode,
    ) -> Result<Box<dyn Decoder + 'm>, Error> {
        let cpu = || -> Result<Box<dyn Decoder + 'm>, Error> {
            Ok(Box::new(CpuDecoder::with_options(
                model,
                CpuOptions {
                    threads: self.threads,
                    matvec,
                },
            )?))
        };
        let named = self.gpu_adapter.is_some();
        match self.device {
            Device::Cpu if named || self.kv_f16 => Err(Error::Invalid(format!(
                "{} applies to the GPU, but --device cpu was given",
                if named { "--gpu-adapter" } else { "--kv-f16" }
            ))),
            Device::Cpu => cpu(),
            Device::Gpu => Ok(Box::new(self.gpu_decoder(model, true)?)),
            // A named adapter is used even if it is a software one; unnamed,
            // `auto` takes only hardware and otherwise runs on the CPU.
            Device::Auto if named => Ok(Box::new(self.gpu_decoder(model, true)?)),
            Device::Auto => match self.gpu_decoder(model, false) {
                Ok(d) => Ok(Box::new(d)),
                Err(Error::Cancelled) => Err(Error::Cancelled),
                Err(_) => cpu(),
            },
        }
    }

    /// The decoder for `model` with `adapters` stacked on it. LoRA adapters
    /// run on the CPU backend only: `auto` picks the CPU when any is given.
    pub fn decoder_with_adapters<'m>(
        &self,
        model: &'m Model,
        matvec: MatvecMode,
        adapters: &[AdapterSpec],
    ) -> Result<Box<dyn Decoder + 'm>, Error> {
        if adapters.is_empty() {
            return self.decoder(model, matvec);
        }
        let gpu_option = if self.gpu_adapter.is_some() {
            Some("--gpu-adapter")
        } else if self.kv_f16 {
            Some("--kv-f16")
        } else {
            None
        };
        match (self.device, gpu_option) {
            (Device::Gpu, _) => {
                return Err(Error::Invalid(
                    "LoRA adapters run on the CPU backend for now; use --device cpu".into(),
                ));
            }
            (_, Some(opt)) => {
                return Err(Error::Invalid(format!(
                    "{opt} applies to the GPU, but LoRA adapters run on the CPU backend for now"
                )));
            }
            _ => {}
        }
        // Read and check every file before the decoder is built.
        let weights = adapters
            .iter()
            .map(|a| a.load(model))
            .collect::<Result<Vec<_>, Error>>()?;
        let mut cpu = CpuDecoder::with_options(
            model,
            CpuOptions {
                threads: self.threads,
                matvec,
            },
        )?;
        for w in weights {
            cpu.add_adapter(Arc::new(w));
        }
        Ok(Box::new(cpu))
    }

    /// The GPU context this run asks for.
    pub fn gpu_context(&self, allow_software: bool) -> Result<Arc<GpuContext>, Error> {
        quiet_wayland_probe(|| {
            GpuContext::new(&GpuOptions {
                adapter: self.gpu_adapter.clone(),
                allow_software,
                kv_f16: self.kv_f16,
                ..Default::default()
            })
        })
    }

    fn gpu_decoder<'m>(
        &self,
        model: &'m Model,
        allow_software: bool,
    ) -> Result<GpuDecoder<'m>, Error> {
        let ctx = self.gpu_context(allow_software)?;
        let pb = progress_bar(model.spec().layers.len(), "uploading to the GPU");
        let d = GpuDecoder::with_progress(model, ctx, &mut |done, _| {
            pb.set_position(done as u64);
            keep_going()
        });
        pb.finish_and_clear();
        d
    }
}

/// A LoRA adapter file and the strength it is applied with:
/// `FILE` (strength 1) or `FILE:STRENGTH`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterSpec {
    /// The GGUF LoRA file.
    pub path: PathBuf,
    /// Multiplier on the adapter's own scale (1: as trained).
    pub strength: f32,
}

impl FromStr for AdapterSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<AdapterSpec, String> {
        // Only a suffix that reads as a number is a strength, so paths with
        // colons in them still work.
        if let Some((path, strength)) = s.rsplit_once(':')
            && let Ok(v) = strength.trim().parse::<f32>()
        {
            if !v.is_finite() {
                return Err(format!("strength '{strength}' is not a finite number"));
            }
            if path.is_empty() {
                return Err("expected FILE or FILE:STRENGTH".into());
            }
            return Ok(AdapterSpec {
                path: PathBuf::from(path),
                strength: v,
            });
        }
        if s.is_empty() {
            return Err("expected FILE or FILE:STRENGTH".into());
        }
        Ok(AdapterSpec {
            path: PathBuf::from(s),
            strength: 1.0,
        })
    }
}

impl AdapterSpec {
    /// Read the file and check it against `model`'s tensors; errors name the file.
    pub fn load(&self, model: &Model) -> Result<AdapterWeights, Error> {
        edgetune::export::load_adapter_weights(&self.path, model, self.strength)
            .map_err(|e| Error::Invalid(format!("--adapter: {e}")))
    }
}

/// The `--adapter` option of the commands that run a model.
#[derive(Args, Clone)]
pub struct AdapterArgs {
    /// A LoRA adapter to apply (a GGUF file, as `train` writes, or a Hugging
    /// Face PEFT directory), optionally with a strength: `--adapter A.gguf`
    /// or `--adapter A.gguf:0.7`. Repeat to stack adapters. Adapters run on
    /// the CPU backend.
    #[arg(long = "adapter", value_name = "FILE[:STRENGTH]")]
    pub adapters: Vec<AdapterSpec>,
}

/// Run `f` (which lists or opens GPU adapters) with stderr muted when no
/// desktop session exists (`XDG_RUNTIME_DIR` unset: servers, containers,
/// CI). Mesa's Vulkan drivers probe for a Wayland display while adapters are
/// listed, and libwayland then prints "error: XDG_RUNTIME_DIR is invalid or
/// not set" twice: harmless, but it reads like edgetune failing, on every
/// command that looks for a GPU. Errors of ours are values, not prints, so
/// nothing of edgetune's is lost.
/// The training device for `--device` (and `--gpu-adapter`): `auto` takes
/// a hardware GPU when there is one, else the CPU; `gpu` accepts a software
/// adapter too.
pub fn train_device(
    device: Device,
    gpu_adapter: Option<String>,
) -> Result<edgetune::train::TrainDevice, Error> {
    use edgetune::train::TrainDevice;
    let ctx = |allow_software: bool| {
        quiet_wayland_probe(|| {
            GpuContext::new(&GpuOptions {
                adapter: gpu_adapter.clone(),
                allow_software,
                ..Default::default()
            })
        })
    };
    match device {
        Device::Cpu if gpu_adapter.is_some() => Err(Error::Invalid(
            "--gpu-adapter applies to the GPU, but --device cpu was given".into(),
        )),
        Device::Cpu => Ok(TrainDevice::Cpu),
        Device::Gpu => Ok(TrainDevice::Gpu(ctx(true)?)),
        Device::Auto if gpu_adapter.is_some() => Ok(TrainDevice::Gpu(ctx(true)?)),
        // Probing loads every Vulkan driver, a software one too (lavapipe
        // maps ~50 MB of LLVM): ask a child process first, so that a run
        // that stays on the CPU keeps its memory plan.
        Device::Auto => match hardware_gpu_in_child() {
            Some(false) => Ok(TrainDevice::Cpu),
            _ => Ok(ctx(false).map_or(TrainDevice::Cpu, TrainDevice::Gpu)),
        },
    }
}

/// Whether a hardware GPU adapter opens, asked of `edgetune __probe-gpu` in a
/// child process; `None` when the child cannot run.
fn hardware_gpu_in_child() -> Option<bool> {
    let exe = std::env::current_exe().ok()?;
    let status = std::process::Command::new(exe)
        .arg("__probe-gpu")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?;
    match status.code() {
        Some(0) => Some(true),
        Some(c) if c == i32::from(EXIT_NO_GPU) => Some(false),
        _ => None,
    }
}

pub fn quiet_wayland_probe<T>(f: impl FnOnce() -> T) -> T {
    #[cfg(unix)]
    {
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            let _muted = MutedStderr::new();
            return f();
        }
    }
    f()
}

/// stderr pointed at /dev/null until dropped (a panic inside restores it too).
#[cfg(unix)]
struct MutedStderr {
    saved: Option<libc::c_int>,
}

#[cfg(unix)]
impl MutedStderr {
    fn new() -> Self {
        // SAFETY: plain descriptor calls on fd 2 and descriptors this function
        // opens; each result is checked, and on any failure stderr is left as is.
        unsafe {
            let saved = libc::dup(2);
            if saved < 0 {
                return MutedStderr { saved: None };
            }
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
            if null < 0 || libc::dup2(null, 2) < 0 {
                if null >= 0 {
                    libc::close(null);
                }
                libc::close(saved);
                return MutedStderr { saved: None };
            }
            libc::close(null);
            MutedStderr { saved: Some(saved) }
        }
    }
}

#[cfg(unix)]
impl Drop for MutedStderr {
    fn drop(&mut self) {
        if let Some(saved) = self.saved {
            // SAFETY: `saved` is the descriptor dup'ed from stderr in `new`.
            unsafe {
                libc::dup2(saved, 2);
                libc::close(saved);
            }
        }
    }
}

/// Options every model command takes.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// GGUF model file [default: models/SmolLM2-135M-Instruct.Q4_1.gguf, or $EDGETUNE_MODEL]
    #[arg(value_name = "MODEL")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub run: RunArgs,
}

impl ModelArgs {
    /// The model path (see [`model_path`]).
    pub fn path(&self) -> Result<PathBuf, Error> {
        model_path(self.model.as_deref())
    }

    /// The decoder for `model` on the chosen device.
    pub fn decoder<'m>(
        &self,
        model: &'m Model,
        matvec: MatvecMode,
    ) -> Result<Box<dyn Decoder + 'm>, Error> {
        self.run.decoder(model, matvec)
    }
}

/// The model path: `given`, `$EDGETUNE_MODEL`, or the default model in
/// `models/` (under the working directory or the source tree).
pub fn model_path(given: Option<&Path>) -> Result<PathBuf, Error> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("EDGETUNE_MODEL") {
        return Ok(PathBuf::from(p));
    }
    let candidates = [
        Path::new("models").join(DEFAULT_MODEL),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(DEFAULT_MODEL),
    ];
    candidates.iter().find(|p| p.exists()).cloned().ok_or_else(|| {
        Error::Invalid(format!(
            "no MODEL given and the default model is not at {}: run `models/fetch` first, or pass a GGUF file",
            candidates[0].display()
        ))
    })
}

/// Set by Ctrl-C; long-running commands poll it from their progress callbacks
/// and stop cleanly (the library returns `Error::Cancelled`).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether the user pressed Ctrl-C.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// `Break` once the user pressed Ctrl-C: the shape progress callbacks return.
pub fn keep_going() -> ControlFlow<()> {
    if interrupted() {
        ControlFlow::Break(())
    } else {
        ControlFlow::Continue(())
    }
}

/// Parse arguments, run the command, and turn errors into messages and exit codes.
pub fn main() -> ExitCode {
    let command = <Cli as clap::CommandFactory>::command();
    let lookup = |sub: &str, name: &str| {
        let c = command.find_subcommand(sub)?;
        let a = c.get_arguments().find(|a| match name.strip_prefix("--") {
            Some(long) => a.get_long() == Some(long),
            None => name.len() == 2 && a.get_short() == name.chars().nth(1),
        })?;
        Some((a.get_long()?.to_string(), a.get_action().takes_values()))
    };
    let args = match config::expand(std::env::args_os().collect(), &lookup) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    // A second Ctrl-C while stopping is not caught again: the default applies.
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::Relaxed) {
            std::process::exit(EXIT_CANCELLED.into());
        }
    });
    let result = match cli.command {
        Command::Info(a) => info::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Score(a) => score::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Train(a) => train::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Export(a) => adapters::export(a),
        Command::Import(a) => adapters::import(a),
        Command::Adapters(c) => adapters::run(c),
        Command::Serve(a) => serve::run(a),
        Command::Merge(a) => adapters::merge_cmd(a),
        Command::ProbeGpu => {
            let found = quiet_wayland_probe(|| {
                GpuContext::new(&GpuOptions {
                    allow_software: false,
                    ..Default::default()
                })
            });
            return if found.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_NO_GPU)
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Cancelled) => {
            eprintln!("cancelled");
            ExitCode::from(EXIT_CANCELLED)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(total: usize, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Print `value` as one line of JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) -> Result<(), Error> {
    let s =
        serde_json::to_string(value).map_err(|e| Error::Invalid(format!("JSON output: {e}")))?;
    emit(&format!("{s}\n"))
}

/// Write `text` to stdout. A closed pipe (`edgetune info | head -3`) is not
/// an error; other write failures are.
pub fn emit(text: &str) -> Result<(), Error> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::io("<stdout>", e)),
        _ => Ok(()),
    }
}

/// `writeln!` into a `String` report (formatting into memory cannot fail).
macro_rules! report {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}
pub(crate) use report;
