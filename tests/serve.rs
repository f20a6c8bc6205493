//! `edgetune serve` on the real SmolLM2 with two adapters, spoken to over
//! HTTP as an OpenAI client would: concurrent requests for different
//! adapters get exactly what each gets alone; streams, stop sequences and
//! errors follow the OpenAI API.

mod common;

use edgetune::backend::cpu::CpuDecoder;
use edgetune::export::gguf_lora;
use edgetune::infer::random_lora;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

/// The server process, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange: (status, body), the body de-chunked.
fn request(addr: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let payload = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

fn post(addr: &str, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = request(addr, "POST", path, Some(&body));
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn completion(addr: &str, model: &str, prompt: &str, max_tokens: usize) -> String {
    let (status, v) = post(
        addr,
        "/v1/completions",
        json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], model);
    v["choices"][0]["text"].as_str().unwrap().to_owned()
}

#[test]
fn serve_answers_many_adapters_at_once_like_each_alone() {
    let Some(path) = common::model_file("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let model = edgetune::model::Model::open(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let decoder = CpuDecoder::new(&model).unwrap();
    // A strong random adapter as a GGUF file in the adapters folder, the
    // PEFT fixture by name, and a non-adapter file that must be passed over.
    let mut strong = random_lora(decoder.spec(), 8, 5);
    strong.alpha *= 10.0;
    gguf_lora::write(&dir.path().join("strong.gguf"), &strong, false).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not an adapter").unwrap();
    let peft = common::root().join("tests/fixtures/peft/smollm2-lora");
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgetune"))
        .args([
            "serve",
            path.to_str().unwrap(),
            "--port",
            "0",
            "--threads",
            "2",
            "--json",
        ])
        .args([
            "--base-name",
            "base",
            "--adapters",
            dir.path().to_str().unwrap(),
        ])
        .args(["--adapter", &format!("fixture={}:4", peft.display())])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let hello: Value = serde_json::from_str(&line).unwrap();
    let url = hello["listening"].as_str().unwrap();
    let server = Server {
        child,
        addr: url
            .trim_start_matches("http://")
            .trim_end_matches("/v1")
            .to_owned(),
    };
    let addr = server.addr.as_str();
    assert_eq!(hello["models"], json!(["base", "strong", "fixture"]));

    let (status, models) = request(addr, "GET", "/v1/models", None);
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["base", "strong", "fixture"]);

    // Each model alone, then all at once from concurrent clients.
    let asks = [
        ("base", "The capital of France is"),
        ("strong", "The capital of France is"),
        ("fixture", "Once upon a time"),
        ("strong", "Once upon a time"),
    ];
    let alone: Vec<String> = asks
        .iter()
        .map(|(m, p)| completion(addr, m, p, 10))
        .collect();
    assert_ne!(alone[0], alone[1], "the adapter changes the answer");
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = asks
            .iter()
            .map(|(m, p)| s.spawn(move || completion(addr, m, p, 10)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        together, alone,
        "concurrent requests get what each gets alone"
    );

    // A stream: the deltas add up to the same text, then [DONE].
    let (status, sse) = request(
        addr,
        "POST",
        "/v1/completions",
        Some(
            &json!({"model": "strong", "prompt": asks[1].1, "max_tokens": 10, "temperature": 0, "stream": true}),
        ),
    );
    assert_eq!(status, 200);
    let events: Vec<&str> = sse.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let mut streamed = String::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
        streamed.push_str(v["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(streamed, alone[1]);

    // A stop sequence cuts the text before it, with finish_reason "stop".
    let cut = alone[1]
        .char_indices()
        .nth(alone[1].chars().count() / 2)
        .unwrap()
        .0;
    let stop: String = alone[1][cut..].chars().take(2).collect();
    let (status, v) = post(
        addr,
        "/v1/completions",
        json!({"model": "strong", "prompt": asks[1].1, "max_tokens": 10, "temperature": 0, "stop": [stop]}),
    );
    assert_eq!(status, 200);
    let want = &alone[1][..alone[1].find(stop.as_str()).unwrap()];
    assert_eq!(v["choices"][0]["text"], want);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Chat, streamed: role first, content deltas, finish reason, usage.
    let (status, sse) = request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(
            &json!({"model": "fixture", "messages": [{"role": "user", "content": "Hi!"}],
                     "max_tokens": 5, "temperature": 0, "stream": true,
                     "stream_options": {"include_usage": true}}),
        ),
    );
    assert_eq!(status, 200);
    let chunks: Vec<Value> = sse
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = &chunks.last().unwrap()["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() >= 1, "{usage}");
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"].is_string())
    );

    // Errors name what is wrong.
    let (status, v) = post(
        addr,
        "/v1/completions",
        json!({"model": "nope", "prompt": "x"}),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let (status, v) = post(
        addr,
        "/v1/chat/completions",
        json!({"model": "base", "messages": "hi"}),
    );
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("messages"))
    );
    let (status, _) = request(addr, "GET", "/v2/anything", None);
    assert_eq!(status, 404);
}
