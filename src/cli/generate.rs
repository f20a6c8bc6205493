//! `edgetune generate`.

use super::{AdapterArgs, ModelArgs, interrupted, keep_going, print_json};
use clap::Args;
use edgetune::Error;
use edgetune::backend::cpu::MatvecMode;
use edgetune::infer::{GenerateOptions, SamplingParams, generate};
use edgetune::model::Model;
use edgetune::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

/// Arguments of `generate`.
#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    adapters: AdapterArgs,
    /// The prompt.
    #[arg(long, short)]
    prompt: String,
    /// Treat the prompt as a user message and render it with the chat template.
    #[arg(long)]
    chat: bool,
    /// A system message (implies --chat).
    #[arg(long)]
    system: Option<String>,
    /// A Jinja chat template file, for models without one (implies --chat).
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the K most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Sample within the top-P probability mass.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Faster generation: round activations to 8 bits in single-token
    /// products, as llama.cpp does (prompts stay exact).
    #[arg(long)]
    fast: bool,
    /// Print one JSON object with the text and timings at the end instead of streaming.
    #[arg(long)]
    json: bool,
}

pub fn run(a: GenerateArgs) -> Result<(), Error> {
    let model = Model::open(a.model.path()?)?;
    let tokenizer = Tokenizer::from_gguf(model.file())?;
    let prompt = if a.chat || a.chat_template.is_some() || a.system.is_some() {
        let template =
            ChatTemplate::for_model(model.file(), &tokenizer, a.chat_template.as_deref())?;
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: s.clone(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: a.prompt.clone(),
        });
        template.encode(&tokenizer, &messages, true)?
    } else {
        tokenizer.encode(&a.prompt, true)?
    };
    let mode = if a.fast {
        MatvecMode::Q8
    } else {
        MatvecMode::Exact
    };
    let decoder = a
        .model
        .run
        .decoder_with_adapters(&model, mode, &a.adapters.adapters)?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
        stop_at_end: true,
    };
    let mut stdout = std::io::stdout().lock();
    let json = a.json;
    let g = generate(decoder.as_ref(), &tokenizer, &prompt, &opts, &mut |piece| {
        if !json {
            // A closed pipe (`| head`) ends generation quietly.
            if stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush())
                .is_err()
            {
                return ControlFlow::Break(());
            }
        }
        keep_going()
    })?;
    let prompt_tps = g.prompt_tokens as f64 / g.prompt_seconds;
    let gen_tps = g.tokens.len() as f64 / g.generate_seconds.max(1e-9);
    if json {
        return print_json(&serde_json::json!({
            "text": g.text,
            "tokens": g.tokens,
            "prompt_tokens": g.prompt_tokens,
            "stop": format!("{:?}", g.stop),
            "prompt_tokens_per_s": prompt_tps,
            "gen_tokens_per_s": gen_tps,
        }));
    }
    let _ = writeln!(stdout);
    if interrupted() {
        return Err(Error::Cancelled);
    }
    eprintln!(
        "[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s, stop: {:?}]",
        g.prompt_tokens,
        prompt_tps,
        g.tokens.len(),
        gen_tps,
        g.stop
    );
    Ok(())
}
