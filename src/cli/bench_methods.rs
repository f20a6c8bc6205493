//! `edgetune bench methods`: every PEFT method trained on the same data
//! for the same steps, one `edgetune train` process each (so that each
//! peak RSS is its own), as one table: trainable parameters, peak RSS,
//! tokens/s, final train and eval loss.

use super::{model_path, print_json, progress_bar};
use clap::Args;
use edgetune::Error;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Arguments of `bench methods`.
#[derive(Args)]
pub struct MethodBenchArgs {
    /// GGUF model file [default: models/SmolLM2-135M-Instruct.Q4_1.gguf, or $EDGETUNE_MODEL]
    #[arg(value_name = "MODEL")]
    model: Option<PathBuf>,
    /// Training data, as `train` takes it.
    #[arg(long, default_value = "examples/data/notes.txt")]
    data: PathBuf,
    /// Methods, comma-separated (`+` joins a hybrid, `mezo` trains LoRA with
    /// MeZO) [default: every method, a hybrid and MeZO].
    #[arg(long, value_delimiter = ',')]
    methods: Vec<String>,
    /// Optimizer steps per method.
    #[arg(long, default_value_t = 40)]
    steps: u64,
    /// Sequences per step.
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// One learning rate for every method [default: each method's own,
    /// shown in the table].
    #[arg(long)]
    lr: Option<f32>,
    /// CPU worker threads (default: one per core).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    threads: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Every method, a hybrid, and LoRA trained with MeZO.
const ALL: [&str; 14] = [
    "lora",
    "dora",
    "vera",
    "pissa",
    "loha",
    "lokr",
    "ia3",
    "norm",
    "prompt",
    "prefix",
    "adapter",
    "parallel-adapter",
    "lora+prompt",
    "mezo",
];

/// The learning rate a method trains well with in a short run: 1e-3 for
/// the low-rank methods and adapters (PiSSA 2e-4: its factors start at the
/// weights' principal directions, large), larger for the methods with few
/// parameters (VeRA's paper uses ten times LoRA's; PEFT's (IA)³ and prompt
/// tuning examples 3e-3 and 3e-2).
fn default_lr(method: &str) -> f32 {
    match method {
        "pissa" => 2e-4,
        "vera" | "prefix" => 1e-2,
        "ia3" | "norm" => 3e-3,
        "prompt" => 3e-2,
        _ => 1e-3,
    }
}

/// Peak RSS of the waited child `pid` in bytes, and whether it succeeded.
#[cfg(unix)]
fn wait_rss(child: std::process::Child) -> Result<(bool, Option<u64>), Error> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data filled by the kernel; the child is ours
    // and not waited elsewhere.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        return Err(Error::Invalid(format!(
            "waiting for the training process: {}",
            std::io::Error::last_os_error()
        )));
    }
    // ru_maxrss is in kilobytes on Linux.
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok((ok, Some(usage.ru_maxrss as u64 * 1024)))
}

#[cfg(not(unix))]
fn wait_rss(mut child: std::process::Child) -> Result<(bool, Option<u64>), Error> {
    let s = child
        .wait()
        .map_err(|e| Error::Invalid(format!("waiting: {e}")))?;
    Ok((s.success(), None))
}

pub fn run(a: MethodBenchArgs) -> Result<(), Error> {
    let model = model_path(a.model.as_deref())?;
    let methods: Vec<String> = if a.methods.is_empty() {
        ALL.iter().map(|s| s.to_string()).collect()
    } else {
        a.methods.clone()
    };
    let exe =
        std::env::current_exe().map_err(|e| Error::Invalid(format!("edgetune's path: {e}")))?;
    let tmp = std::env::temp_dir().join(format!("edgetune-bench-methods-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = bench(&a, &model, &methods, &exe, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    let rows = result?;
    if a.json {
        return print_json(&json!({
            "steps": a.steps,
            "batch": a.batch,
            "seq": a.seq,
            "methods": rows,
        }));
    }
    println!(
        "{} steps of {}×{} tokens on {}, eval split 0.1; train loss: mean of the last quarter",
        a.steps,
        a.batch,
        a.seq,
        a.data.display()
    );
    println!();
    println!(
        "| method | lr | trainable params | peak RSS | tokens/s | train loss | eval loss (before → after) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} | {} | {} | {:.0} MiB | {:.0} | {:.3} | {:.3} → {:.3} |",
            r["method"].as_str().unwrap_or(""),
            r["lr"].as_f64().map_or(f32::NAN, |v| v as f32),
            r["params"].as_u64().map_or("?".into(), |p| p.to_string()),
            f("peak_rss_bytes") / (1024.0 * 1024.0),
            f("tokens_per_s"),
            f("train_loss"),
            f("eval_before"),
            f("eval_loss"),
        );
    }
    Ok(())
}

/// Train each of `methods` in its own process under `tmp`: one row each.
fn bench(
    a: &MethodBenchArgs,
    model: &std::path::Path,
    methods: &[String],
    exe: &std::path::Path,
    tmp: &std::path::Path,
) -> Result<Vec<Value>, Error> {
    let pb = progress_bar(methods.len(), "methods");
    let mut rows = Vec::new();
    for m in methods {
        pb.set_message(m.clone());
        let (method, optimizer) = match m.as_str() {
            "mezo" => ("lora".to_string(), "mezo"),
            other => (other.replace('+', ","), "adamw"),
        };
        let lr = a.lr.unwrap_or_else(|| default_lr(m));
        let out = tmp.join(m.replace('+', "_"));
        let mut cmd = Command::new(exe);
        cmd.arg("train")
            .arg(model)
            .arg(&a.data)
            .arg("--out")
            .arg(&out)
            .args(["--method", &method, "--optimizer", optimizer])
            .args(["--steps", &a.steps.to_string()])
            .args(["--batch", &a.batch.to_string(), "--seq", &a.seq.to_string()])
            .args(["--lr", &lr.to_string(), "--eval-split", "0.1"])
            .args(["--device", "cpu", "--threads", &a.threads.to_string()])
            .args(["--seed", "0", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::Invalid(format!("starting {}: {e}", exe.display())))?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let err_thread = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
            s
        });
        let (mut params, mut summary, mut losses) = (None, None, Vec::new());
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            match v["event"].as_str() {
                Some("planned") => params = v["params"].as_u64(),
                Some("step") => losses.extend(v["loss"].as_f64()),
                Some("summary") => summary = Some(v),
                _ => {}
            }
        }
        let (ok, rss) = wait_rss(child)?;
        let err = err_thread.join().unwrap_or_default();
        let Some(s) = summary.filter(|_| ok) else {
            return Err(Error::Invalid(format!(
                "training with {m} failed: {}",
                err.lines().last().unwrap_or("no message")
            )));
        };
        // The mean of the last quarter of steps: one step's loss moves with
        // its batch.
        let tail = &losses[losses.len() - (losses.len() / 4).max(1).min(losses.len())..];
        let train_loss = if tail.is_empty() {
            f64::NAN
        } else {
            tail.iter().sum::<f64>() / tail.len() as f64
        };
        let eval = s["eval_history"]
            .as_array()
            .and_then(|h| h.last())
            .and_then(|p| p[1].as_f64());
        rows.push(json!({
            "method": m,
            "lr": lr,
            "params": params,
            "peak_rss_bytes": rss,
            "tokens_per_s": s["tokens_per_s"],
            "train_loss": train_loss,
            "eval_before": s["eval_before"],
            "eval_loss": eval,
        }));
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(rows)
}
