//! `edgetune score`.

use super::{ModelArgs, print_json, progress_bar};
use clap::Args;
use edgetune::Error;
use edgetune::infer::perplexity;
use edgetune::model::Model;
use edgetune::tokenizer::Tokenizer;
use std::ops::ControlFlow;
use std::path::PathBuf;

/// Arguments of `score`.
#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text file to score.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Window length in text tokens; windows are scored independently.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Print `{"tokens":…,"nll":…,"perplexity":…}`.
    #[arg(long)]
    json: bool,
}

pub fn run(a: ScoreArgs) -> Result<(), Error> {
    // Both positional: with one path, it is the FILE and the model is the default.
    let (model_path, file) = match a.model.model.clone() {
        Some(m) => (m, a.file.clone()),
        None => (a.model.path()?, a.file.clone()),
    };
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let model = Model::open(model_path)?;
    let tokenizer = Tokenizer::from_gguf(model.file())?;
    let decoder = a.model.decoder(&model)?;
    let pb = progress_bar(0, "scoring");
    let s = perplexity(
        &decoder,
        &tokenizer,
        &text,
        a.context,
        &mut |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
            ControlFlow::Continue(())
        },
    )?;
    pb.finish_and_clear();
    if a.json {
        return print_json(&serde_json::json!({
            "tokens": s.text_tokens,
            "predicted_tokens": s.predicted_tokens,
            "nll": s.nll,
            "perplexity": s.perplexity,
        }));
    }
    println!(
        "tokens      {} ({} predicted in {} windows of ≤{})",
        s.text_tokens, s.predicted_tokens, s.windows, a.context
    );
    println!("nll         {:.6}", s.nll);
    println!("perplexity  {:.4}", s.perplexity);
    Ok(())
}
