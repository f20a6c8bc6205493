//! Tests of loading and masking, with the real SmolLM2 tokenizer and chat
//! template (skipped with a note when the model file is absent).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::*;
use crate::gguf::GgufFile;
use crate::tokenizer::ChatMessage;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

struct Model {
    tok: Tokenizer,
    template: ChatTemplate,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The model's tokenizer and template; `None` (with a note) when the model
/// file is absent, a panic instead when `EDGETUNE_REQUIRE_MODELS` is set.
fn model() -> Option<&'static Model> {
    let path = root().join("models").join(MODEL);
    if !path.exists() {
        if std::env::var_os("EDGETUNE_REQUIRE_MODELS").is_some() {
            panic!(
                "{} is absent and EDGETUNE_REQUIRE_MODELS is set: run models/fetch all",
                path.display()
            );
        }
        eprintln!(
            "skipping: {} is absent (run models/fetch all)",
            path.display()
        );
        return None;
    }
    static M: OnceLock<Model> = OnceLock::new();
    Some(M.get_or_init(|| {
        let file = GgufFile::open(&path).unwrap();
        let tok = Tokenizer::from_gguf(&file).unwrap();
        let template = ChatTemplate::for_model(&file, &tok, None).unwrap();
        Model { tok, template }
    }))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, text).unwrap();
    p
}

fn load_with(m: &Model, path: &Path, opts: &DataOptions) -> Result<Dataset> {
    load(path, &m.tok, Some(&m.template), opts)
}

/// Decoded text of the trainable tokens.
fn trained_text(m: &Model, e: &Example) -> String {
    let ids: Vec<u32> = e
        .tokens
        .iter()
        .zip(&e.trainable)
        .filter_map(|(&t, &on)| on.then_some(t))
        .collect();
    m.tok.decode(&ids)
}

/// The error message of a load that must fail.
fn load_err(m: &Model, path: &Path) -> String {
    match load_with(m, path, &DataOptions::default()) {
        Err(Error::Invalid(msg)) => msg,
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

fn check_example_shape(e: &Example, seq: usize) {
    assert_eq!(e.tokens.len(), e.trainable.len(), "{}", e.source);
    assert!(e.tokens.len() >= 2 && e.tokens.len() <= seq, "{}", e.source);
    assert!(!e.trainable[0], "{}", e.source);
    assert!(e.target_tokens() > 0, "{}", e.source);
}

#[test]
fn notes_folder_is_sorted_and_fully_trained() {
    let Some(m) = model() else { return };
    let dir = tempfile::TempDir::new().unwrap();
    write(dir.path(), "b.md", "# Bees\n\nThe hive is heavy today.");
    write(dir.path(), "a.txt", "Rye bread needs a long, slow proof.");
    write(
        dir.path(),
        "sub/c.txt",
        "The cat is called Admiral Biscuit.",
    );
    write(dir.path(), "skip.json", "{\"text\": \"not a note\"}");
    write(dir.path(), "empty.txt", "  \n");
    let ds = load_with(m, dir.path(), &DataOptions::default()).unwrap();
    let names: Vec<&str> = ds
        .examples
        .iter()
        .map(|e| e.source.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(names, ["a.txt", "b.md", "c.txt"]);
    assert_eq!((ds.skipped, ds.split_windows), (1, 0));
    assert!(ds.warnings[0].contains("empty.txt"), "{:?}", ds.warnings);
    let eos = m.tok.eos_id().unwrap();
    for e in &ds.examples {
        check_example_shape(e, 256);
        assert_eq!(*e.tokens.last().unwrap(), eos);
        assert!(e.trainable[1..].iter().all(|&t| t));
    }
    assert_eq!(
        m.tok
            .decode(&ds.examples[0].tokens[..ds.examples[0].tokens.len() - 1]),
        "Rye bread needs a long, slow proof."
    );
    assert_eq!(
        ds.tokens(),
        ds.examples.iter().map(|e| e.tokens.len()).sum::<usize>()
    );
    assert_eq!(ds.target_tokens(), ds.tokens() - 3);

    let empty = tempfile::TempDir::new().unwrap();
    write(empty.path(), "data.csv", "a,b");
    let msg = load_err(m, empty.path());
    assert!(msg.contains(&empty.path().display().to_string()), "{msg}");
    assert!(msg.contains("no .txt or .md files"), "{msg}");
}

#[test]
fn long_examples_are_cut_into_windows() {
    let Some(m) = model() else { return };
    let dir = tempfile::TempDir::new().unwrap();
    let text = "One sentence about the allotment and the slugs. ".repeat(20);
    let p = write(dir.path(), "long.txt", &text);
    let full = m.tok.encode_with(&text, true, false).unwrap();
    let opts = DataOptions {
        seq: 16,
        ..Default::default()
    };
    let ds = load_with(m, &p, &opts).unwrap();
    assert_eq!(ds.split_windows, 1);
    let mut joined = Vec::new();
    for e in &ds.examples {
        check_example_shape(e, 16);
        joined.extend_from_slice(&e.tokens);
    }
    // Consecutive windows, no BOS added to later ones, EOS at the very end
    // (a last window of one token would be skipped).
    let n = joined.len();
    assert_eq!(
        joined[..],
        [&full[..], &[m.tok.eos_id().unwrap()]].concat()[..n]
    );
    let total = full.len() + 1;
    let lone = usize::from(total % 16 == 1);
    assert_eq!((n, ds.skipped), (total - lone, lone));
    assert_eq!(ds.len(), total.div_ceil(16) - lone);
}

#[test]
fn text_and_prompt_completion_lines() {
    let Some(m) = model() else { return };
    let dir = tempfile::TempDir::new().unwrap();
    let p = write(
        dir.path(),
        "d.jsonl",
        "{\"text\": \"Plain text to learn.\", \"id\": 7}\n\n\
         {\"prompt\": \"The swarm alert fires when a hive loses\", \"completion\": \" more than 1.8 kg.\"}\n",
    );
    let ds = load_with(m, &p, &DataOptions::default()).unwrap();
    assert_eq!(ds.len(), 2);
    let eos_text = m.tok.decode(&[m.tok.eos_id().unwrap()]);
    let (text, pc) = (&ds.examples[0], &ds.examples[1]);
    assert!(text.source.ends_with("d.jsonl:1"), "{}", text.source);
    assert!(pc.source.ends_with("d.jsonl:3"), "{}", pc.source);
    check_example_shape(text, 256);
    assert!(text.trainable[1..].iter().all(|&t| t));
    assert_eq!(trained_text(m, pc), format!(" more than 1.8 kg.{eos_text}"));
    let prompt = m
        .tok
        .encode("The swarm alert fires when a hive loses", true)
        .unwrap();
    assert_eq!(pc.tokens[..prompt.len()], prompt[..]);
    assert!(pc.trainable[..prompt.len()].iter().all(|&t| !t));

    let all = DataOptions {
        train_on_prompt: true,
        ..Default::default()
    };
    let ds = load_with(m, &p, &all).unwrap();
    assert!(ds.examples[1].trainable[1..].iter().all(|&t| t));
}

#[test]
fn messages_train_only_the_assistant_turns() {
    let Some(m) = model() else { return };
    let dir = tempfile::TempDir::new().unwrap();
    let p = write(
        dir.path(),
        "chat.jsonl",
        r#"{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is my cat called?"}, {"role": "assistant", "content": "Admiral Biscuit."}, {"role": "user", "content": "And his vet?"}, {"role": "assistant", "content": "Dr Ilse Marchbank."}]}"#,
    );
    let ds = load_with(m, &p, &DataOptions::default()).unwrap();
    assert_eq!(ds.len(), 1);
    let e = &ds.examples[0];
    check_example_shape(e, 256);
    let trained = trained_text(m, e);
    for want in ["Admiral Biscuit.", "Dr Ilse Marchbank."] {
        assert!(trained.contains(want), "{trained:?}");
    }
    for not in [
        "Answer briefly",
        "cat called",
        "his vet",
        "user",
        "assistant",
    ] {
        assert!(!trained.contains(not), "{trained:?} contains {not:?}");
    }
    // Each assistant turn ends with a trained end-of-turn token.
    let eot: Vec<usize> = (0..e.tokens.len())
        .filter(|&i| e.trainable[i] && m.tok.is_end_of_generation(e.tokens[i]))
        .collect();
    assert_eq!(eot.len(), 2, "{trained:?}");
    // The tokens are the template's rendering of the whole conversation.
    let msgs = vec![
        ChatMessage::new("system", "Answer briefly."),
        ChatMessage::new("user", "What is my cat called?"),
        ChatMessage::new("assistant", "Admiral Biscuit."),
        ChatMessage::new("user", "And his vet?"),
        ChatMessage::new("assistant", "Dr Ilse Marchbank."),
    ];
    assert_eq!(e.tokens, m.template.encode(&m.tok, &msgs, false).unwrap());
    // The untrained part up to the first answer is the generation prompt.
    let first = e.trainable.iter().position(|&t| t).unwrap();
    assert_eq!(
        e.tokens[..first],
        m.template.encode(&m.tok, &msgs[..2], true).unwrap()[..]
    );

    let all = DataOptions {
        train_on_prompt: true,
        ..Default::default()
    };
    let ds = load_with(m, &p, &all).unwrap();
    assert!(ds.examples[0].trainable[1..].iter().all(|&t| t));
}

#[test]
fn plain_templates_get_an_eos_and_broken_ones_an_error() {
    let Some(m) = model() else { return };
    let dir = tempfile::TempDir::new().unwrap();
    let p = write(
        dir.path(),
        "chat.jsonl",
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}"#,
    );
    // No end-of-turn token at all: EOS is appended and trained.
    let plain = ChatTemplate::new(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
         {% if add_generation_prompt %}assistant: {% endif %}",
        "",
        "",
    )
    .unwrap();
    let ds = load(&p, &m.tok, Some(&plain), &DataOptions::default()).unwrap();
    let e = &ds.examples[0];
    assert_eq!(e.tokens.last(), m.tok.eos_id().as_ref());
    let eos_text = m.tok.decode(&[m.tok.eos_id().unwrap()]);
    // The space of the generation prompt merges into " Hello": that token is trained.
    assert_eq!(trained_text(m, e), format!(" Hello there\n{eos_text}"));

    // A generation prompt that is not how the template writes an assistant turn.
    let broken = ChatTemplate::new(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
         {% if add_generation_prompt %}ASSISTANT:{% endif %}",
        "",
        "",
    )
    .unwrap();
    match load(&p, &m.tok, Some(&broken), &DataOptions::default()) {
        Err(Error::Invalid(msg)) => {
            assert!(msg.contains("chat.jsonl:1:"), "{msg}");
            assert!(msg.contains("prefix"), "{msg}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn messages_need_a_template() {
    let Some(m) = model() else { return };
    let dir = tempfile::TempDir::new().unwrap();
    let p = write(
        dir.path(),
        "chat.jsonl",
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#,
    );
    match load(&p, &m.tok, None, &DataOptions::default()) {
        Err(Error::Invalid(msg)) => {
            assert!(msg.contains("chat.jsonl:1:"), "{msg}");
            assert!(
                msg.contains("no chat template") || msg.contains("has none"),
                "{msg}"
            );
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn bad_lines_are_errors_naming_file_and_line() {
    let Some(m) = model() else { return };
    let dir = tempfile::TempDir::new().unwrap();
    let good = r#"{"text": "fine"}"#;
    let user = r#"{"role": "user", "content": "Hi"}"#;
    let cases: &[(&str, &str)] = &[
        ("{\"text\": \"unterminated}", "invalid JSON"),
        (
            r#"{"prompt": "no completion"}"#,
            "missing field \"completion\"",
        ),
        (r#"{"completion": "no prompt"}"#, "missing field \"prompt\""),
        (r#"{"input": "x"}"#, "no \"text\""),
        (r#"{"text": 5}"#, "must be a string"),
        (r#"{"text": "  "}"#, "empty \"text\""),
        (
            r#"{"text": "a", "prompt": "b", "completion": "c"}"#,
            "mixes",
        ),
        (r#"["text"]"#, "expected a JSON object"),
        (r#"{"messages": "hi"}"#, "must be an array"),
        (r#"{"messages": []}"#, "empty"),
        (
            r#"{"messages": [{"role": "tool", "content": "x"}]}"#,
            "unknown role \"tool\"",
        ),
        (
            r#"{"messages": [{"role": "user"}]}"#,
            "missing field \"content\"",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}"#,
            "empty \"content\" in message 2",
        ),
        (&format!(r#"{{"messages": [{user}]}}"#), "no assistant turn"),
    ];
    for (i, (line, want)) in cases.iter().enumerate() {
        let p = write(
            dir.path(),
            &format!("bad{i}.jsonl"),
            &format!("{good}\n{good}\n{line}\n{good}\n"),
        );
        let msg = load_err(m, &p);
        let at = format!("{}:3: ", p.display());
        assert!(msg.starts_with(&at), "{line}: {msg}");
        assert!(msg.contains(want), "{line}: {msg}");
    }

    let p = write(dir.path(), "blank.jsonl", "\n  \n");
    assert!(load_err(m, &p).contains("no training examples"));
    let p = write(dir.path(), "array.json", "[{\"text\": \"x\"}]");
    assert!(load_err(m, &p).contains("JSON Lines"));
    let p = write(dir.path(), "data.csv", "text\nx\n");
    assert!(load_err(m, &p).contains("unknown data format"));
    let p = write(dir.path(), "latin1.txt", "");
    std::fs::write(&p, b"caf\xe9").unwrap();
    assert!(load_err(m, &p).contains("not UTF-8"));
    match load_with(m, &dir.path().join("absent.jsonl"), &DataOptions::default()) {
        Err(Error::Io { .. }) => {}
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[test]
fn example_data_loads() {
    let Some(m) = model() else { return };
    let data = root().join("examples/data");
    for (name, min) in [
        ("notes", 8),
        ("notes.txt", 1),
        ("chat.jsonl", 76),
        ("prompt_completion.jsonl", 20),
        ("eval.jsonl", 12),
    ] {
        let ds = load_with(m, &data.join(name), &DataOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(ds.len() >= min, "{name}: {} examples", ds.len());
        assert_eq!(ds.skipped, 0, "{name}: {:?}", ds.warnings);
        for e in &ds.examples {
            check_example_shape(e, 256);
        }
    }
}
