//! The tokenizers of the real models against the reference ids made by
//! Hugging Face `transformers` loading the same GGUF files.
//!
//! For each model file present in `models/` (skipped with a message when
//! absent) and every prompt of `prompts.json`: the exact `input_ids` (chats
//! rendered with the model's own template), `decode(encode(text)) == text`,
//! and the token count of `texts/mpl-2.0-head.txt`.
//!
//! The reference directory is `$EDGETUNE_REFERENCE_DIR`, else the copy in
//! `tests/reference`.

mod common;

use edgetune::gguf::GgufFile;
use edgetune::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use serde_json::Value;
use std::path::PathBuf;

fn reference_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("EDGETUNE_REFERENCE_DIR") {
        return Some(PathBuf::from(dir));
    }
    [concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference")]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("prompts.json").exists())
}

fn read_json(path: PathBuf) -> Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id list")
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The model file and its tokenizer, or `None` (with a message) when absent.
fn open(file: &str) -> Option<(GgufFile, Tokenizer)> {
    let path = common::model_file(file)?;
    let gguf = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    Some((gguf, tok))
}

fn check_model(model_file: &str, reference_file: &str) {
    let Some(dir) = reference_dir() else {
        eprintln!("skipping: no reference directory (set EDGETUNE_REFERENCE_DIR)");
        return;
    };
    let Some((gguf, tok)) = open(model_file) else {
        return;
    };
    assert!(tok.warnings().is_empty(), "{:?}", tok.warnings());
    let refs = read_json(dir.join(reference_file));
    let template = ChatTemplate::from_gguf(&gguf).unwrap();

    for p in refs["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let text = p["text"].as_str().unwrap();
        let got = match p["chat"].as_array() {
            Some(chat) => {
                let msgs: Vec<ChatMessage> =
                    serde_json::from_value(Value::Array(chat.clone())).unwrap();
                let t = template
                    .as_ref()
                    .expect("a chat prompt needs the model's template");
                let rendered = t.render(&msgs, true).unwrap();
                assert_eq!(rendered, text, "{model_file} {name}: rendered chat");
                tok.encode(&rendered, false).unwrap()
            }
            None => tok.encode(text, true).unwrap(),
        };
        assert_eq!(got, ids(&p["input_ids"]), "{model_file} {name}: input ids");

        let plain = tok.encode(text, false).unwrap();
        assert_eq!(
            tok.decode(&plain),
            text,
            "{model_file} {name}: decode(encode(text))"
        );
    }

    // Every prompt of prompts.json is covered: plain ones always, chats when the
    // model has a template (the reference has no chat entry otherwise).
    let prompts = read_json(dir.join("prompts.json"));
    for p in prompts.as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let covered = refs["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == name);
        let is_chat = p.get("chat").is_some();
        assert!(
            covered || (is_chat && template.is_none()),
            "{model_file}: prompt {name} has no reference"
        );
    }

    for entry in refs["perplexity"].as_array().unwrap() {
        let file = entry["file"].as_str().unwrap();
        let text = std::fs::read_to_string(dir.join("texts").join(file)).unwrap();
        let n = tok.encode(&text, false).unwrap().len();
        assert_eq!(
            n as u64,
            entry["text_tokens"].as_u64().unwrap(),
            "{model_file}: tokens in {file}"
        );
        let ids = tok.encode(&text, false).unwrap();
        assert_eq!(
            tok.decode(&ids),
            text,
            "{model_file}: decode(encode({file}))"
        );
    }
}

#[test]
fn smollm2_reference_ids() {
    check_model(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct.json",
    );
}

#[test]
fn gemma3_reference_ids() {
    check_model("gemma-3-270m-Q4_K_M.gguf", "gemma-3-270m.json");
}

#[test]
fn smollm2_special_tokens() {
    let Some((gguf, tok)) = open("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    assert_eq!(tok.kind(), "gpt2");
    assert_eq!(tok.vocab_size(), 49152);
    assert!(!tok.add_bos());
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    let im_end = tok.token_id("<|im_end|>").unwrap();
    assert!(tok.is_end_of_generation(im_end));
    assert!(tok.is_end_of_generation(tok.token_id("<|endoftext|>").unwrap()));
    assert!(!tok.is_end_of_generation(tok.token_id("<|im_start|>").unwrap()));
    // The reference's greedy chat answer decodes to its text.
    let greedy = [504, 2988, 288, 451, 8170, 4119, 1732, 314, 216, 36, 30, 2];
    assert_eq!(
        tok.decode(&greedy),
        "The answer to this classic math problem is 4.<|im_end|>"
    );
    assert!(ChatTemplate::from_gguf(&gguf).unwrap().is_some());
}

#[test]
fn gemma3_special_tokens() {
    let Some((gguf, tok)) = open("gemma-3-270m-Q4_K_M.gguf") else {
        return;
    };
    assert_eq!(tok.kind(), "llama");
    assert_eq!(tok.vocab_size(), 262144);
    assert!(tok.add_bos());
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(2), Some(1)));
    let eot = tok.token_id("<end_of_turn>").unwrap();
    assert!(tok.is_end_of_generation(eot));
    assert_eq!(
        tok.encode("<start_of_turn>user\nhi<end_of_turn>", false)
            .unwrap()[..2],
        [
            tok.token_id("<start_of_turn>").unwrap(),
            tok.token_id("user").unwrap()
        ]
    );
    // The model has no chat template: the error says how to give one.
    assert!(ChatTemplate::from_gguf(&gguf).unwrap().is_none());
    let err = ChatTemplate::for_model(&gguf, &tok, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--chat-template FILE"), "{err}");
}

/// Extra cases from an oracle dump, when `$EDGETUNE_TOKENIZER_CASES` names
/// one: a JSON list of `{"model": FILE, "cases": [{"text", "ids"}]}`, the ids
/// made without special tokens added (e.g. by `transformers` on the same
/// GGUF). Every mismatch is listed.
#[test]
fn oracle_cases_from_env() {
    let Some(path) = std::env::var_os("EDGETUNE_TOKENIZER_CASES") else {
        eprintln!("skipping: EDGETUNE_TOKENIZER_CASES is not set");
        return;
    };
    let dump = read_json(PathBuf::from(path));
    let mut failures = Vec::new();
    let mut total = 0;
    for model in dump.as_array().unwrap() {
        let file = model["model"].as_str().unwrap();
        let Some((_, tok)) = open(file) else { continue };
        for case in model["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want = ids(&case["ids"]);
            let got = tok.encode(text, false).unwrap();
            total += 1;
            if got != want {
                failures.push(format!("{file} {text:?}\n  want {want:?}\n  got  {got:?}"));
            } else if tok.decode(&got) != text && !(tok.kind() == "llama" && text.contains('▁')) {
                // (A `▁` in SentencePiece input reads back as a space.)
                failures.push(format!(
                    "{file} {text:?}: decodes to {:?}",
                    tok.decode(&got)
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
