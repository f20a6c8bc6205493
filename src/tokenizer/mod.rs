//! Text ↔ token ids, built from the tokenizer a GGUF file carries.
//!
//! Two algorithms cover the supported models:
//! - byte-level BPE (`tokenizer.ggml.model = gpt2`, `bpe.rs`): SmolLM2, Llama 3, Qwen;
//! - SentencePiece BPE (`llama`, `spm.rs`): Llama 2, Gemma.
//!
//! Control and user-defined tokens written in the text (`<|im_start|>`,
//! `<start_of_turn>`, Gemma's `\n\n`) are split out first and come out as
//! one id each. The ids match Hugging Face `transformers` loading the same
//! GGUF file, which is what `shared/reference` was made with; where
//! llama.cpp differs, the module docs say so.
//!
//! A tokenizer can be built from plain data ([`TokenizerParts`]) without any
//! file, which is how the unit tests make tiny vocabularies.
//!
//! Chat templates live in [`chat`].

mod bpe;
pub mod chat;
mod parts;
mod special;
mod spm;
mod stream;

pub use chat::{ChatMessage, ChatTemplate};
pub use parts::{MergeOrder, TokenType, TokenizerKind, TokenizerParts};
pub use stream::StreamDecoder;

use crate::gguf::GgufFile;
use crate::{Error, Result};
use special::{Segment, SpecialMatcher};

/// Texts of tokens that end a turn in common chat formats; they count as end
/// of generation when the vocabulary marks them as control tokens.
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|im_end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<EOT>",
];

#[derive(Debug)]
enum Engine {
    Gpt2(Box<bpe::ByteLevelBpe>),
    Llama(Box<spm::SentencePiece>),
}

/// A tokenizer: encodes text to ids and decodes ids to text.
#[derive(Debug)]
pub struct Tokenizer {
    kind: TokenizerKind,
    tokens: Vec<String>,
    types: Vec<TokenType>,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    end_of_generation: Vec<u32>,
    specials: SpecialMatcher,
    engine: Engine,
    warnings: Vec<String>,
}

impl Tokenizer {
    /// The tokenizer stored in a GGUF file's metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
        let parts = TokenizerParts::from_gguf(file)?;
        Tokenizer::from_parts(parts).map_err(|e| {
            Error::Tokenizer(format!("{}: {}", file.path().display(), strip_prefix(&e)))
        })
    }

    /// A tokenizer from plain data; see [`TokenizerParts`].
    pub fn from_parts(p: TokenizerParts) -> Result<Tokenizer> {
        let n = p.tokens.len();
        if n == 0 {
            return Err(Error::Tokenizer("the vocabulary is empty".into()));
        }
        if !p.token_types.is_empty() && p.token_types.len() != n {
            return Err(Error::Tokenizer(format!(
                "{} token types for {n} tokens",
                p.token_types.len()
            )));
        }
        if !p.scores.is_empty() && p.scores.len() != n {
            return Err(Error::Tokenizer(format!(
                "{} scores for {n} tokens",
                p.scores.len()
            )));
        }
        for (name, id) in [
            ("bos", p.bos_id),
            ("eos", p.eos_id),
            ("unk", p.unk_id),
            ("eot", p.eot_id),
            ("eom", p.eom_id),
            ("pad", p.pad_id),
        ] {
            if let Some(id) = id
                && id as usize >= n
            {
                return Err(Error::Tokenizer(format!(
                    "{name} id {id} is outside the vocabulary of {n} tokens"
                )));
            }
        }
        if p.add_bos && p.bos_id.is_none() {
            return Err(Error::Tokenizer(
                "add_bos is set but the vocabulary has no BOS token".into(),
            ));
        }
        if p.add_eos && p.eos_id.is_none() {
            return Err(Error::Tokenizer(
                "add_eos is set but the vocabulary has no EOS token".into(),
            ));
        }
        let types = if p.token_types.is_empty() {
            vec![TokenType::Normal; n]
        } else {
            p.token_types
        };

        // Which tokens are matched verbatim in text (the rule of Hugging Face's
        // GGUF loader): control and user-defined tokens. In a byte-level
        // vocabulary, only those spelled in the byte alphabet; with Gemma's
        // space runs, those are merged from `▁` instead.
        let kind = p.kind;
        let verbatim = |i: usize| -> bool {
            let t = &p.tokens[i];
            let ty = types[i];
            if !matches!(ty, TokenType::Control | TokenType::UserDefined) || t.is_empty() {
                return false;
            }
            match kind {
                TokenizerKind::Gpt2 => bpe::in_byte_alphabet(t),
                TokenizerKind::Llama => !(p.space_run_tokens && spm::is_space_run(t)),
            }
        };
        let specials = SpecialMatcher::new((0..n).filter(|&i| verbatim(i)).map(|i| {
            (
                p.tokens[i].as_str(),
                i as u32,
                types[i] == TokenType::Control,
            )
        }));

        let mut warnings = Vec::new();
        let engine = match kind {
            TokenizerKind::Gpt2 => Engine::Gpt2(Box::new(bpe::ByteLevelBpe::new(
                &p.tokens,
                &p.merges,
                &p.pre,
                &mut warnings,
            )?)),
            TokenizerKind::Llama => Engine::Llama(Box::new(spm::SentencePiece::new(
                &p.tokens,
                &types,
                &p.scores,
                p.merge_order,
                p.space_run_tokens,
                p.unk_id,
            )?)),
        };

        let mut end_of_generation: Vec<u32> = [p.eos_id, p.eot_id, p.eom_id]
            .into_iter()
            .flatten()
            .collect();
        for (i, t) in p.tokens.iter().enumerate() {
            if types[i] == TokenType::Control && END_OF_TURN_TEXTS.contains(&t.as_str()) {
                end_of_generation.push(i as u32);
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();

        Ok(Tokenizer {
            kind,
            tokens: p.tokens,
            types,
            bos: p.bos_id,
            eos: p.eos_id,
            pad: p.pad_id,
            add_bos: p.add_bos,
            add_eos: p.add_eos,
            add_space_prefix: kind == TokenizerKind::Llama && p.add_space_prefix,
            end_of_generation,
            specials,
            engine,
            warnings,
        })
    }

    /// Encode `text`. Special tokens written in the text are recognised; with
    /// `add_special`, BOS/EOS are added where the model's metadata says so
    /// ([`Tokenizer::add_bos`]).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.encode_with(text, add_special, true)
    }

    /// Encode `text`, choosing whether control tokens written in it are
    /// recognised (`parse_special`); when not, `<|im_start|>` is encoded as the
    /// characters it is made of. User-defined tokens are always recognised.
    pub fn encode_with(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        // llama.cpp prefixes a space to text at the start and after a special token.
        let mut after_special = true;
        let mut normalized = String::new();
        for seg in self.specials.split(text, parse_special) {
            match seg {
                Segment::Token(id) => {
                    out.push(id);
                    after_special = true;
                }
                Segment::Text(s) => {
                    match &self.engine {
                        Engine::Gpt2(b) => b.encode(s, &mut out)?,
                        Engine::Llama(m) => {
                            normalized.clear();
                            if self.add_space_prefix && after_special {
                                normalized.push('▁');
                            }
                            for c in s.chars() {
                                normalized.push(if c == ' ' { '▁' } else { c });
                            }
                            m.encode(&normalized, &mut out)?;
                        }
                    }
                    after_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// The bytes token `id` stands for: byte tokens give their byte, `▁` reads
    /// as a space, byte-level tokens are mapped back through the byte
    /// alphabet, control tokens give their text. Out-of-range ids give nothing.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(t) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        match self.kind {
            TokenizerKind::Gpt2 => bpe::token_bytes(t),
            TokenizerKind::Llama => {
                if self.types[id as usize] == TokenType::Byte
                    && let Some(b) = spm::parse_byte_token(t)
                {
                    return vec![b];
                }
                t.replace('▁', " ").into_bytes()
            }
        }
    }

    /// Decode ids to text (invalid UTF-8 becomes U+FFFD). Control tokens
    /// appear as their text, as in Hugging Face's `decode`. For SentencePiece
    /// models with a space prefix, the prefix added by encoding is removed.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        let mut first_text = self.add_space_prefix;
        for &id in ids {
            let b = self.token_bytes(id);
            if first_text && !self.is_control(id) {
                first_text = false;
                if b.first() == Some(&b' ') {
                    bytes.extend_from_slice(&b[1..]);
                    continue;
                }
            }
            bytes.extend_from_slice(&b);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The token's text as stored in the vocabulary (`Ġthe`, `▁the`, `<0x0A>`).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of a token by its vocabulary text (a linear scan).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.tokens.iter().position(|t| t == text).map(|i| i as u32)
    }

    /// The token's type.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Whether the token is a control token (`<bos>`, `<|im_end|>`).
    pub fn is_control(&self, id: u32) -> bool {
        self.token_type(id) == Some(TokenType::Control)
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Padding token, if the model names one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// Whether encoding with special tokens prepends BOS (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether encoding with special tokens appends EOS (`tokenizer.ggml.add_eos_token`).
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Whether generation should stop at this token: EOS, the end-of-turn and
    /// end-of-message tokens the metadata names, and control tokens spelled
    /// like common end-of-turn markers (`<|im_end|>`, `<end_of_turn>`, `<|endoftext|>`…).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    /// All end-of-generation tokens, sorted.
    pub fn end_of_generation_ids(&self) -> &[u32] {
        &self.end_of_generation
    }

    /// The algorithm.
    pub fn tokenizer_kind(&self) -> TokenizerKind {
        self.kind
    }

    /// The algorithm's GGUF name: `"gpt2"` or `"llama"`.
    pub fn kind(&self) -> &'static str {
        self.kind.as_str()
    }

    /// Things the caller may want to show the user, such as an unknown
    /// pre-tokenizer that was replaced by the GPT-2 one.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// A decoder that turns ids arriving one at a time into complete UTF-8 text.
    pub fn stream_decoder(&self) -> StreamDecoder {
        StreamDecoder::new()
    }
}

/// An error's message without the `tokenizer: ` its display adds.
fn strip_prefix(e: &Error) -> String {
    match e {
        Error::Tokenizer(m) => m.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
