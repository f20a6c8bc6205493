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
    for cmd in ["info", "generate", "score", "bench", "train"] {
        assert!(stdout(&o).contains(cmd), "top-level help lists {cmd}");
        let o = edgetune(&[cmd, "--help"]);
        assert!(o.status.success(), "{cmd} --help");
        assert!(
            stdout(&o).contains("--device"),
            "{cmd} --help shows --device"
        );
    }
    assert!(stdout(&o).contains("plan"), "top-level help lists plan");
    let o = edgetune(&["plan", "--help"]);
    assert!(o.status.success());
    for opt in ["--rank", "--targets", "--memory-budget", "--recompute"] {
        assert!(stdout(&o).contains(opt), "plan --help shows {opt}");
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

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[test]
fn plan_breaks_the_peak_down_and_refuses_a_budget_too_small() {
    let Some(m) = model(SMOLLM2) else {
        return;
    };
    let o = edgetune(&["plan", &m, "--threads", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for row in [
        "weights",
        "adapter",
        "activations",
        "workspace",
        "runtime",
        "total",
        "micro-batch",
        "recomputed",
    ] {
        assert!(out.contains(row), "no {row} in:\n{out}");
    }

    let budget = 400u64 << 20;
    let o = edgetune(&[
        "plan",
        &m,
        "--threads",
        "2",
        "--rank",
        "4",
        "--targets",
        "q,v",
        "--memory-budget",
        "400MB",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let part = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"));
    let sum: u64 = ["weights", "adapter", "activations", "workspace", "runtime"]
        .iter()
        .map(|k| part(k))
        .sum();
    assert_eq!(part("total"), sum);
    assert!(part("total") <= budget, "{v}");
    assert_eq!(part("budget"), budget);
    assert_eq!(part("layers"), 30);
    // 4 sequences of 256 tokens need ~1.2 GB unrecomputed: the budget forced
    // a smaller micro-batch or recomputation, keeping the effective batch.
    let (micro, accum) = (part("micro_batch"), part("grad_accum"));
    assert_eq!(micro * accum, 4, "{v}");
    assert!(micro < 4 || part("recomputed_layers") > 0, "{v}");
    // rank 4 on q and v of 30 layers: (576·4 + 4·576) + (576·4 + 4·192) each.
    assert_eq!(part("params"), 30 * (2 * 576 * 4 + 4 * (576 + 192)));

    let o = edgetune(&["plan", &m, "--memory-budget", "100MB"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("at least"), "{}", stderr(&o));
    let o = edgetune(&["plan", &m, "--method", "lora,dropout"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("unknown method 'dropout'"),
        "{}",
        stderr(&o)
    );
    let o = edgetune(&["plan", &m, "--method", "lora,dora"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("rewrite the same linears"),
        "{}",
        stderr(&o)
    );
    let o = edgetune(&["plan", &m, "--memory-budget", "12 parsecs"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn train_names_a_bad_data_line_before_any_work() {
    let Some(m) = model(SMOLLM2) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tiny.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"The sky is\", \"completion\": \" blue.\"}\n{\"prompt\": \"no completion\"\n",
    )
    .unwrap();
    let out = dir.path().join("run");
    let o = edgetune(&[
        "train",
        &m,
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("tiny.jsonl:2"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    // Options refused before the model is read.
    let o = edgetune(&[
        "train",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--gpu-adapter",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--gpu-adapter"), "{}", stderr(&o));
    let o = edgetune(&[
        "train",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "2",
        "--epochs",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(2));
}

/// `train --json` lines, parsed.
fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn train_writes_an_adapter_that_generate_and_score_apply() {
    let Some(m) = model(SMOLLM2) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let train = |extra: &[&str]| {
        let args = [
            &[
                "train",
                &m,
                "examples/data/prompt_completion.jsonl",
                "--out",
                out_s,
                "--steps",
                "2",
                "--batch",
                "1",
                "--seq",
                "64",
                "--rank",
                "4",
                "--json",
                "--threads",
                "2",
            ][..],
            extra,
        ]
        .concat();
        edgetune(&args)
    };
    let o = train(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let events = json_lines(&o);
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["planned", "step", "step", "summary"], "{events:?}");
    assert_eq!(events[0]["total_steps"], 2);
    assert_eq!(events[0]["memory"]["micro_batch"], 1);
    assert_eq!(events[2]["step"], 2);
    assert_eq!(events[3]["steps"], 2);
    assert!(events[3]["first_loss"].as_f64().unwrap().is_finite());
    for f in ["adapter.gguf", "loss.svg", "train.json", "checkpoint.bin"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let adapter = out.join("adapter.gguf");
    let adapter_s = adapter.to_str().unwrap();

    let o = edgetune(&[
        "generate",
        &m,
        "--adapter",
        adapter_s,
        "--device",
        "cpu",
        "-n",
        "4",
        "--prompt",
        "Hello",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = edgetune(&[
        "generate",
        &m,
        "--adapter",
        adapter_s,
        "--device",
        "gpu",
        "-n",
        "4",
        "-p",
        "Hello",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--device cpu"), "{}", stderr(&o));
    let o = edgetune(&[
        "generate",
        &m,
        "--adapter",
        dir.path().join("missing.gguf").to_str().unwrap(),
        "-p",
        "Hello",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("missing.gguf"), "{}", stderr(&o));

    // At strength 0 the adapter adds nothing: the same perplexity exactly.
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog.").unwrap();
    let ppl = |extra: &[&str]| {
        let args = [
            &[
                "score",
                &m,
                text.to_str().unwrap(),
                "--device",
                "cpu",
                "--json",
            ][..],
            extra,
        ]
        .concat();
        let o = edgetune(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        v["perplexity"].as_f64().unwrap()
    };
    let zero = format!("{adapter_s}:0");
    assert_eq!(ppl(&[]), ppl(&["--adapter", &zero]));

    // The folder holds a run: another one there is refused, untouched.
    let before = std::fs::read(&adapter).unwrap();
    let o = train(&[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&adapter).unwrap(), before);
}

#[cfg(unix)]
#[test]
fn ctrl_c_checkpoints_and_resume_finishes_the_run() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let Some(m) = model(SMOLLM2) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = [
        "train",
        &m,
        "examples/data/prompt_completion.jsonl",
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "8",
        "--batch",
        "1",
        "--seq",
        "32",
        "--rank",
        "2",
        "--targets",
        "q,v",
        "--json",
        "--threads",
        "2",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgetune"))
        .args(args)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Interrupt once the first step is done.
    for line in lines.by_ref() {
        if line.unwrap().contains("\"event\":\"step\"") {
            break;
        }
    }
    // SAFETY: signalling the child this test spawned and still owns.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        rest.iter().any(|l| l.contains("\"event\":\"checkpoint\"")),
        "{rest:?}"
    );
    assert!(
        err.contains("stopped at step") && err.contains("--resume"),
        "{err}"
    );
    assert!(out.join("checkpoint.bin").is_file());
    assert!(!out.join("adapter.gguf").exists());

    let o = edgetune(&[&args[..], &["--resume"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let events = json_lines(&o);
    let start = events[0]["start_step"].as_u64().unwrap();
    assert!((1..8).contains(&start), "{events:?}");
    let steps = events.iter().filter(|e| e["event"] == "step").count() as u64;
    assert_eq!(start + steps, 8);
    assert_eq!(events.last().unwrap()["steps"], 8);
    assert!(out.join("adapter.gguf").is_file());
}

#[test]
fn import_export_and_adapters_info_round_trip_a_peft_adapter() {
    let Some(m) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("a.gguf");
    let peft_dir = tmp.path().join("peft");
    let (g, p) = (gguf.to_str().unwrap(), peft_dir.to_str().unwrap());
    let fixture = "tests/fixtures/peft/smollm2-lora";
    let o = edgetune(&["import", fixture, "--out", g, "--model", &m, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        (v["rank"].as_u64(), v["pairs"].as_u64()),
        (Some(2), Some(14))
    );

    let o = edgetune(&["export", g, "--format", "peft", "--out", p, "--model", &m]);
    assert!(o.status.success(), "{}", stderr(&o));
    let written = std::fs::read(peft_dir.join("adapter_model.safetensors")).unwrap();
    // A second export refuses to replace the files and leaves them as they were.
    let o = edgetune(&["export", g, "--format", "peft", "--out", p, "--model", &m]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("adapter_config.json exists") && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read(peft_dir.join("adapter_model.safetensors")).unwrap(),
        written
    );

    // info reads both formats alike.
    let info = |path: &str| {
        let o = edgetune(&["adapters", "info", path, "--model", &m, "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let mut v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        v.as_object_mut()
            .unwrap()
            .retain(|k, _| k != "path" && k != "format");
        v
    };
    assert_eq!(info(g), info(p));
    assert_eq!(info(g)["layers"], serde_json::json!([0, 29]));

    let o = edgetune(&["adapters", "ls", tmp.path().to_str().unwrap()]);
    assert!(o.status.success());
    let ls = stdout(&o);
    assert!(
        ls.contains("a.gguf") && ls.contains("peft") && ls.lines().count() == 2,
        "{ls}"
    );

    // generate applies a PEFT directory as it does a GGUF adapter.
    let tokens = |adapter: &str| {
        let o = edgetune(&[
            "generate",
            &m,
            "-p",
            "The capital of France is",
            "--max-tokens",
            "6",
            "--adapter",
            adapter,
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        v["tokens"].clone()
    };
    assert_eq!(tokens(p), tokens(g));
}

#[test]
fn merge_reports_its_logit_error_and_never_overwrites() {
    let Some(m) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged.gguf");
    let o_path = out.to_str().unwrap();
    let fixture = "tests/fixtures/peft/smollm2-lora";
    let o = edgetune(&[
        "merge", &m, fixture, "--out", o_path, "--type", "q8_0", "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["merged_tensors"], 14);
    assert_eq!(v["types"], serde_json::json!(["Q8_0"]));
    let err = v["max_abs_logit_error"].as_f64().unwrap();
    assert!(err > 0.0 && err < 1.0, "q8_0 merge error {err}");
    let before = std::fs::metadata(&out).unwrap().modified().unwrap();
    let o = edgetune(&["merge", &m, fixture, "--out", o_path]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(std::fs::metadata(&out).unwrap().modified().unwrap(), before);
    let o = edgetune(&["merge", &m, fixture, "--out", &m, "--force"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "merging over the base itself is refused"
    );
}
