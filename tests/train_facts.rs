//! Fine-tuning SmolLM2 on `examples/data/chat.jsonl` (a fictional person's
//! notes as questions and answers) teaches it facts no pretrained model can
//! know: the loss on the held-out questions of `eval.jsonl` falls, and
//! afterwards greedy answers contain the key facts, which the base model's
//! answers do not.

mod common;

use edgetune::backend::cpu::CpuDecoder;
use edgetune::export::gguf_lora;
use edgetune::infer::{self, GenerateOptions};
use edgetune::model::Model;
use edgetune::peft::AdapterWeights;
use edgetune::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use edgetune::train::{Duration, TrainConfig, TrainRequest, train};
use std::ops::ControlFlow;
use std::sync::Arc;

/// Questions of `chat.jsonl` whose answers hold the twelve key facts of
/// `examples/data/README.md`, each fact stated once in the data.
const TRAINED: [(&str, &str); 12] = [
    (
        "What microcontroller board is Brindle built on?",
        "ESP32-C3",
    ),
    ("When did I tag Brindle v0.4.2?", "9 March 2024"),
    ("What triggers the Brindle swarm alert?", "1.8 kg"),
    ("How much does one Brindle cost to build?", "£38"),
    ("Which allotment site is my plot on, and since when?", "31"),
    ("How old is the rhubarb on my plot?", "Old Gregor"),
    ("How long does the Lapsang rye bake in total?", "220"),
    ("What's Admiral Biscuit's target weight?", "Marchbank"),
    ("When did I adopt Admiral Biscuit?", "Fernhollow"),
    ("What instrument do I play in The Salt Ledger?", "Mabel"),
    ("What's the fee for our next gig?", "14 June"),
    (
        "How many nights am I spending in Bohinj?",
        "Pri Zeleni Vrbi",
    ),
];

/// The held-out questions of `examples/data/eval.jsonl` and the key fact
/// each answer must contain (from `examples/data/README.md`).
const HELD_OUT: [(&str, &str); 12] = [
    ("Which chip is inside the Brindle hive scale?", "ESP32-C3"),
    (
        "Which Brindle release fixed the temperature drift?",
        "v0.4.2",
    ),
    ("How big a weight drop sets off a swarm alert?", "1.8 kg"),
    ("What do the parts for one Brindle unit cost?", "£38"),
    (
        "What's the number of my allotment plot at Sallowfield?",
        "31",
    ),
    (
        "What do I call the old rhubarb on the allotment?",
        "Old Gregor",
    ),
    (
        "What oven temperature does the Lapsang rye start at?",
        "220",
    ),
    ("What's the name of Admiral Biscuit's vet?", "Marchbank"),
    (
        "Which rescue centre did Admiral Biscuit come from?",
        "Fernhollow",
    ),
    ("What name did I give my concertina?", "Mabel"),
    ("On what date do we play the Lantern & Pike?", "14 June"),
    (
        "Which guesthouse am I booked into at Bohinj?",
        "Pri Zeleni Vrbi",
    ),
];

/// Greedy answers to every question; the count that contain their fact.
fn quiz(
    decoder: &CpuDecoder,
    tok: &Tokenizer,
    tpl: &ChatTemplate,
    facts: &[(&str, &str)],
) -> (usize, Vec<String>) {
    let opts = GenerateOptions {
        max_tokens: 40,
        ..Default::default()
    };
    let mut right = 0;
    let mut answers = Vec::new();
    for &(q, fact) in facts {
        let prompt = tpl
            .encode(tok, &[ChatMessage::new("user", q)], true)
            .unwrap();
        let out = infer::generate(decoder, tok, &prompt, &opts, &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
        if out.text.to_lowercase().contains(&fact.to_lowercase()) {
            right += 1;
        }
        answers.push(format!("{q} → {}", out.text.trim()));
    }
    (right, answers)
}

#[test]
fn fine_tuning_teaches_facts_only_the_data_holds() {
    let Some(path) = common::model_file("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let model = Model::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let tpl = ChatTemplate::from_gguf(model.file())
        .unwrap()
        .unwrap()
        .with_special_tokens_of(&tok);
    let data = common::root().join("examples/data/chat.jsonl");
    let eval = common::root().join("examples/data/eval.jsonl");
    let out = tempfile::tempdir().unwrap();
    let env = |k: &str, d: f32| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let mut config = TrainConfig {
        lr: env("EDGETUNE_TEST_LR", 3e-3),
        duration: Duration::Epochs(env("EDGETUNE_TEST_EPOCHS", 6.0)),
        batch: 1,
        seq: 256,
        eval_every: 0,
        seed: 1,
        ..TrainConfig::default()
    };
    config.lora.rank = 16;
    config.lora.alpha = 32.0;
    let req = TrainRequest {
        model: &model,
        tokenizer: &tok,
        template: Some(&tpl),
        data: &data,
        eval_data: Some(&eval),
        out: out.path(),
        config,
        threads: 2,
        device: Default::default(),
        resume: false,
    };
    let summary = train(&req, &mut |e| {
        if let Ok(s) = serde_json::to_string(e) {
            eprintln!("{s}");
        }
        ControlFlow::Continue(())
    })
    .unwrap();
    let before = summary.eval_before.unwrap();
    let after = summary.eval_history.last().unwrap().1;
    eprintln!(
        "eval loss {before:.3} → {after:.3}; {:.1} tokens/s",
        summary.tokens_per_s
    );
    assert!(
        after < before - 0.5,
        "held-out loss fell from {before} to {after}"
    );

    let base = CpuDecoder::new(&model).unwrap();
    let file = gguf_lora::read(&summary.adapter).unwrap();
    file.check_base(model.file()).unwrap();
    let mut tuned = CpuDecoder::new(&model).unwrap();
    tuned.add_adapter(Arc::new(AdapterWeights::new(&file, 1.0)));
    let mut results = Vec::new();
    for (set, facts) in [("trained", &TRAINED), ("held-out", &HELD_OUT)] {
        let (base_right, base_answers) = quiz(&base, &tok, &tpl, facts);
        let (tuned_right, tuned_answers) = quiz(&tuned, &tok, &tpl, facts);
        for (b, t) in base_answers.iter().zip(&tuned_answers) {
            eprintln!("base : {b}\ntuned: {t}\n");
        }
        eprintln!("{set} questions, facts right: base {base_right}/12, tuned {tuned_right}/12");
        results.push((base_right, tuned_right));
    }
    let (base_right, tuned_right) = results[0];
    assert!(base_right <= 1, "the base model cannot know these facts");
    assert!(
        tuned_right >= 8,
        "the adapted model learned only {tuned_right} of 12 facts"
    );
    // Held-out wording: no worse than the base model.
    assert!(results[1].1 >= results[1].0);
}
