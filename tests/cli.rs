//! The `edgetune` binary: help, JSON output, errors and exit codes.

mod common;

use common::root;
use std::process::{Command, Output};

fn edgetune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgetune"))
        .args(args)
        .current_dir(root())
        .env_remove("EDGETUNE_MODEL")
        .output()
        .expect("run edgetune")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn model(file: &str) -> Option<String> {
    common::model_file(file).map(|p| p.display().to_string())
}

#[test]
fn every_command_has_help_with_device() {
    let o = edgetune(&["--help"]);
    assert!(o.status.success());
    for cmd in ["info", "generate", "score", "bench"] {
        assert!(stdout(&o).contains(cmd), "top-level help lists {cmd}");
        let o = edgetune(&[cmd, "--help"]);
        assert!(o.status.success(), "{cmd} --help");
        assert!(
            stdout(&o).contains("--device"),
            "{cmd} --help shows --device"
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    let o = edgetune(&["generate", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2));
    let o = edgetune(&["info", "--device", "tpu"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn a_file_that_is_not_gguf_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("notes.gguf");
    std::fs::write(&bad, b"these are my notes, not a model").unwrap();
    let o = edgetune(&["info", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("notes.gguf") && err.contains("magic"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // A directory given as the model.
    let o = edgetune(&["info", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
    let o = edgetune(&["info", dir.path().join("missing.gguf").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("missing.gguf"));
}

#[test]
fn info_json_describes_smollm2() {
    let Some(m) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let o = edgetune(&["info", &m, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["supported"], true);
    assert_eq!(v["tensor_types"]["Q4_1"], 210);
    assert_eq!(v["tensor_types"]["Q8_0"], 1);
    assert_eq!(v["hyperparameters"]["block_count"], 30);
    assert_eq!(v["tokenizer"], "gpt2");
    assert_eq!(v["chat_template"], true);
    // Without MODEL, the default model in models/ is used.
    let o = edgetune(&["info", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("SmolLM2-135M-Instruct.Q4_1.gguf"));
}

#[test]
fn generate_greedy_and_json() {
    let Some(m) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let o = edgetune(&[
        "generate",
        &m,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    // The reference's greedy continuation starts " Paris.\n".
    assert_eq!(v["tokens"], serde_json::json!([7042, 30, 198]));
    assert_eq!(v["text"], " Paris.\n");
    // Absurd thread counts are refused before any thread is spawned.
    let o = edgetune(&["generate", &m, "--prompt", "hi", "--threads", "100000"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("worker threads"), "{}", stderr(&o));
    // Streaming prints the same text.
    let o = edgetune(&[
        "generate",
        &m,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "3",
        "--device",
        "cpu",
    ]);
    assert!(o.status.success());
    assert!(stdout(&o).starts_with(" Paris.\n"), "{}", stdout(&o));
}

#[test]
fn chat_without_template_names_the_fix() {
    let Some(m) = model("gemma-3-270m-Q4_K_M.gguf") else {
        return;
    };
    let o = edgetune(&["generate", &m, "--chat", "--prompt", "hi"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--chat-template"), "{}", stderr(&o));
    // With an explicit template it runs.
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t.jinja");
    std::fs::write(&t, "{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}<start_of_turn>model\n").unwrap();
    let o = edgetune(&[
        "generate",
        &m,
        "--chat-template",
        t.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-tokens",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn score_json_and_bad_arguments() {
    let Some(m) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(8),
    )
    .unwrap();
    let o = edgetune(&[
        "score",
        &m,
        text.to_str().unwrap(),
        "--context",
        "128",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let (tokens, nll, ppl) = (
        v["tokens"].as_u64().unwrap(),
        v["nll"].as_f64().unwrap(),
        v["perplexity"].as_f64().unwrap(),
    );
    // The CLI reports what the library's tokenizer counts.
    let model = edgetune::model::Model::open(&m).unwrap();
    let tok = edgetune::tokenizer::Tokenizer::from_gguf(model.file()).unwrap();
    let want = tok
        .encode(&std::fs::read_to_string(&text).unwrap(), false)
        .unwrap()
        .len() as u64;
    assert_eq!(tokens, want);
    assert!(nll > 0.0 && (ppl - nll.exp()).abs() < 1e-9 * ppl);
    // A repeated sentence becomes predictable: far below the ~15 of real text.
    assert!(ppl < 5.0, "{ppl}");

    let o = edgetune(&["score", &m, "no/such/file.txt"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no/such/file.txt"));
    let o = edgetune(&["score", &m, text.to_str().unwrap(), "--context", "1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--context"));
    let o = edgetune(&["score", &m, text.to_str().unwrap(), "--context", "100000"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("context"), "{}", stderr(&o));
}

/// Whether this machine must have a GPU (CI sets it, with software Vulkan).
fn gpu_required() -> bool {
    std::env::var_os("EDGETUNE_REQUIRE_GPU").is_some()
}

#[test]
fn info_devices_lists_adapters() {
    let o = edgetune(&["info", "--devices", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let list = v.as_array().unwrap();
    if gpu_required() {
        assert!(!list.is_empty(), "no adapter listed");
    }
    for a in list {
        assert!(a["max_storage_binding"].as_u64().unwrap() > 0);
        assert!(a["name"].as_str().is_some_and(|n| !n.is_empty()));
    }
    let o = edgetune(&["info", "--devices"]);
    assert!(o.status.success());
    if gpu_required() {
        assert!(stdout(&o).contains("storage binding"), "{}", stdout(&o));
    }
}

#[test]
fn score_on_the_gpu_matches_the_cpu() {
    let Some(m) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let text = root().join("tests/reference/texts/mpl-2.0-head.txt");
    let short: String = std::fs::read_to_string(text)
        .unwrap()
        .chars()
        .take(200)
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("short.txt");
    std::fs::write(&file, short).unwrap();
    let score = |device: &str| {
        let o = edgetune(&[
            "score",
            &m,
            file.to_str().unwrap(),
            "--device",
            device,
            "--json",
        ]);
        (o.status.code(), stdout(&o), stderr(&o))
    };
    let (code, out, err) = score("gpu");
    if code != Some(0) && !gpu_required() && err.contains("gpu:") {
        eprintln!("skipping: {err}");
        return;
    }
    assert_eq!(code, Some(0), "{err}");
    let gpu: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (code, out, err) = score("cpu");
    assert_eq!(code, Some(0), "{err}");
    let cpu: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (g, c) = (
        gpu["perplexity"].as_f64().unwrap(),
        cpu["perplexity"].as_f64().unwrap(),
    );
    eprintln!("score --device gpu {g:.5}, --device cpu {c:.5}");
    assert_eq!(gpu["tokens"], cpu["tokens"]);
    assert!((g - c).abs() / c < 1e-3, "gpu {g} vs cpu {c}");

    // GPU options with the CPU forced, and an adapter that does not exist:
    // failures that name what was at fault.
    let file = file.to_str().unwrap();
    for (extra, named) in [
        (
            &["--device", "cpu", "--gpu-adapter", "x"][..],
            "--gpu-adapter",
        ),
        (&["--device", "cpu", "--kv-f16"][..], "--kv-f16"),
        (&["--gpu-adapter", "no-such-gpu"][..], "no-such-gpu"),
    ] {
        let o = edgetune(&[&["score", &m, file][..], extra].concat());
        assert_eq!(o.status.code(), Some(1), "{extra:?}");
        assert!(stderr(&o).contains(named), "{}", stderr(&o));
    }
}

#[test]
fn looking_for_a_gpu_prints_no_driver_noise_without_a_desktop_session() {
    // Mesa's Vulkan drivers probe for Wayland while adapters are listed; with
    // no XDG_RUNTIME_DIR (servers, CI) libwayland would print "error: …".
    let o = Command::new(env!("CARGO_BIN_EXE_edgetune"))
        .args(["info", "--devices"])
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("run edgetune");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("XDG_RUNTIME_DIR"), "{}", stderr(&o));
}
