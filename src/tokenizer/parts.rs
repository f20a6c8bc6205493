//! The plain data a tokenizer is built from, and reading it from GGUF metadata.

use crate::gguf::{GgufFile, Value};
use crate::{Error, Result};

/// Which tokenizer algorithm a vocabulary is for (`tokenizer.ggml.model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// Byte-level BPE with merges (`gpt2`): GPT-2, SmolLM, Llama 3, Qwen.
    Gpt2,
    /// SentencePiece BPE with scores and byte fallback (`llama`): Llama 2, Gemma.
    Llama,
}

impl TokenizerKind {
    /// The GGUF name: `"gpt2"` or `"llama"`.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenizerKind::Gpt2 => "gpt2",
            TokenizerKind::Llama => "llama",
        }
    }
}

/// A token's type as GGUF stores it (`tokenizer.ggml.token_type`, llama.cpp's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// 0: not specified.
    Undefined = 0,
    /// 1: an ordinary piece of text.
    Normal = 1,
    /// 2: the unknown token.
    Unknown = 2,
    /// 3: a control token (`<bos>`, `<|im_start|>`): matched whole in text, never produced by merges.
    Control = 3,
    /// 4: a user-defined token (`\n\n`, `<think>`): matched whole in text.
    UserDefined = 4,
    /// 5: reserved, never produced.
    Unused = 5,
    /// 6: one raw byte, spelled `<0xXX>`.
    Byte = 6,
}

impl TokenType {
    /// The type for a GGUF integer; unknown numbers read as [`TokenType::Undefined`].
    pub fn from_i64(v: i64) -> TokenType {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }
}

/// Which candidate merge a SentencePiece vocabulary applies first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeOrder {
    /// Highest `tokenizer.ggml.scores` first (SentencePiece, llama.cpp).
    Score,
    /// Lowest token id first. Hugging Face builds Gemma's merges this way: the
    /// file's order is the merge order, while the scores of its user-defined
    /// tokens (whitespace runs) are a flat -1000 that would misplace them.
    VocabOrder,
}

/// Everything needed to build a [`super::Tokenizer`], as plain Rust data.
///
/// [`TokenizerParts::new`] fills in llama.cpp's defaults for the kind;
/// [`TokenizerParts::from_gguf`] reads a model file's metadata.
#[derive(Debug, Clone)]
pub struct TokenizerParts {
    /// The algorithm.
    pub kind: TokenizerKind,
    /// `tokenizer.ggml.pre`: the byte-level pre-tokenizer name (gpt2 only).
    pub pre: String,
    /// Token texts, indexed by id.
    pub tokens: Vec<String>,
    /// Token types, indexed by id; empty means every token is [`TokenType::Normal`].
    pub token_types: Vec<TokenType>,
    /// SentencePiece scores, indexed by id; empty means all zero.
    pub scores: Vec<f32>,
    /// Byte-level BPE merges, best first, each `"left right"` (gpt2 only).
    pub merges: Vec<String>,
    /// Beginning-of-sequence token.
    pub bos_id: Option<u32>,
    /// End-of-sequence token.
    pub eos_id: Option<u32>,
    /// Unknown token, used for characters with no piece and no byte token.
    pub unk_id: Option<u32>,
    /// End-of-turn token (`tokenizer.ggml.eot_token_id`), if the model names one.
    pub eot_id: Option<u32>,
    /// End-of-message token (`tokenizer.ggml.eom_token_id`), if the model names one.
    pub eom_id: Option<u32>,
    /// Padding token.
    pub pad_id: Option<u32>,
    /// Whether encoding with special tokens prepends BOS.
    pub add_bos: bool,
    /// Whether encoding with special tokens appends EOS.
    pub add_eos: bool,
    /// SentencePiece: prefix the text (and text right after a special token) with a space.
    pub add_space_prefix: bool,
    /// SentencePiece: which merge applies first.
    pub merge_order: MergeOrder,
    /// SentencePiece: tokens made only of whitespace including a space (Gemma's
    /// `"  "`, `"   "`…) stand for runs of `▁` in the merges, instead of being
    /// matched verbatim in text. This is how Hugging Face loads Gemma files.
    pub space_run_tokens: bool,
}

impl TokenizerParts {
    /// Parts for `tokens` with llama.cpp's defaults for `kind`: SentencePiece
    /// gets BOS 1, EOS 2, UNK 0, `add_bos` and a space prefix; byte-level BPE
    /// gets no special ids and adds nothing.
    pub fn new(kind: TokenizerKind, tokens: Vec<String>) -> TokenizerParts {
        let n = tokens.len() as u32;
        let llama = kind == TokenizerKind::Llama;
        let default_id = |id: u32| (llama && id < n).then_some(id);
        TokenizerParts {
            kind,
            pre: "default".to_string(),
            tokens,
            token_types: Vec::new(),
            scores: Vec::new(),
            merges: Vec::new(),
            bos_id: default_id(1),
            eos_id: default_id(2),
            unk_id: default_id(0),
            eot_id: None,
            eom_id: None,
            pad_id: None,
            add_bos: llama,
            add_eos: false,
            add_space_prefix: llama,
            merge_order: MergeOrder::Score,
            space_run_tokens: false,
        }
    }

    /// Read the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
    ///
    /// Absent flags take llama.cpp's defaults for the model type. Files whose
    /// `general.architecture` is `gemma`, `gemma2` or `gemma3` get Hugging
    /// Face's Gemma treatment ([`MergeOrder::VocabOrder`] and
    /// [`TokenizerParts::space_run_tokens`]), which the reference ids follow.
    pub fn from_gguf(file: &GgufFile) -> Result<TokenizerParts> {
        let model = meta_str(file, "tokenizer.ggml.model")?.ok_or_else(|| {
            err(
                file,
                "no tokenizer.ggml.model: the file carries no tokenizer",
            )
        })?;
        let kind = match model {
            "gpt2" => TokenizerKind::Gpt2,
            "llama" => TokenizerKind::Llama,
            other => {
                return Err(err(
                    file,
                    &format!(
                        "tokenizer.ggml.model = {other:?} is not supported (supported: gpt2, llama)"
                    ),
                ));
            }
        };
        let tokens = meta_array(file, "tokenizer.ggml.tokens")?
            .ok_or_else(|| err(file, "no tokenizer.ggml.tokens"))?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(err(
                    file,
                    &format!("tokenizer.ggml.tokens[{i}] is not a string"),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let n = tokens.len();
        let mut p = TokenizerParts::new(kind, tokens);

        if let Some(pre) = meta_str(file, "tokenizer.ggml.pre")? {
            p.pre = pre.to_string();
        }
        if let Some(arr) = meta_array(file, "tokenizer.ggml.token_type")? {
            check_len(file, "tokenizer.ggml.token_type", arr.len(), n)?;
            p.token_types = arr
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    value_i64(v).map(TokenType::from_i64).ok_or_else(|| {
                        err(
                            file,
                            &format!("tokenizer.ggml.token_type[{i}] is not an integer"),
                        )
                    })
                })
                .collect::<Result<_>>()?;
        }
        if let Some(arr) = meta_array(file, "tokenizer.ggml.scores")? {
            check_len(file, "tokenizer.ggml.scores", arr.len(), n)?;
            p.scores = arr
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    value_f64(v).map(|x| x as f32).ok_or_else(|| {
                        err(file, &format!("tokenizer.ggml.scores[{i}] is not a number"))
                    })
                })
                .collect::<Result<_>>()?;
        }
        if let Some(arr) = meta_array(file, "tokenizer.ggml.merges")? {
            p.merges = arr
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(err(
                        file,
                        &format!("tokenizer.ggml.merges[{i}] is not a string"),
                    )),
                })
                .collect::<Result<_>>()?;
        } else if kind == TokenizerKind::Gpt2 {
            return Err(err(
                file,
                "tokenizer.ggml.model = gpt2 but tokenizer.ggml.merges is missing",
            ));
        }

        let id = |key: &str, default: Option<u32>| -> Result<Option<u32>> {
            match meta_int(file, key)? {
                None => Ok(default),
                // llama.cpp writes -1 (or u32::MAX) for "no such token".
                Some(v) if v < 0 || v == u32::MAX as i64 => Ok(None),
                Some(v) if (v as usize) < n => Ok(Some(v as u32)),
                Some(v) => Err(err(
                    file,
                    &format!("{key} = {v} is outside the vocabulary of {n} tokens"),
                )),
            }
        };
        p.bos_id = id("tokenizer.ggml.bos_token_id", p.bos_id)?;
        p.eos_id = id("tokenizer.ggml.eos_token_id", p.eos_id)?;
        p.unk_id = id("tokenizer.ggml.unknown_token_id", p.unk_id)?;
        p.eot_id = id("tokenizer.ggml.eot_token_id", None)?;
        p.eom_id = id("tokenizer.ggml.eom_token_id", None)?;
        p.pad_id = id("tokenizer.ggml.padding_token_id", None)?;
        if let Some(b) = meta_bool(file, "tokenizer.ggml.add_bos_token")? {
            p.add_bos = b;
        }
        if let Some(b) = meta_bool(file, "tokenizer.ggml.add_eos_token")? {
            p.add_eos = b;
        }
        if let Some(b) = meta_bool(file, "tokenizer.ggml.add_space_prefix")? {
            p.add_space_prefix = b;
        }
        let arch = meta_str(file, "general.architecture")?.unwrap_or("");
        if kind == TokenizerKind::Llama && matches!(arch, "gemma" | "gemma2" | "gemma3") {
            p.merge_order = MergeOrder::VocabOrder;
            p.space_run_tokens = true;
        }
        Ok(p)
    }
}

fn err(file: &GgufFile, msg: &str) -> Error {
    Error::Tokenizer(format!("{}: {msg}", file.path().display()))
}

fn check_len(file: &GgufFile, key: &str, len: usize, n: usize) -> Result<()> {
    if len == n {
        Ok(())
    } else {
        Err(err(
            file,
            &format!("{key} has {len} entries but tokenizer.ggml.tokens has {n}"),
        ))
    }
}

fn meta_str<'a>(file: &'a GgufFile, key: &str) -> Result<Option<&'a str>> {
    match file.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(err(file, &format!("{key} is not a string"))),
    }
}

fn meta_array<'a>(file: &'a GgufFile, key: &str) -> Result<Option<&'a [Value]>> {
    match file.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a.as_slice())),
        Some(_) => Err(err(file, &format!("{key} is not an array"))),
    }
}

fn meta_int(file: &GgufFile, key: &str) -> Result<Option<i64>> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => value_i64(v)
            .map(Some)
            .ok_or_else(|| err(file, &format!("{key} is not an integer"))),
    }
}

fn meta_bool(file: &GgufFile, key: &str) -> Result<Option<bool>> {
    match file.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => value_i64(v)
            .map(|x| Some(x != 0))
            .ok_or_else(|| err(file, &format!("{key} is not a bool"))),
    }
}

fn value_i64(v: &Value) -> Option<i64> {
    Some(match *v {
        Value::U8(x) => x as i64,
        Value::I8(x) => x as i64,
        Value::U16(x) => x as i64,
        Value::I16(x) => x as i64,
        Value::U32(x) => x as i64,
        Value::I32(x) => x as i64,
        Value::U64(x) => i64::try_from(x).ok()?,
        Value::I64(x) => x,
        _ => return None,
    })
}

fn value_f64(v: &Value) -> Option<f64> {
    match *v {
        Value::F32(x) => Some(x as f64),
        Value::F64(x) => Some(x),
        _ => value_i64(v).map(|x| x as f64),
    }
}
