//! `edgetune serve`: the OpenAI-compatible server with many adapters live.

use super::{AdapterSpec, interrupted, model_path, print_json};
use clap::Args;
use edgetune::Error;
use edgetune::backend::cpu::{CpuDecoder, CpuOptions, MatvecMode};
use edgetune::export::{adapter_name, find_adapters, load_adapter_weights};
use edgetune::infer::BatchOptions;
use edgetune::model::Model;
use edgetune::peft::AdapterWeights;
use edgetune::serve::{Limits, Models, ServeOptions, serve};
use edgetune::tokenizer::{ChatTemplate, Tokenizer};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// GGUF model file [default: models/SmolLM2-135M-Instruct.Q4_1.gguf, or $EDGETUNE_MODEL]
    #[arg(value_name = "MODEL")]
    model: Option<PathBuf>,
    /// Serve every adapter in DIR (GGUF LoRA files and PEFT folders), each
    /// under its file or folder name.
    #[arg(long, value_name = "DIR")]
    adapters: Option<PathBuf>,
    /// Serve one more adapter, as NAME (default: its file name), at
    /// STRENGTH (default 1). Repeatable.
    #[arg(long, value_name = "[NAME=]PATH[:STRENGTH]")]
    adapter: Vec<String>,
    /// The name that selects the base model without adapters
    /// [default: the model file's name without .gguf].
    #[arg(long, value_name = "NAME")]
    base_name: Option<String>,
    /// Address to listen on (keep it local unless you mean otherwise).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Most requests decoded together; more wait their turn.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Most tokens a request gets (larger requests are clamped; a chat
    /// request that names none gets this many at most).
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// A Jinja chat template file, for models without one.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// Decode with the fastest products for each batch size instead of the
    /// batch-invariant ones: tokens may then depend on the other requests.
    #[arg(long)]
    gemm: bool,
    /// CPU worker threads (default: one per core).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    threads: usize,
    /// Print the listening address and models as one JSON line.
    #[arg(long)]
    json: bool,
}

/// `[NAME=]PATH[:STRENGTH]`.
fn parse_named(s: &str) -> Result<(Option<String>, AdapterSpec), Error> {
    let (name, rest) = match s.split_once('=') {
        Some((n, r)) if !n.is_empty() && !n.contains(['/', '\\']) => (Some(n.to_owned()), r),
        _ => (None, s),
    };
    let spec = rest
        .parse::<AdapterSpec>()
        .map_err(|e| Error::Invalid(format!("--adapter {s}: {e}")))?;
    Ok((name, spec))
}

pub fn run(a: ServeArgs) -> Result<(), Error> {
    let path = model_path(a.model.as_deref())?;
    let model = Model::open(&path)?;
    let tokenizer = Tokenizer::from_gguf(model.file())?;
    let template =
        match ChatTemplate::for_model(model.file(), &tokenizer, a.chat_template.as_deref()) {
            Ok(t) => Some(t),
            Err(e) if a.chat_template.is_some() => return Err(e),
            Err(e) => {
                eprintln!("note: /v1/chat/completions is off: {e}");
                None
            }
        };
    let mut adapters: Vec<(String, Arc<AdapterWeights>)> = Vec::new();
    if let Some(dir) = &a.adapters {
        for (p, _) in find_adapters(dir)? {
            match load_adapter_weights(&p, &model, 1.0) {
                Ok(w) if !w.is_additive() => eprintln!(
                    "skipping {}: it rescales activations, which batched requests cannot share \
                     (merge it into the model to serve it)",
                    p.display()
                ),
                Ok(w) => adapters.push((adapter_name(&p), Arc::new(w))),
                // Folders of adapters often hold some for other models.
                Err(e) => eprintln!("skipping {}: {e}", p.display()),
            }
        }
    }
    for s in &a.adapter {
        let (name, spec) = parse_named(s)?;
        let w = load_adapter_weights(&spec.path, &model, spec.strength)?;
        if !w.is_additive() {
            return Err(Error::Invalid(format!(
                "--adapter {}: it rescales activations (DoRA, (IA)³ or norm tuning), which \
                 batched requests cannot share; merge it into the model (`edgetune merge`) to \
                 serve it",
                spec.path.display()
            )));
        }
        let name = name.unwrap_or_else(|| adapter_name(&spec.path));
        adapters.push((name, Arc::new(w)));
    }
    let decoder = CpuDecoder::with_options(
        &model,
        CpuOptions {
            threads: a.threads,
            matvec: MatvecMode::Exact,
        },
    )?;
    let models = Models {
        decoder: &decoder,
        tokenizer: &tokenizer,
        template: template.as_ref(),
        base_name: a.base_name.clone().unwrap_or_else(|| adapter_name(&path)),
        adapters,
    };
    let names = models.names()?;
    let listener = TcpListener::bind((a.host.as_str(), a.port))
        .map_err(|e| Error::io(format!("<{}:{}>", a.host, a.port), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("<listener>", e))?;
    let url = format!("http://{addr}/v1");
    if a.json {
        print_json(&serde_json::json!({"listening": url, "models": names}))?;
    } else {
        println!("listening on {url}");
        println!("models: {}", names.join(", "));
        println!("press Ctrl-C to stop");
    }
    let opts = ServeOptions {
        batch: BatchOptions {
            max_batch: a.max_batch.max(1),
            invariant: !a.gemm,
        },
        limits: Limits {
            completion_max_tokens: 16.min(a.max_tokens),
            max_tokens: a.max_tokens,
        },
        ..ServeOptions::default()
    };
    serve(models, listener, &opts, &interrupted, &|line| {
        eprintln!("{line}")
    })
}
