//! A training run killed with SIGKILL and resumed from its last checkpoint
//! writes the same adapter, byte for byte, as the run that was never
//! interrupted (CPU, same seed).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn args<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        model,
        data,
        "--out",
        out,
        "--steps",
        "6",
        "--batch",
        "2",
        "--seq",
        "48",
        "--rank",
        "4",
        "--layers",
        "4",
        "--targets",
        "q,v,down",
        "--dropout",
        "0.1",
        "--lr",
        "1e-3",
        "--save-every",
        "1",
        "--eval-split",
        "0.2",
        "--eval-every",
        "2",
        "--device",
        "cpu",
        "--threads",
        "2",
        "--seed",
        "7",
        "--json",
    ]
}

#[cfg(unix)]
#[test]
fn sigkill_then_resume_gives_the_uninterrupted_adapter() {
    let Some(model) = common::model_file("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let model = model.display().to_string();
    let data = common::root()
        .join("examples/data/prompt_completion.jsonl")
        .display()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let (whole, killed) = (dir.path().join("whole"), dir.path().join("killed"));
    let (whole, killed) = (whole.display().to_string(), killed.display().to_string());

    let o = Command::new(env!("CARGO_BIN_EXE_edgetune"))
        .args(args(&model, &data, &whole))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Kill the second run as soon as its third checkpoint is on disk (the
    // process is then in the middle of step 4).
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgetune"))
        .args(args(&model, &data, &killed))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = 0;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("\"event\":\"checkpoint\"") {
            seen += 1;
            if seen == 3 {
                // SAFETY: plain kill(2) on our own child.
                unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                break;
            }
        }
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run was killed");
    let ckpt = std::path::Path::new(&killed).join("checkpoint.bin");
    assert!(ckpt.exists());
    assert!(!std::path::Path::new(&killed).join("adapter.gguf").exists());

    let mut resume = args(&model, &data, &killed);
    resume.push("--resume");
    let o = Command::new(env!("CARGO_BIN_EXE_edgetune"))
        .args(&resume)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    // It resumed: steps 1–3 were not run again.
    assert!(!stdout.contains("\"step\":1,"), "{stdout}");
    assert!(stdout.contains("\"step\":6,"), "{stdout}");

    let a = std::fs::read(std::path::Path::new(&whole).join("adapter.gguf")).unwrap();
    let b = std::fs::read(std::path::Path::new(&killed).join("adapter.gguf")).unwrap();
    assert_eq!(a.len(), b.len());
    assert!(
        a == b,
        "the resumed adapter differs from the uninterrupted one"
    );
    // And the adapter actually trained (B is not all zeros).
    let f = edgetune::export::gguf_lora::read(&std::path::Path::new(&whole).join("adapter.gguf"))
        .unwrap();
    assert!(f.pairs.iter().any(|p| p.b.iter().any(|&v| v != 0.0)));
}
