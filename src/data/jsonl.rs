//! JSON lines: `{"text"}`, `{"prompt", "completion"}` and `{"messages"}`
//! objects, one per line, and which of their tokens are loss targets.

use std::path::Path;

use serde_json::{Map, Value};

use super::{Builder, read_text};
use crate::tokenizer::{ChatMessage, ChatTemplate};
use crate::{Error, Result};

/// The roles a `messages` line may use.
const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// How far past an assistant turn to look for its end-of-turn token when the
/// template writes it after the message rather than inside it.
const END_OF_TURN_LOOKAHEAD: usize = 8;

/// Read every non-empty line of `path` into `b`.
pub(super) fn load(path: &Path, template: Option<&ChatTemplate>, b: &mut Builder) -> Result<()> {
    let text = read_text(path)?;
    if text.trim_start().starts_with('[') {
        return Err(Error::Invalid(format!(
            "{}: this is a JSON array; write one JSON object per line (JSON Lines) instead",
            path.display()
        )));
    }
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let loc = format!("{}:{}", path.display(), i + 1);
        let (tokens, trainable) = line_example(line, template, b)
            .map_err(|e| Error::Invalid(format!("{loc}: {}", message(&e))))?;
        if !trainable.iter().skip(1).any(|&t| t) {
            return Err(Error::Invalid(format!(
                "{loc}: every token is masked out; there is nothing to train on"
            )));
        }
        b.push(tokens, trainable, loc);
    }
    Ok(())
}

/// An error's text without the variant's prefix for [`Error::Invalid`].
fn message(e: &Error) -> String {
    match e {
        Error::Invalid(m) => m.clone(),
        other => other.to_string(),
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

/// The tokens of one line and their mask (before windowing). Errors carry
/// no location; the caller adds it.
fn line_example(
    line: &str,
    template: Option<&ChatTemplate>,
    b: &Builder,
) -> Result<(Vec<u32>, Vec<bool>)> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| invalid(format!("invalid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(invalid(format!(
            "expected a JSON object, found {}",
            kind(&value)
        )));
    };
    let has = |k: &str| obj.contains_key(k);
    let shapes: Vec<&str> = [
        (has("text"), "\"text\""),
        (
            has("prompt") || has("completion"),
            "\"prompt\"/\"completion\"",
        ),
        (has("messages"), "\"messages\""),
    ]
    .into_iter()
    .filter_map(|(present, name)| present.then_some(name))
    .collect();
    match shapes.as_slice() {
        [] => {
            let keys: Vec<String> = obj.keys().map(|k| format!("{k:?}")).collect();
            Err(invalid(format!(
                "no \"text\", \"prompt\"/\"completion\" or \"messages\" field (found {})",
                if keys.is_empty() {
                    "no fields".to_string()
                } else {
                    keys.join(", ")
                }
            )))
        }
        [_] if has("text") => text_example(&obj, b),
        [_] if has("messages") => messages_example(&obj, template, b),
        [_] => prompt_example(&obj, b),
        many => Err(invalid(format!(
            "mixes the fields {}; use exactly one of {{\"text\"}}, {{\"prompt\", \"completion\"}} \
             or {{\"messages\"}}",
            many.join(" and ")
        ))),
    }
}

/// The JSON type of `v`, for messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Field `key` of `obj` as a non-blank string; `what` names it in errors.
fn string_field<'v>(obj: &'v Map<String, Value>, key: &str, what: &str) -> Result<&'v str> {
    match obj.get(key) {
        None => Err(invalid(format!("missing field \"{key}\"{what}"))),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err(invalid(format!("empty \"{key}\"{what}")))
        }
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(invalid(format!(
            "\"{key}\"{what} must be a string, found {}",
            kind(v)
        ))),
    }
}

/// `{"text"}`: every token trained.
fn text_example(obj: &Map<String, Value>, b: &Builder) -> Result<(Vec<u32>, Vec<bool>)> {
    let text = string_field(obj, "text", "")?;
    let tokens = b.with_eos(b.tok.encode(text, true)?);
    let trainable = vec![true; tokens.len()];
    Ok((tokens, trainable))
}

/// `{"prompt", "completion"}`: encode(prompt, specials) ++ encode(completion) ++ EOS,
/// the completion and EOS trained.
fn prompt_example(obj: &Map<String, Value>, b: &Builder) -> Result<(Vec<u32>, Vec<bool>)> {
    let prompt = string_field(obj, "prompt", "")?;
    let completion = string_field(obj, "completion", "")?;
    let mut tokens = b.tok.encode(prompt, true)?;
    // A model that appends EOS to every encoding must not end the prompt with it.
    if b.tok.add_eos() && tokens.last() == b.tok.eos_id().as_ref() {
        tokens.pop();
    }
    let n_prompt = tokens.len();
    tokens.extend(b.tok.encode(completion, false)?);
    let tokens = b.with_eos(tokens);
    let mut trainable = vec![true; tokens.len()];
    if !b.opts.train_on_prompt {
        trainable[..n_prompt].fill(false);
    }
    Ok((tokens, trainable))
}

/// `{"messages"}` rendered with the chat template, the assistant turns trained.
///
/// Assistant turn `i` spans the text between the render of `messages[..i]`
/// with the generation prompt and the render of `messages[..=i]` without it;
/// both must be prefixes of the whole conversation's render. The whole
/// render is encoded once, and each span edge is found by encoding the
/// prefix: when BPE merges a token across the edge, that token is trained.
fn messages_example(
    obj: &Map<String, Value>,
    template: Option<&ChatTemplate>,
    b: &Builder,
) -> Result<(Vec<u32>, Vec<bool>)> {
    let messages = parse_messages(obj)?;
    let Some(template) = template else {
        return Err(invalid(
            "a \"messages\" line needs a chat template, and the model has none \
             (pass one with --chat-template FILE)",
        ));
    };
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err(invalid(
            "the conversation has no assistant turn to train on",
        ));
    }
    let render = |msgs: &[ChatMessage], gen_prompt: bool| {
        template
            .render(msgs, gen_prompt)
            .map_err(|e| invalid(e.to_string()))
    };
    let full = render(&messages, false)?;
    let tokens = b.tok.encode(&full, false)?;
    let mut trainable = vec![b.opts.train_on_prompt; tokens.len()];
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = render(&messages[..i], true)?;
        let through = render(&messages[..=i], false)?;
        if !full.starts_with(&before)
            || !through.starts_with(&before)
            || !full.starts_with(&through)
        {
            return Err(invalid(format!(
                "the chat template does not render the conversation up to message {} as a \
                 prefix of the whole, so the assistant's tokens cannot be found",
                i + 1
            )));
        }
        let (start, _) = common_prefix(&tokens, &b.tok.encode(&before, false)?);
        let (end, exact) = common_prefix(&tokens, &b.tok.encode(&through, false)?);
        let end = if exact { end } else { end + 1 }.min(tokens.len());
        // Tokenizing the longer text may merge differently before the edge.
        spans.push((start, end.max(start)));
    }
    let mut tokens = tokens;
    let n_spans = spans.len();
    for (k, (start, mut end)) in spans.into_iter().enumerate() {
        trainable[start..end].fill(true);
        let eog = |t: &u32| b.tok.is_end_of_generation(*t);
        if tokens[start..end].iter().any(eog) {
            continue;
        }
        // The end-of-turn token must be trained, so the model learns to stop.
        let ahead = (end + END_OF_TURN_LOOKAHEAD).min(tokens.len());
        if let Some(j) = tokens[end..ahead].iter().position(eog) {
            end += j + 1;
            trainable[start..end].fill(true);
        } else if k + 1 == n_spans
            && end == tokens.len()
            && let Some(eos) = b.tok.eos_id()
        {
            tokens.push(eos);
            trainable.push(true);
        }
    }
    Ok((tokens, trainable))
}

/// How many leading tokens `full` and `prefix` share, and whether that is all of `prefix`.
fn common_prefix(full: &[u32], prefix: &[u32]) -> (usize, bool) {
    let n = full.iter().zip(prefix).take_while(|(a, b)| a == b).count();
    (n, n == prefix.len())
}

/// The `messages` array as chat messages, every field checked.
fn parse_messages(obj: &Map<String, Value>) -> Result<Vec<ChatMessage>> {
    let list = match obj.get("messages") {
        Some(Value::Array(list)) => list,
        Some(v) => {
            return Err(invalid(format!(
                "\"messages\" must be an array, found {}",
                kind(v)
            )));
        }
        None => return Err(invalid("missing field \"messages\"")),
    };
    if list.is_empty() {
        return Err(invalid("\"messages\" is empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let what = format!(" in message {}", i + 1);
        let Value::Object(m) = m else {
            return Err(invalid(format!(
                "message {} must be an object, found {}",
                i + 1,
                kind(m)
            )));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) => r.as_str(),
            None => return Err(invalid(format!("missing field \"role\"{what}"))),
            Some(v) => {
                return Err(invalid(format!(
                    "\"role\"{what} must be a string, found {}",
                    kind(v)
                )));
            }
        };
        if !ROLES.contains(&role) {
            return Err(invalid(format!(
                "unknown role {role:?}{what} (expected \"system\", \"user\" or \"assistant\")"
            )));
        }
        let content = string_field(m, "content", &what)?;
        out.push(ChatMessage::new(role, content));
    }
    Ok(out)
}
