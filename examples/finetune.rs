//! Fine-tune a model on your own notes inside an application, then ask it
//! questions, the base model's answers beside the adapted model's.
//!
//! ```sh
//! models/fetch
//! cargo run --release --example finetune -- [MODEL] [DATA] [OUT]
//! ```
//!
//! Defaults: SmolLM2-135M-Instruct, `examples/data/chat.jsonl` (a fictional
//! person's notes as questions and answers), `runs/example`. The run is one
//! library call with a progress callback; Ctrl-C stops it at the end of the
//! step (it is checkpointed: run the example again to resume).

use edgetune::backend::cpu::CpuDecoder;
use edgetune::export::gguf_lora;
use edgetune::infer::{self, GenerateOptions};
use edgetune::model::Model;
use edgetune::peft::AdapterWeights;
use edgetune::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use edgetune::train::{Duration, TrainConfig, TrainEvent, TrainRequest, train};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const QUESTIONS: [&str; 4] = [
    "What instrument do I play in The Salt Ledger?",
    "When did I adopt Admiral Biscuit?",
    "What triggers the Brindle swarm alert?",
    "How many nights am I spending in Bohinj?",
];

fn answer(
    decoder: &CpuDecoder,
    tok: &Tokenizer,
    tpl: &ChatTemplate,
    q: &str,
) -> edgetune::Result<String> {
    let prompt = tpl.encode(tok, &[ChatMessage::new("user", q)], true)?;
    let opts = GenerateOptions {
        max_tokens: 40,
        ..Default::default()
    };
    let out = infer::generate(decoder, tok, &prompt, &opts, &mut |_| {
        ControlFlow::Continue(())
    })?;
    Ok(out.text.trim().replace('\n', " "))
}

fn main() -> edgetune::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_path = args
        .next()
        .unwrap_or("models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let data = PathBuf::from(args.next().unwrap_or("examples/data/chat.jsonl".into()));
    let out = PathBuf::from(args.next().unwrap_or("runs/example".into()));

    let model = Model::open(&model_path)?;
    let tok = Tokenizer::from_gguf(model.file())?;
    let tpl = ChatTemplate::from_gguf(model.file())?
        .ok_or_else(|| edgetune::Error::Invalid(format!("{model_path} has no chat template")))?
        .with_special_tokens_of(&tok);

    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let _ = ctrlc::set_handler(move || s.store(true, Ordering::SeqCst));

    let mut config = TrainConfig {
        lr: 3e-3,
        duration: Duration::Epochs(6.0),
        batch: 1,
        seq: 256,
        memory_budget: Some(512 << 20),
        ..TrainConfig::default()
    };
    config.lora.rank = 16;
    config.lora.alpha = 32.0;
    let req = TrainRequest {
        model: &model,
        tokenizer: &tok,
        template: Some(&tpl),
        data: &data,
        eval_data: None,
        out: &out,
        config,
        threads: 0,
        device: Default::default(),
        resume: out.join(edgetune::train::CHECKPOINT_FILE).exists(),
    };
    let summary = train(&req, &mut |event| {
        match event {
            TrainEvent::Planned {
                memory,
                total_steps,
                ..
            } => {
                eprintln!(
                    "planned peak {} MB, {total_steps} steps",
                    memory.total() >> 20
                )
            }
            TrainEvent::Step {
                step,
                total_steps,
                loss,
                tokens_per_s,
                ..
            } => {
                eprint!(
                    "\rstep {step}/{total_steps}  loss {loss:.3}  {tokens_per_s:.0} tokens/s   "
                )
            }
            _ => {}
        }
        if stop.load(Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    eprintln!("\nadapter: {}", summary.adapter.display());

    let base = CpuDecoder::new(&model)?;
    let mut tuned = CpuDecoder::new(&model)?;
    let file = gguf_lora::read(&summary.adapter)?;
    file.check_base(model.file())?;
    tuned.add_adapter(Arc::new(AdapterWeights::new(&file, 1.0)));
    for q in QUESTIONS {
        println!("Q: {q}");
        println!("  base:  {}", answer(&base, &tok, &tpl, q)?);
        println!("  tuned: {}", answer(&tuned, &tok, &tpl, q)?);
    }
    Ok(())
}
