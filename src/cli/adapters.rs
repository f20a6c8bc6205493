//! `edgetune export`, `edgetune import` and `edgetune adapters ls|info`.

use super::{AdapterSpec, emit, keep_going, model_path, print_json, progress_bar, report};
use clap::{Args, Subcommand, ValueEnum};
use edgetune::Error;
use edgetune::export::gguf_lora::{self, LoraFile};
use edgetune::export::merge::{MergeType, logit_error_weights, merge_weights};
use edgetune::export::{AdapterFormat, find_adapters, load_adapter, method_file, peft};
use edgetune::model::Model;
use edgetune::tokenizer::Tokenizer;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Output formats of `export`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One GGUF file, as llama.cpp's `--lora` loads it.
    Gguf,
    /// A Hugging Face PEFT directory (adapter_config.json, adapter_model.safetensors).
    Peft,
}

/// Arguments of `export`.
#[derive(Args)]
pub struct ExportArgs {
    /// The adapter: a GGUF file or a PEFT directory.
    adapter: PathBuf,
    /// Output format.
    #[arg(long, value_enum)]
    format: Format,
    /// Output file (gguf) or directory (peft).
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    #[command(flatten)]
    opts: WriteOpts,
}

/// Options `export` and `import` share.
#[derive(Args)]
pub struct WriteOpts {
    /// The base model the adapter belongs to (names and row order depend on
    /// it) [default: models/SmolLM2-135M-Instruct.Q4_1.gguf, or $EDGETUNE_MODEL].
    #[arg(long, value_name = "FILE")]
    model: Option<PathBuf>,
    /// Store GGUF tensors in f16 (half the size; values rounded to 11 bits).
    #[arg(long)]
    f16: bool,
    /// Replace existing output files.
    #[arg(long)]
    force: bool,
    /// Print a JSON summary.
    #[arg(long)]
    json: bool,
}

/// Arguments of `import`.
#[derive(Args)]
pub struct ImportArgs {
    /// A Hugging Face PEFT LoRA directory.
    dir: PathBuf,
    /// The GGUF adapter to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[command(flatten)]
    opts: WriteOpts,
}

/// Tensor types `merge` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MergeTypeArg {
    /// f16: keeps the update, at 16 bits per weight.
    F16,
    /// 8-bit blocks of 32: half the size of f16, with more rounding error.
    #[value(name = "q8_0")]
    Q8_0,
    /// The base tensor's own type: the smallest file, but re-quantizing
    /// rounds part of the update away.
    Same,
}

/// Arguments of `merge`.
#[derive(Args)]
pub struct MergeArgs {
    /// The base GGUF model.
    model: PathBuf,
    /// Adapters to fold in (GGUF files or PEFT directories), each `PATH` or
    /// `PATH:STRENGTH`.
    #[arg(required = true, value_name = "ADAPTER[:STRENGTH]")]
    adapters: Vec<AdapterSpec>,
    /// The merged model to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Type of the merged tensors (the others are copied unchanged).
    #[arg(long = "type", value_enum, default_value = "f16")]
    ty: MergeTypeArg,
    /// Replace an existing output file.
    #[arg(long)]
    force: bool,
    /// Print a JSON summary.
    #[arg(long)]
    json: bool,
}

/// Prompts on which `merge` compares the merged model with base + adapter.
const PROBES: [&str; 3] = [
    "The capital of France is",
    "Here is a short note about my week: on Monday I",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
];

pub fn merge_cmd(a: MergeArgs) -> Result<(), Error> {
    check_free(std::slice::from_ref(&a.out), a.force)?;
    if a.out.canonicalize().ok() == a.model.canonicalize().ok() {
        return Err(Error::Invalid(
            "--out is the base model itself; write the merge elsewhere".into(),
        ));
    }
    let model = Model::open(&a.model)?;
    let mut adapters = Vec::new();
    for s in &a.adapters {
        let w = edgetune::export::load_adapter_weights(&s.path, &model, s.strength)?;
        let name = format!("{}:{}", edgetune::export::adapter_name(&s.path), s.strength);
        adapters.push((name, std::sync::Arc::new(w)));
    }
    let refs: Vec<(String, &edgetune::peft::AdapterWeights)> =
        adapters.iter().map(|(n, w)| (n.clone(), &**w)).collect();
    let ty = match a.ty {
        MergeTypeArg::F16 => MergeType::F16,
        MergeTypeArg::Q8_0 => MergeType::Q8_0,
        MergeTypeArg::Same => MergeType::Same,
    };
    let pb = progress_bar(0, "merging");
    let r = merge_weights(&model, &refs, ty, &a.out, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        keep_going()
    });
    pb.finish_and_clear();
    let r = r?;
    let merged = Model::open(&a.out)?;
    let tok = Tokenizer::from_gguf(model.file())?;
    let prompts = PROBES
        .iter()
        .map(|p| tok.encode(p, false))
        .collect::<Result<Vec<_>, _>>()?;
    let weights: Vec<_> = adapters.iter().map(|(_, w)| w.clone()).collect();
    let (worst, mean) = logit_error_weights(&model, &weights, &merged, &prompts)?;
    let size = std::fs::metadata(&a.out)
        .map_err(|e| Error::io(&a.out, e))?
        .len();
    if a.json {
        return print_json(&json!({
            "out": a.out,
            "bytes": size,
            "merged_tensors": r.merged.len(),
            "copied_tensors": r.copied,
            "types": r.merged.iter().map(|(_, t)| t.name()).collect::<BTreeSet<_>>(),
            "max_abs_logit_error": worst,
            "mean_abs_logit_error": mean,
        }));
    }
    let mut out = String::new();
    let types: BTreeSet<&str> = r.merged.iter().map(|(_, t)| t.name()).collect();
    report!(
        out,
        "wrote {} ({:.1} MB)",
        a.out.display(),
        size as f64 / 1e6
    );
    report!(
        out,
        "{} tensors merged ({}), {} copied unchanged",
        r.merged.len(),
        types.into_iter().collect::<Vec<_>>().join(", "),
        r.copied
    );
    report!(
        out,
        "logits vs base + adapter on {} prompts: max |Δ| {worst:.4}, mean |Δ| {mean:.5}",
        prompts.len()
    );
    if ty == MergeType::Same {
        eprintln!(
            "warning: the merged tensors were re-quantized to the base's own types, which rounds part of \
             the adapter's update away (max logit error {worst:.3}); --type f16 or q8_0 keeps it"
        );
    }
    emit(&out)
}

/// `adapters` subcommands.
#[derive(Subcommand)]
pub enum AdaptersCommand {
    /// The adapters in a directory (GGUF files and PEFT directories).
    Ls {
        /// Directory to list [default: .].
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One adapter's format, architecture, rank, scale, targets and size.
    Info {
        /// A GGUF adapter file or a PEFT directory.
        adapter: PathBuf,
        /// The base model, needed to read a PEFT directory [default: the default model].
        #[arg(long, value_name = "FILE")]
        model: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Refuse to replace what is at `paths` unless `force`.
fn check_free(paths: &[PathBuf], force: bool) -> Result<(), Error> {
    if force {
        return Ok(());
    }
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(Error::Invalid(format!(
            "{} exists; pass --force to replace it",
            p.display()
        ))),
        None => Ok(()),
    }
}

/// Read `adapter` against the model of `o`, write it to `out` in `format`
/// and print what was written.
fn convert(adapter: &Path, format: Format, out: &Path, o: &WriteOpts) -> Result<(), Error> {
    let model = Model::open(model_path(o.model.as_deref())?)?;
    use edgetune::export::peft_export;
    if format == Format::Peft && !adapter.is_dir() && method_file::is_method_file(adapter) {
        let f = method_file::read(adapter)?;
        let vera = f.method.spec.kinds == [edgetune::peft::MethodKind::Vera];
        if peft_export::exports(&f.method.spec.kinds) {
            let files = [out.join(peft::CONFIG_FILE), out.join(peft::WEIGHTS_FILE)];
            check_free(&files, o.force)?;
            method_file::method_for(&f, &model, adapter)?;
            match peft_export::write(out, &f, &model) {
                Ok(()) => {
                    if o.json {
                        return print_json(
                            &json!({"written": files, "method": f.method.spec.label()}),
                        );
                    }
                    let mut text = String::new();
                    for w in &files {
                        report!(text, "wrote {}", w.display());
                    }
                    report!(text, "a {} adapter in PEFT's format", f.method.spec.label());
                    return emit(&text);
                }
                // VeRA on llama's q/k has no PEFT VeRA form: the LoRA it
                // amounts to, below.
                Err(e) if vera => eprintln!("note: {e}; writing the LoRA it amounts to instead"),
                Err(e) => return Err(e),
            }
        }
    }
    let lora = load_adapter(adapter, &model)?;
    let written = write(&lora, &model, format, out, o.f16, o.force)?;
    done(&lora, &written, o.json)
}

fn write(
    lora: &LoraFile,
    model: &Model,
    format: Format,
    out: &Path,
    f16: bool,
    force: bool,
) -> Result<Vec<PathBuf>, Error> {
    match format {
        Format::Gguf => {
            if out.is_dir() {
                return Err(Error::Invalid(format!(
                    "{} is a directory; --out names the GGUF file to write",
                    out.display()
                )));
            }
            check_free(&[out.to_path_buf()], force)?;
            gguf_lora::write(out, lora, f16)?;
            Ok(vec![out.to_path_buf()])
        }
        Format::Peft => {
            let files = [out.join(peft::CONFIG_FILE), out.join(peft::WEIGHTS_FILE)];
            check_free(&files, force)?;
            if f16 {
                return Err(Error::Invalid(
                    "--f16 applies to GGUF output; PEFT directories are written in f32".into(),
                ));
            }
            peft::write(out, lora, &peft::HfLayout::of(model)?)?;
            Ok(files.to_vec())
        }
    }
}

fn done(lora: &LoraFile, written: &[PathBuf], json: bool) -> Result<(), Error> {
    if json {
        return print_json(&json!({
            "written": written,
            "rank": lora.rank,
            "alpha": lora.alpha,
            "scale": lora.scale(),
            "pairs": lora.pairs.len(),
        }));
    }
    let mut out = String::new();
    for w in written {
        report!(out, "wrote {}", w.display());
    }
    report!(
        out,
        "{} LoRA pairs, rank {}, scale {}",
        lora.pairs.len(),
        lora.rank,
        lora.scale()
    );
    emit(&out)
}

pub fn export(a: ExportArgs) -> Result<(), Error> {
    convert(&a.adapter, a.format, &a.out, &a.opts)
}

pub fn import(a: ImportArgs) -> Result<(), Error> {
    if AdapterFormat::detect(&a.dir) != AdapterFormat::Peft {
        return Err(Error::Invalid(format!(
            "{}: not a PEFT directory (no {})",
            a.dir.display(),
            peft::CONFIG_FILE
        )));
    }
    convert(&a.dir, Format::Gguf, &a.out, &a.opts)
}

/// What `adapters` prints about one adapter.
fn describe(path: &Path, format: AdapterFormat, lora: &LoraFile) -> serde_json::Value {
    let mut layers = BTreeSet::new();
    let mut targets = BTreeSet::new();
    for p in &lora.pairs {
        let parts: Vec<&str> = p.base.split('.').collect();
        if let [_, layer, proj, ..] = parts.as_slice() {
            if let Ok(l) = layer.parse::<usize>() {
                layers.insert(l);
            }
            targets.insert(proj.to_string());
        }
    }
    let params: usize = lora.pairs.iter().map(|p| p.a.len() + p.b.len()).sum();
    json!({
        "path": path,
        "format": match format { AdapterFormat::Gguf => "gguf", AdapterFormat::Peft => "peft" },
        "arch": lora.arch,
        "rank": lora.rank,
        "alpha": lora.alpha,
        "scale": lora.scale(),
        "pairs": lora.pairs.len(),
        "parameters": params,
        "targets": targets,
        "layers": layers,
    })
}

/// A method file ([`method_file`]) in the shape of [`describe`]'s.
fn describe_method(
    path: &Path,
    f: &edgetune::export::method_file::MethodFile,
) -> serde_json::Value {
    let params: usize = f.tensors.iter().map(|(_, v)| v.len()).sum();
    let layers: BTreeSet<usize> = f
        .tensors
        .iter()
        .filter_map(|(n, _)| n.strip_prefix("blk.")?.split('.').next()?.parse().ok())
        .collect();
    let low_rank = f.method.spec.kinds.iter().any(|k| k.is_reparameterized());
    json!({
        "path": path,
        "format": "gguf",
        "method": f.method.spec.label(),
        "arch": f.arch,
        "rank": if low_rank { json!(f.method.lora.rank) } else { serde_json::Value::Null },
        "tensors": f.tensors.len(),
        "parameters": params,
        "layers": layers,
    })
}

fn print_description(d: &serde_json::Value) -> Result<(), Error> {
    let mut out = String::new();
    report!(
        out,
        "adapter     {}",
        d["path"].as_str().unwrap_or_default()
    );
    report!(
        out,
        "format      {}",
        d["format"].as_str().unwrap_or_default()
    );
    report!(
        out,
        "arch        {}",
        d["arch"].as_str().unwrap_or_default()
    );
    report!(
        out,
        "rank        {} (alpha {}, scale {})",
        d["rank"],
        d["alpha"],
        d["scale"]
    );
    report!(
        out,
        "pairs       {} ({} parameters)",
        d["pairs"],
        d["parameters"]
    );
    let list = |v: &serde_json::Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.to_string().trim_matches('"').to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    report!(out, "targets     {}", list(&d["targets"]));
    report!(out, "layers      {}", list(&d["layers"]));
    emit(&out)
}

pub fn run(c: AdaptersCommand) -> Result<(), Error> {
    match c {
        AdaptersCommand::Info {
            adapter,
            model,
            json,
        } => {
            let format = AdapterFormat::detect(&adapter);
            if format == AdapterFormat::Gguf && method_file::is_method_file(&adapter) {
                let f = method_file::read(&adapter)?;
                let d = describe_method(&adapter, &f);
                if json {
                    return print_json(&d);
                }
                let mut out = String::new();
                report!(out, "adapter     {}", adapter.display());
                report!(
                    out,
                    "method      {} (an edgetune method file)",
                    f.method.spec.label()
                );
                report!(out, "arch        {}", f.arch);
                report!(out, "tensors     {}", f.tensors.len());
                report!(out, "parameters  {}", d["parameters"]);
                return emit(&out);
            }
            let lora = match format {
                AdapterFormat::Gguf => gguf_lora::read(&adapter)?,
                AdapterFormat::Peft => {
                    let model = Model::open(model_path(model.as_deref())?)?;
                    load_adapter(&adapter, &model)?
                }
            };
            let d = describe(&adapter, format, &lora);
            if json {
                print_json(&d)
            } else {
                print_description(&d)
            }
        }
        AdaptersCommand::Ls { dir, json } => {
            let mut out = String::new();
            let mut found = 0;
            for (path, format) in find_adapters(&dir)? {
                found += 1;
                if format == AdapterFormat::Peft {
                    // Described from its config alone: reading the weights
                    // needs the base model's layout.
                    let cfg_path = path.join(peft::CONFIG_FILE);
                    let cfg =
                        std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
                    let v: serde_json::Value = serde_json::from_str(&cfg)
                        .map_err(|e| Error::Invalid(format!("{}: {e}", cfg_path.display())))?;
                    if json {
                        report!(
                            out,
                            "{}",
                            json!({
                                "path": path,
                                "format": "peft",
                                "peft_type": v["peft_type"],
                                "rank": v["r"],
                                "alpha": v["lora_alpha"],
                            })
                        );
                    } else {
                        report!(
                            out,
                            "{:<40} peft  {} r={} alpha={}",
                            path.display(),
                            v["peft_type"].as_str().unwrap_or("?"),
                            v["r"],
                            v["lora_alpha"]
                        );
                    }
                    continue;
                }
                if method_file::is_method_file(&path) {
                    let f = method_file::read(&path)?;
                    if json {
                        report!(out, "{}", describe_method(&path, &f));
                    } else {
                        report!(
                            out,
                            "{:<40} gguf  {} {} tensors={}",
                            path.display(),
                            f.arch,
                            f.method.spec.label(),
                            f.tensors.len()
                        );
                    }
                    continue;
                }
                let lora = gguf_lora::read(&path)?;
                if json {
                    report!(out, "{}", describe(&path, format, &lora));
                } else {
                    report!(
                        out,
                        "{:<40} gguf  {} r={} scale={} pairs={}",
                        path.display(),
                        lora.arch,
                        lora.rank,
                        lora.scale(),
                        lora.pairs.len()
                    );
                }
            }
            if found == 0 && !json {
                report!(out, "no adapters in {}", dir.display());
            }
            emit(&out)
        }
    }
}
