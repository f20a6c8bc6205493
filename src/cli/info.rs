//! `edgetune info`.

use super::{ModelArgs, emit, print_json, report};
use clap::Args;
use edgetune::Error;
use edgetune::gguf::GgufFile;
use edgetune::model::ModelSummary;

/// Arguments of `info`.
#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: InfoArgs) -> Result<(), Error> {
    let file = GgufFile::open(a.model.path()?)?;
    let s = ModelSummary::of(&file);
    if a.json {
        return print_json(&s);
    }
    let mut out = String::new();
    report!(
        out,
        "file          {} ({:.1} MB, GGUF v{})",
        s.path,
        s.file_bytes as f64 / 1e6,
        s.gguf_version
    );
    report!(out, "name          {}", s.name.as_deref().unwrap_or("-"));
    report!(
        out,
        "architecture  {}",
        s.architecture.as_deref().unwrap_or("-")
    );
    match &s.unsupported_reason {
        None => report!(out, "supported     yes"),
        Some(r) => report!(out, "supported     no: {r}"),
    }
    report!(
        out,
        "parameters    {:.1} M in {} tensors",
        s.parameters as f64 / 1e6,
        s.tensors
    );
    for (ty, n) in &s.tensor_types {
        report!(
            out,
            "  {ty:<6} {n:>5} tensors  {:>8.1} MB",
            s.tensor_bytes[ty] as f64 / 1e6
        );
    }
    report!(out, "hyper-parameters");
    for (k, v) in &s.hyperparameters {
        report!(out, "  {k:<40} {v}");
    }
    report!(
        out,
        "tokenizer     {} (pre: {}), {} tokens",
        s.tokenizer.as_deref().unwrap_or("-"),
        s.tokenizer_pre.as_deref().unwrap_or("-"),
        s.vocab_size.map_or("-".into(), |n| n.to_string())
    );
    report!(
        out,
        "chat template {}",
        if s.chat_template { "yes" } else { "no" }
    );
    emit(&out)
}
