//! The memory plan is what the process holds: the measured peak resident
//! set of a training benchmark is within 10% of the planned peak, with and
//! without a budget; a budget too small is refused before any work.

mod common;

use std::process::Command;

fn bench(model: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench",
        "train",
        model,
        "--device",
        "cpu",
        "--threads",
        "2",
        "--batch",
        "2",
        "--seq",
        "128",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = Command::new(env!("CARGO_BIN_EXE_edgetune"))
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[cfg(target_os = "linux")]
#[test]
fn measured_peak_memory_is_the_plan() {
    let Some(model) = common::model_file("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let model = model.display().to_string();
    for extra in [&[][..], &["--memory-budget", "300MB"][..]] {
        let r = bench(&model, extra);
        let p = &r["plan"];
        let plan: u64 = ["weights", "adapter", "activations", "workspace", "runtime"]
            .iter()
            .map(|k| p[k].as_u64().unwrap())
            .sum();
        let rss = r["peak_rss"].as_u64().unwrap();
        let ratio = rss as f64 / plan as f64;
        eprintln!(
            "{extra:?}: plan {} MB, peak RSS {} MB ({:.1}%)",
            plan >> 20,
            rss >> 20,
            100.0 * ratio
        );
        assert!(
            (0.9..=1.1).contains(&ratio),
            "peak RSS {rss} vs plan {plan}"
        );
        if !extra.is_empty() {
            assert!(plan <= 300 << 20, "the plan fits the budget");
            assert!(p["recomputed_layers"].as_u64().unwrap() > 0);
        }
    }

    // Too small: refused before any work, naming the budget that would fit.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let data = common::root().join("examples/data/chat.jsonl");
    let o = Command::new(env!("CARGO_BIN_EXE_edgetune"))
        .args([
            "train",
            &model,
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--memory-budget",
            "120MB",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("at least"), "{err}");
    assert!(!out.exists(), "nothing was written");
}
