//! Chat templates: turning a conversation into the prompt text a model was
//! trained on, with the Jinja template stored in `tokenizer.chat_template`.
//!
//! Rendering follows Hugging Face's `apply_chat_template`: Jinja with
//! `trim_blocks` and `lstrip_blocks`, the variables `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, the function
//! `raise_exception(msg)`, a `tojson` filter, and Python string methods
//! (`.strip()`, `.startswith()`…) through `minijinja-contrib`'s `pycompat`.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use super::Tokenizer;
use crate::gguf::GgufFile;
use crate::{Error, Result};

const TEMPLATE_NAME: &str = "chat_template";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, or whatever roles the template knows.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compile `source`; `bos_token`/`eos_token` are the texts the template
    /// sees as `bos_token` and `eos_token`.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<ChatTemplate> {
        let source = source.into();
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| Error::Template(format!("cannot parse the template: {e}")))?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The template in a GGUF file's `tokenizer.chat_template`, with the
    /// file's BOS and EOS texts; `Ok(None)` when the file has none.
    pub fn from_gguf(file: &GgufFile) -> Result<Option<ChatTemplate>> {
        let Some(source) = file.get_str("tokenizer.chat_template") else {
            return Ok(None);
        };
        let token_text = |key: &str| -> String {
            let tokens = file.get_array("tokenizer.ggml.tokens");
            file.get_u64(key)
                .and_then(|id| {
                    tokens?
                        .get(usize::try_from(id).ok()?)?
                        .as_str()
                        .map(str::to_string)
                })
                .unwrap_or_default()
        };
        let bos = token_text("tokenizer.ggml.bos_token_id");
        let eos = token_text("tokenizer.ggml.eos_token_id");
        ChatTemplate::new(source, bos, eos)
            .map(Some)
            .map_err(|e| Error::Template(format!("{}: {}", file.path().display(), message(&e))))
    }

    /// A template read from a file: the Jinja text itself, or a Hugging Face
    /// `tokenizer_config.json` holding a `chat_template` string. BOS and EOS
    /// are empty until [`ChatTemplate::with_special_tokens`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<ChatTemplate> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let source = if path.extension().is_some_and(|x| x == "json") {
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Template(format!("{}: not JSON: {e}", path.display())))?;
            match v.get("chat_template") {
                Some(serde_json::Value::String(s)) => s.clone(),
                _ => {
                    return Err(Error::Template(format!(
                        "{}: no \"chat_template\" string in this JSON file",
                        path.display()
                    )));
                }
            }
        } else {
            text
        };
        ChatTemplate::new(source, "", "")
            .map_err(|e| Error::Template(format!("{}: {}", path.display(), message(&e))))
    }

    /// The template to use for a model: `override_file` when given, else the
    /// model's own; a model without one is an [`Error::Template`] that says
    /// to pass `--chat-template FILE`. BOS/EOS texts come from `tokenizer`.
    pub fn for_model(
        file: &GgufFile,
        tokenizer: &Tokenizer,
        override_file: Option<&Path>,
    ) -> Result<ChatTemplate> {
        let t = match override_file {
            Some(p) => ChatTemplate::from_file(p)?,
            None => {
                ChatTemplate::from_gguf(file)?.ok_or_else(|| ChatTemplate::missing(file.path()))?
            }
        };
        Ok(t.with_special_tokens_of(tokenizer))
    }

    /// The error for a model file that has no chat template.
    pub fn missing(model: &Path) -> Error {
        Error::Template(format!(
            "{} has no chat template (tokenizer.chat_template); pass one with --chat-template FILE",
            model.display()
        ))
    }

    /// Set the texts the template sees as `bos_token` and `eos_token`.
    pub fn with_special_tokens(
        mut self,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> ChatTemplate {
        self.bos_token = bos_token.into();
        self.eos_token = eos_token.into();
        self
    }

    /// Take `bos_token` and `eos_token` from a tokenizer's vocabulary.
    pub fn with_special_tokens_of(self, tokenizer: &Tokenizer) -> ChatTemplate {
        let text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.token_str(i))
                .unwrap_or("")
                .to_string()
        };
        let (bos, eos) = (text(tokenizer.bos_id()), text(tokenizer.eos_id()));
        self.with_special_tokens(bos, eos)
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render `messages`; with `add_generation_prompt`, end with the header
    /// that opens the assistant's turn. Encode the result with
    /// `add_special = false`: the template writes any BOS itself.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| Value::from_object(MessageObject(m.clone())))
            .collect();
        let ctx = minijinja::context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(ctx)
            .map_err(|e| Error::Template(render_error(&e)))
    }

    /// [`render`](Self::render) and encode: the token ids of a chat prompt,
    /// with no special tokens added beyond those the template writes.
    pub fn encode(
        &self,
        tokenizer: &Tokenizer,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        tokenizer.encode(&self.render(messages, add_generation_prompt)?, false)
    }
}

/// A message as the template sees it: a map with `role` then `content`, in
/// that order (as a Python dict would be, which `tojson` shows).
#[derive(Debug)]
struct MessageObject(ChatMessage);

impl Object for MessageObject {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.0.role.as_str())),
            "content" => Some(Value::from(self.0.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

fn message(e: &Error) -> String {
    match e {
        Error::Template(m) => m.clone(),
        other => other.to_string(),
    }
}

/// A render error's message; for `raise_exception` just the template's words.
fn render_error(e: &minijinja::Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) if d.starts_with("raise_exception: ") => {
            d.trim_start_matches("raise_exception: ").to_string()
        }
        _ => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                let _ = write!(s, ": {inner}");
                src = inner.source();
            }
            s
        }
    }
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("raise_exception: {msg}"),
    ))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, which is
/// what Hugging Face's `tojson` filter calls.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, &value, indent, 0)?;
    Ok(out)
}

fn write_json(
    out: &mut String,
    v: &Value,
    indent: Option<usize>,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&v.to_string()),
        ValueKind::String => write_json_str(out, v.as_str().unwrap_or_default()),
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json_str(out, &k.to_string());
                out.push_str(": ");
                write_json(out, &v.get_item(k)?, indent, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        _ => write_json_str(out, &v.to_string()),
    }
    Ok(())
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let out = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(
                &[
                    ChatMessage::new("system", "S"),
                    ChatMessage::new("user", "Hi"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn trims_blocks_like_transformers() {
        let src = "{% for m in messages %}\n  {% if m.role == 'user' %}\nU:{{ m.content }}\n  {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "x")], false).unwrap(),
            "U:x\n"
        );
    }

    #[test]
    fn gemma_style_template_with_python_methods() {
        let src = "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}{{ '<start_of_turn>' + role + '\n' + m['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}{{ messages[0]['content'].strip().startswith('a') }}";
        let t = ChatTemplate::new(src, "<bos>", "<eos>").unwrap();
        let out = t
            .render(&[ChatMessage::new("user", " a b ")], true)
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\na b<end_of_turn>\n<start_of_turn>model\nTrue"
        );
        let err = t
            .render(&[ChatMessage::new("assistant", "x")], true)
            .unwrap_err();
        match err {
            Error::Template(m) => assert_eq!(
                m,
                "Conversation roles must alternate user/assistant/user/assistant/..."
            ),
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn tojson_matches_python() {
        let t = ChatTemplate::new(
            "{{ messages | tojson }}|{{ {'a': [1, 2.5, none, true]} | tojson(indent=2) }}",
            "",
            "",
        )
        .unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "é \"q\"\n")], false)
            .unwrap();
        assert_eq!(
            out,
            "[{\"role\": \"user\", \"content\": \"é \\\"q\\\"\\n\"}]|{\n  \"a\": [\n    1,\n    2.5,\n    null,\n    true\n  ]\n}"
        );
    }

    #[test]
    fn template_errors_are_values() {
        match ChatTemplate::new("{% for %}", "", "") {
            Err(Error::Template(m)) => assert!(m.contains("cannot parse"), "{m}"),
            other => panic!("expected a template error, got {other:?}"),
        }
        let missing = ChatTemplate::missing(Path::new("m.gguf")).to_string();
        assert!(missing.contains("--chat-template FILE"), "{missing}");
        let t = ChatTemplate::new("{{ messages[0].content.nosuchmethod() }}", "", "").unwrap();
        assert!(matches!(
            t.render(&[ChatMessage::new("user", "x")], false),
            Err(Error::Template(_))
        ));
    }

    #[test]
    fn reads_template_files() {
        let dir = tempfile::tempdir().unwrap();
        let jinja = dir.path().join("t.jinja");
        std::fs::write(&jinja, "{{ bos_token }}{{ messages[0].content }}").unwrap();
        let t = ChatTemplate::from_file(&jinja)
            .unwrap()
            .with_special_tokens("<s>", "</s>");
        assert_eq!(
            t.render(&[ChatMessage::new("user", "x")], false).unwrap(),
            "<s>x"
        );
        let json = dir.path().join("tokenizer_config.json");
        std::fs::write(&json, r#"{"chat_template": "[{{ messages | length }}]"}"#).unwrap();
        let t = ChatTemplate::from_file(&json).unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "x")], true).unwrap(),
            "[1]"
        );
        assert!(matches!(
            ChatTemplate::from_file(dir.path().join("none.jinja")),
            Err(Error::Io { .. })
        ));
    }
}
