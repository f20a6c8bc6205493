//! The OpenAI API's JSON as `serve` speaks it: requests of
//! `/v1/completions` and `/v1/chat/completions` parsed into a [`Job`]
//! (errors name the field), and the response and stream-chunk bodies.

use crate::infer::{GenerateOptions, SamplingParams};
use crate::tokenizer::ChatMessage;
use serde_json::{Value, json};

/// What a request asks the engine to generate.
#[derive(Debug, Clone)]
pub struct Job {
    /// The model name asked for (an adapter's, or the base's).
    pub model: String,
    /// Plain text or a chat.
    pub prompt: Prompt,
    /// Generation options.
    pub opts: GenerateOptions,
    /// Stop sequences: generation ends before the first one.
    pub stop: Vec<String>,
    /// Stream the answer as server-sent events.
    pub stream: bool,
    /// Include a `usage` object in the last chunk of a stream.
    pub stream_usage: bool,
}

/// A request's prompt.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// `/v1/completions`: text continued as is.
    Text(String),
    /// `/v1/chat/completions`: rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// An invalid request: HTTP status, OpenAI error type, the field at fault.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// What is wrong.
    pub message: String,
    /// The request field at fault.
    pub param: Option<String>,
    /// OpenAI's error code (`model_not_found`, …).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            param: Some(param.into()),
            code: None,
        }
    }

    /// An error about no field in particular.
    pub fn status(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// The JSON body OpenAI clients expect.
    pub fn body(&self) -> Value {
        let kind = match self.status {
            400 | 404 | 405 | 422 => "invalid_request_error",
            503 => "server_busy",
            _ => "server_error",
        };
        json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// Limits the server applies to requests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `max_tokens` of a completion that names none (OpenAI's is 16).
    pub completion_max_tokens: usize,
    /// `max_tokens` of a chat that names none, and the most any request gets.
    pub max_tokens: usize,
}

/// Parse a `/v1/completions` body.
pub fn parse_completion(body: &[u8], limits: &Limits) -> Result<Job, ApiError> {
    let v = object(body)?;
    let prompt = match v.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_owned()
        }
        Some(Value::Array(_)) => {
            return Err(ApiError::field(
                "prompt",
                "only one prompt per request is supported (a string, or an array of one string)",
            ));
        }
        Some(_) => return Err(ApiError::field("prompt", "prompt must be a string")),
        None => return Err(ApiError::field("prompt", "prompt is required")),
    };
    if v.get("echo").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::field("echo", "echo is not supported"));
    }
    if v.get("logprobs").is_some_and(|l| !l.is_null()) {
        return Err(ApiError::field("logprobs", "logprobs are not supported"));
    }
    common(
        &v,
        Prompt::Text(prompt),
        limits.completion_max_tokens,
        limits,
    )
}

/// Parse a `/v1/chat/completions` body.
pub fn parse_chat(body: &[u8], limits: &Limits) -> Result<Job, ApiError> {
    let v = object(body)?;
    let Some(Value::Array(list)) = v.get("messages") else {
        return Err(ApiError::field(
            "messages",
            "messages must be an array of {role, content}",
        ));
    };
    if list.is_empty() {
        return Err(ApiError::field("messages", "messages is empty"));
    }
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::field(&at, format!("{at}.role must be a string")))?;
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            // Content parts: the text ones, joined.
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::field(
                                &at,
                                format!("{at}.content: only text parts are supported"),
                            ));
                        }
                    }
                }
                text
            }
            Some(Value::Null) | None => String::new(),
            Some(_) => {
                return Err(ApiError::field(
                    &at,
                    format!("{at}.content must be a string"),
                ));
            }
        };
        messages.push(ChatMessage::new(role, &content));
    }
    if v.get("logprobs").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::field("logprobs", "logprobs are not supported"));
    }
    if v.get("tools").is_some_and(|t| !t.is_null()) {
        return Err(ApiError::field("tools", "tools are not supported"));
    }
    common(&v, Prompt::Chat(messages), limits.max_tokens, limits)
}

fn object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::field("body", "the body must be a JSON object")),
        Err(e) => Err(ApiError::field(
            "body",
            format!("the body is not valid JSON: {e}"),
        )),
    }
}

/// The fields both endpoints share.
fn common(
    v: &serde_json::Map<String, Value>,
    prompt: Prompt,
    default_max: usize,
    limits: &Limits,
) -> Result<Job, ApiError> {
    let model = match v.get("model") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => String::new(),
        Some(_) => return Err(ApiError::field("model", "model must be a string")),
    };
    let number = |name: &str| -> Result<Option<f64>, ApiError> {
        match v.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| ApiError::field(name, format!("{name} must be a number"))),
        }
    };
    let count = |name: &str| -> Result<Option<usize>, ApiError> {
        match number(name)? {
            None => Ok(None),
            Some(x) if x >= 0.0 && x.fract() == 0.0 => Ok(Some(x as usize)),
            Some(x) => Err(ApiError::field(
                name,
                format!("{name} must be a whole number ≥ 0, got {x}"),
            )),
        }
    };
    if let Some(n) = count("n")?
        && n != 1
    {
        return Err(ApiError::field("n", "only n = 1 is supported"));
    }
    for p in ["presence_penalty", "frequency_penalty"] {
        if number(p)?.is_some_and(|x| x != 0.0) {
            return Err(ApiError::field(p, format!("{p} is not supported (only 0)")));
        }
    }
    let max_tokens = count("max_completion_tokens")?
        .or(count("max_tokens")?)
        .unwrap_or(default_max);
    if max_tokens == 0 {
        return Err(ApiError::field(
            "max_tokens",
            "max_tokens must be at least 1",
        ));
    }
    // Clients often ask for more than a small local model needs: clamp to
    // the server's limit, as llama.cpp's server does, rather than refuse.
    let max_tokens = max_tokens.min(limits.max_tokens);
    let temperature = number("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::field(
            "temperature",
            format!("temperature must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = number("top_p")?.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&top_p) {
        return Err(ApiError::field(
            "top_p",
            format!("top_p must be in [0, 1], got {top_p}"),
        ));
    }
    // top_p 0 keeps only the most likely token: greedy.
    let (temperature, top_p) = if top_p as f32 > 0.0 {
        (temperature, top_p)
    } else {
        (0.0, 1.0)
    };
    let top_k = count("top_k")?.unwrap_or(0);
    let seed = match v.get("seed") {
        None | Some(Value::Null) => fresh_seed(),
        Some(x) => x
            .as_u64()
            .or_else(|| x.as_i64().map(|i| i as u64))
            .ok_or_else(|| ApiError::field("seed", "seed must be an integer"))?,
    };
    let stop = match v.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::field("stop", "stop must be a string or an array of strings")
            })?,
        Some(_) => {
            return Err(ApiError::field(
                "stop",
                "stop must be a string or an array of strings",
            ));
        }
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::field(
            "stop",
            "at most 4 stop sequences, none empty",
        ));
    }
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let stream_usage = v
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(Job {
        model,
        prompt,
        opts: GenerateOptions {
            max_tokens,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_k,
                top_p: top_p as f32,
                seed,
            },
            stop_at_end: true,
        },
        stop,
        stream,
        stream_usage,
    })
}

/// A seed for a request that names none: different every time, as OpenAI's.
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
}

impl Usage {
    fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// Which endpoint a response belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/completions`.
    Completion,
    /// `/v1/chat/completions`.
    Chat,
}

/// Identity of one response: id, creation time, model name.
#[derive(Debug, Clone)]
pub struct Head {
    /// Endpoint.
    pub kind: Kind,
    /// `cmpl-…` or `chatcmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model name as requested.
    pub model: String,
}

impl Head {
    /// A new response identity.
    pub fn new(kind: Kind, model: &str, n: u64) -> Head {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let prefix = match kind {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        };
        Head {
            kind,
            id: format!("{prefix}-{created:x}{n:06x}"),
            created,
            model: model.to_owned(),
        }
    }

    /// The whole (non-streamed) response.
    pub fn response(&self, text: &str, finish: &str, usage: Usage) -> Value {
        let choice = match self.kind {
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Completion => "text_completion", Kind::Chat => "chat.completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage.json(),
        })
    }

    /// One chunk of a stream: text, or the end (`finish`), with `usage` on
    /// the end chunk when asked for. The first chat chunk carries the role.
    pub fn chunk(
        &self,
        text: &str,
        first: bool,
        finish: Option<&str>,
        usage: Option<Usage>,
    ) -> Value {
        let choice = match self.kind {
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
            Kind::Chat => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        };
        let mut v = json!({
            "id": self.id,
            "object": match self.kind { Kind::Completion => "text_completion", Kind::Chat => "chat.completion.chunk" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if let Some(u) = usage {
            v["usage"] = u.json();
        }
        v
    }
}

impl Head {
    /// The chunk after the last one of a stream that asked for usage
    /// (`stream_options.include_usage`): no choices, the token counts.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        let mut v = self.chunk("", false, None, None);
        v["choices"] = json!([]);
        v["usage"] = usage.json();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        completion_max_tokens: 16,
        max_tokens: 512,
    };

    #[test]
    fn a_completion_request_becomes_a_job() {
        let j = parse_completion(
            br#"{"model":"notes","prompt":"Hi","max_tokens":5,"temperature":0,"seed":3,"stop":["\n"],"stream":true}"#,
            &LIMITS,
        )
        .unwrap();
        assert_eq!(j.model, "notes");
        assert!(matches!(j.prompt, Prompt::Text(ref t) if t == "Hi"));
        assert_eq!((j.opts.max_tokens, j.opts.sampling.seed), (5, 3));
        assert_eq!(j.opts.sampling.temperature, 0.0);
        assert_eq!(j.stop, vec!["\n".to_string()]);
        assert!(j.stream);
        let j = parse_completion(br#"{"prompt":["Hi"]}"#, &LIMITS).unwrap();
        assert_eq!(j.opts.max_tokens, 16, "OpenAI's default for completions");
        assert_eq!(
            j.opts.sampling.temperature, 1.0,
            "OpenAI's default temperature"
        );
        let j =
            parse_completion(br#"{"prompt":"Hi","max_tokens":4096,"top_p":0}"#, &LIMITS).unwrap();
        assert_eq!(j.opts.max_tokens, 512, "clamped to the server's limit");
        assert_eq!(j.opts.sampling.temperature, 0.0, "top_p 0 is greedy");
    }

    #[test]
    fn a_chat_request_takes_string_and_text_part_contents() {
        let j = parse_chat(
            br#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi "},{"type":"text","text":"there"}]}],"max_completion_tokens":7}"#,
            &LIMITS,
        )
        .unwrap();
        let Prompt::Chat(m) = j.prompt else { panic!() };
        assert_eq!(
            (m[1].role.as_str(), m[1].content.as_str()),
            ("user", "Hi there")
        );
        assert_eq!(j.opts.max_tokens, 7);
    }

    #[test]
    fn bad_requests_name_the_field() {
        let cases: [(&[u8], &str); 10] = [
            (b"{", "body"),
            (b"[1]", "body"),
            (br#"{"prompt":3}"#, "prompt"),
            (br#"{"prompt":["a","b"]}"#, "prompt"),
            (br#"{"prompt":"a","n":2}"#, "n"),
            (br#"{"prompt":"a","max_tokens":-1}"#, "max_tokens"),
            (br#"{"prompt":"a","max_tokens":1.5}"#, "max_tokens"),
            (br#"{"prompt":"a","temperature":"hot"}"#, "temperature"),
            (br#"{"prompt":"a","top_p":1.5}"#, "top_p"),
            (br#"{"prompt":"a","stop":[1]}"#, "stop"),
        ];
        for (body, field) in cases {
            let e = parse_completion(body, &LIMITS).unwrap_err();
            assert_eq!(
                e.param.as_deref(),
                Some(field),
                "{}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(e.status, 400);
        }
        let e = parse_chat(br#"{"messages":[{"content":"x"}]}"#, &LIMITS).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0]"));
        assert!(e.message.contains("messages[0].role"), "{}", e.message);
    }

    #[test]
    fn responses_have_the_openai_shape() {
        let h = Head::new(Kind::Chat, "notes", 1);
        let r = h.response(
            "Hello",
            "stop",
            Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
            },
        );
        assert_eq!(r["object"], "chat.completion");
        assert_eq!(r["choices"][0]["message"]["content"], "Hello");
        assert_eq!(r["usage"]["total_tokens"], 5);
        let c = h.chunk("He", true, None, None);
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["choices"][0]["delta"]["role"], "assistant");
        let end = h.chunk("", false, Some("length"), Some(Usage::default()));
        assert_eq!(end["choices"][0]["finish_reason"], "length");
        assert!(end["usage"].is_object());
        let t = Head::new(Kind::Completion, "base", 2).chunk("x", true, None, None);
        assert_eq!(
            (t["object"].as_str(), t["choices"][0]["text"].as_str()),
            (Some("text_completion"), Some("x"))
        );
    }
}
