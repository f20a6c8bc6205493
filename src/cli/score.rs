//! `edgetune score`.

use super::{AdapterArgs, RunArgs, emit, keep_going, model_path, print_json, progress_bar, report};
use clap::Args;
use edgetune::Error;
use edgetune::backend::cpu::MatvecMode;
use edgetune::infer::perplexity;
use edgetune::model::Model;
use edgetune::tokenizer::Tokenizer;
use std::path::PathBuf;

/// Arguments of `score`.
#[derive(Args)]
pub struct ScoreArgs {
    /// [MODEL] FILE: the GGUF model (default: models/SmolLM2-135M-Instruct.Q4_1.gguf,
    /// or $EDGETUNE_MODEL) and the UTF-8 text file to score.
    #[arg(value_name = "PATH", num_args = 1..=2, required = true)]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    adapters: AdapterArgs,
    /// Window length in text tokens; windows are scored independently.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Print `{"tokens":…,"nll":…,"perplexity":…}`.
    #[arg(long)]
    json: bool,
}

pub fn run(a: ScoreArgs) -> Result<(), Error> {
    // With one path it is the FILE, and the model is the default.
    let (model, file) = match a.paths.as_slice() {
        [file] => (model_path(None)?, file.clone()),
        [model, file] => (model.clone(), file.clone()),
        _ => unreachable!("clap takes one or two paths"),
    };
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let model = Model::open(model)?;
    let tokenizer = Tokenizer::from_gguf(model.file())?;
    let decoder = a
        .run
        .decoder_with_adapters(&model, MatvecMode::Exact, &a.adapters.adapters)?;
    let pb = progress_bar(0, "scoring");
    let s = perplexity(
        decoder.as_ref(),
        &tokenizer,
        &text,
        a.context,
        &mut |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
            keep_going()
        },
    );
    pb.finish_and_clear();
    let s = s?;
    if a.json {
        return print_json(&serde_json::json!({
            "tokens": s.text_tokens,
            "predicted_tokens": s.predicted_tokens,
            "nll": s.nll,
            "perplexity": s.perplexity,
        }));
    }
    let mut out = String::new();
    report!(
        out,
        "tokens      {} ({} predicted in {} windows of ≤{})",
        s.text_tokens,
        s.predicted_tokens,
        s.windows,
        a.context
    );
    report!(out, "nll         {:.6}", s.nll);
    report!(out, "perplexity  {:.4}", s.perplexity);
    emit(&out)
}
