//! Shared by the integration tests: where the real models are, and the
//! reference outputs.
#![allow(dead_code)]

use edgetune::model::Model;
use edgetune::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use serde_json::Value;
use std::path::PathBuf;

/// `models/<file>` if it exists. Absent models skip the test with a message,
/// unless `EDGETUNE_REQUIRE_MODELS` is set (as in `.ci/run`), where a missing
/// model is a failure: CI must never pass by skipping.
pub fn model_file(file: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(file);
    if p.exists() {
        return Some(p);
    }
    if std::env::var_os("EDGETUNE_REQUIRE_MODELS").is_some() {
        panic!(
            "{} is absent and EDGETUNE_REQUIRE_MODELS is set: run models/fetch all",
            p.display()
        );
    }
    eprintln!("skipping: {} is absent (run models/fetch all)", p.display());
    None
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn reference(name: &str) -> Value {
    let p = root().join("tests/reference").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

pub fn open(file: &str) -> Option<Model> {
    model_file(file).map(|p| Model::open(p).unwrap())
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Prompt ids as the reference made them: chats rendered with the model's
/// template (nothing added after), plain text with the default specials.
pub fn encode_prompt(model: &Model, tok: &Tokenizer, p: &Value) -> Vec<u32> {
    match p["chat"].as_array() {
        Some(chat) => {
            let msgs: Vec<ChatMessage> =
                serde_json::from_value(Value::Array(chat.clone())).unwrap();
            // As the CLI does it.
            let t = ChatTemplate::for_model(model.file(), tok, None).unwrap();
            let text = t.render(&msgs, true).unwrap();
            assert_eq!(text, p["text"].as_str().unwrap(), "rendered chat differs");
            t.encode(tok, &msgs, true).unwrap()
        }
        None => tok.encode(p["text"].as_str().unwrap(), true).unwrap(),
    }
}

/// The last position's logits of `input` on the CPU decoder, with `adapter`.
pub fn last_logits(
    model: &Model,
    adapter: Option<edgetune::peft::AdapterWeights>,
    input: &[u32],
) -> Vec<f32> {
    use edgetune::backend::cpu::{CpuDecoder, Logits};
    let mut dec = CpuDecoder::new(model).unwrap();
    if let Some(a) = adapter {
        dec.add_adapter(std::sync::Arc::new(a));
    }
    let mut cache = dec.new_cache(input.len());
    dec.forward(input, &mut cache, Logits::Last).unwrap()
}

/// A JSON array of numbers.
pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}
