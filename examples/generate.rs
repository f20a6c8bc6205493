//! Embedding edgetune in an application: load a model, chat with it on a
//! hardware GPU when there is one (else the CPU), and stream the answer,
//! stopping early from the callback.
//!
//! ```sh
//! cargo run --release --example generate -- [MODEL] ["your question"]
//! ```

use edgetune::backend::Decoder;
use edgetune::backend::cpu::CpuDecoder;
use edgetune::backend::gpu::{GpuContext, GpuDecoder, GpuOptions};
use edgetune::infer::{GenerateOptions, SamplingParams, generate};
use edgetune::model::Model;
use edgetune::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use std::io::Write;
use std::ops::ControlFlow;

fn main() -> edgetune::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let question = args
        .next()
        .unwrap_or_else(|| "Name three uses of a paperclip.".into());

    let model = Model::open(&path)?;
    let tokenizer = Tokenizer::from_gguf(model.file())?;
    let template = ChatTemplate::for_model(model.file(), &tokenizer, None)?;
    let prompt = template.encode(&tokenizer, &[ChatMessage::new("user", question)], true)?;

    // A hardware GPU if wgpu finds one (software adapters are not chosen
    // unless asked for), else the CPU: both behind `dyn Decoder`.
    let decoder: Box<dyn Decoder + '_> = match GpuContext::new(&GpuOptions::default()) {
        Ok(ctx) => Box::new(GpuDecoder::new(&model, ctx)?),
        Err(_) => Box::new(CpuDecoder::new(&model)?),
    };
    eprintln!("[running on {}]", decoder.device_name());
    let opts = GenerateOptions {
        max_tokens: 200,
        sampling: SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.95,
            seed: 1,
        },
        stop_at_end: true,
    };
    let mut lines = 0;
    let out = generate(decoder.as_ref(), &tokenizer, &prompt, &opts, &mut |piece| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
        // An application can stop generation at any point: here, after 8 lines.
        lines += piece.matches('\n').count();
        if lines >= 8 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    println!("\n[{} tokens, stopped: {:?}]", out.tokens.len(), out.stop);
    Ok(())
}
