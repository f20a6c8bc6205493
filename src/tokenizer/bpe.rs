//! Byte-level BPE (`tokenizer.ggml.model = gpt2`), on the `tokenizers` crate.
//!
//! Text is split by a pre-tokenizer regex, each piece's bytes are spelled in
//! GPT-2's printable byte alphabet, and the merges are applied best first.
//! We hand the merge loop and the regexes to `tokenizers` (the same code the
//! reference ids come from); special tokens are split out before, and
//! decoding is done here with the byte alphabet.

use tokenizers::SplitDelimiterBehavior;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};

use crate::{Error, Result};

/// GPT-2's byte alphabet: byte `b` is spelled `BYTE_CHARS[b]`. Printable
/// Latin-1 bytes stand for themselves; the other 68 map to U+0100.. in order.
pub(crate) fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        out[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(next).expect("U+0100..U+0143 are chars");
            next += 1;
            c
        };
    }
    out
}

/// The byte a character of the byte alphabet stands for.
pub(crate) fn char_byte(c: char) -> Option<u8> {
    let c = c as u32;
    match c {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(c as u8),
        0x100..=0x143 => {
            // The n-th non-printable byte, counted in byte order.
            let n = c - 0x100;
            (0..=255u8)
                .filter(|b| !matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF))
                .nth(n as usize)
        }
        _ => None,
    }
}

/// Whether every character of `token` belongs to the byte alphabet.
pub(crate) fn in_byte_alphabet(token: &str) -> bool {
    token.chars().all(|c| char_byte(c).is_some())
}

/// The bytes a byte-level token stands for. A token outside the alphabet (an
/// added token written in plain text) stands for its own UTF-8, as in
/// Hugging Face's byte-level decoder.
pub(crate) fn token_bytes(token: &str) -> Vec<u8> {
    token
        .chars()
        .map(char_byte)
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| token.as_bytes().to_vec())
}

// Split regexes for byte-level vocabularies, by `tokenizer.ggml.pre`. They are
// the patterns the models' own tokenizers use (as Hugging Face's GGUF loader
// maps them); ByteLevel's built-in GPT-2 pattern covers everything else.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex for a `tokenizer.ggml.pre` value, `Ok(None)` for the plain
/// GPT-2 pattern, `Err` for a name we do not know.
fn split_regex(pre: &str) -> std::result::Result<Option<&'static str>, ()> {
    Ok(match pre {
        // `smollm`: llama.cpp splits every digit first, but Hugging Face's GGUF
        // loader (the reference) uses the plain GPT-2 pattern; the two differ
        // around digits after newlines, and we follow the reference.
        "default" | "gpt2" | "gpt-2" | "smollm" | "" => None,
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "dbrx" | "smaug-bpe" => Some(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2_SPLIT),
        "qwen35" => Some(QWEN35_SPLIT),
        "tekken" => Some(TEKKEN_SPLIT),
        "gpt-4o" | "llama4" => Some(GPT4O_SPLIT),
        _ => return Err(()),
    })
}

/// A byte-level BPE over one vocabulary.
pub(crate) struct ByteLevelBpe {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for ByteLevelBpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteLevelBpe").finish_non_exhaustive()
    }
}

impl ByteLevelBpe {
    /// Build from the vocabulary, merges (`"left right"`, best first) and the
    /// pre-tokenizer name. An unknown `pre` falls back to the GPT-2 pattern
    /// and pushes a warning, as Hugging Face does.
    pub(crate) fn new(
        tokens: &[String],
        merges: &[String],
        pre: &str,
        warnings: &mut Vec<String>,
    ) -> Result<Self> {
        let alphabet = byte_chars();
        let mut vocab = Vocab::default();
        vocab.reserve(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            // A token outside the byte alphabet is plain text; the merges can
            // only ever reach its byte spelling.
            let key = if in_byte_alphabet(t) {
                t.clone()
            } else {
                t.bytes().map(|b| alphabet[b as usize]).collect()
            };
            vocab.insert(key, id as u32);
        }
        let mut pairs = Vec::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            // The separator is the first space after the first character, as
            // llama.cpp reads it.
            let first_len = m.chars().next().map_or(0, char::len_utf8);
            let Some(sp) = m[first_len..].find(' ').map(|p| p + first_len) else {
                return Err(Error::Tokenizer(format!(
                    "merge {i} ({m:?}) has no space separator"
                )));
            };
            pairs.push((m[..sp].to_string(), m[sp + 1..].to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, pairs)
            .build()
            .map_err(|e| Error::Tokenizer(format!("building the byte-level BPE: {e}")))?;

        let pre_tokenizer: PreTokenizerWrapper = match split_regex(pre) {
            Ok(None) => ByteLevel::new(false, true, true).into(),
            Ok(Some(re)) => {
                let split = Split::new(
                    SplitPattern::Regex(re.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex for {pre:?}: {e}")))?;
                Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])
                .into()
            }
            Err(()) => {
                warnings.push(format!(
                    "tokenizer.ggml.pre = {pre:?} is not known; using the GPT-2 pre-tokenizer, \
                     so token ids may differ from the model's own tokenizer"
                ));
                ByteLevel::new(false, true, true).into()
            }
        };
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        Ok(ByteLevelBpe { inner })
    }

    /// Append the ids of plain `text` (no special tokens in it) to `out`.
    pub(crate) fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("byte-level BPE: {e}")))?;
        out.extend_from_slice(enc.get_ids());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_round_trips() {
        let chars = byte_chars();
        for b in 0..=255u8 {
            assert_eq!(char_byte(chars[b as usize]), Some(b), "byte {b}");
        }
        assert_eq!(chars[b' ' as usize], 'Ġ');
        assert_eq!(chars[b'\n' as usize], 'Ċ');
        assert_eq!(token_bytes("Ġhello"), b" hello");
        // Not in the alphabet: the token's own text.
        assert_eq!(token_bytes("東"), "東".as_bytes());
    }

    #[test]
    fn merges_apply_in_rank_order() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc", "Ġ", "Ġa"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // "b c" outranks "a b": "abc" becomes a + bc, then abc.
        let merges: Vec<String> = ["b c", "a bc", "a b", "Ġ a"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let bpe = ByteLevelBpe::new(&tokens, &merges, "gpt2", &mut Vec::new()).unwrap();
        let mut out = Vec::new();
        bpe.encode("abc ab a", &mut out).unwrap();
        // "abc" → a + bc → abc; " ab" → Ġ + ab (a b outranks Ġ a); " a" → Ġa.
        assert_eq!(out, vec![5, 6, 3, 7]);
    }

    #[test]
    fn unknown_pre_warns() {
        let tokens: Vec<String> = ["a"].iter().map(|s| s.to_string()).collect();
        let mut warnings = Vec::new();
        ByteLevelBpe::new(&tokens, &[], "no-such-pre", &mut warnings).unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("no-such-pre"));
    }
}
