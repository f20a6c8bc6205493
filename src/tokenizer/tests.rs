//! Tokenizers built from tiny hand-made vocabularies.

use super::*;
use crate::gguf::{GgufWriter, Value, ValueType};

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A Gemma-like SentencePiece vocabulary: controls, user-defined newlines and
/// a space run, 256 byte tokens, then pieces.
fn gemma_like() -> TokenizerParts {
    let mut tokens = strings(&[
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
        "\n",
        "\n\n",
        "  ",
    ]);
    let mut types = vec![TokenType::Control; 6];
    types.extend([TokenType::UserDefined; 3]);
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(TokenType::Byte);
    }
    for p in [
        "▁", "h", "i", "▁h", "hi", "▁hi", "é", "user", "us", "er", "u", "s", "e", "r",
    ] {
        tokens.push(p.to_string());
        types.push(TokenType::Normal);
    }
    let mut p = TokenizerParts::new(TokenizerKind::Llama, tokens);
    p.token_types = types;
    p.bos_id = Some(2);
    p.eos_id = Some(1);
    p.unk_id = Some(3);
    p.add_space_prefix = false;
    p.merge_order = MergeOrder::VocabOrder;
    p.space_run_tokens = true;
    p
}

fn piece(t: &Tokenizer, s: &str) -> u32 {
    t.token_id(s).unwrap_or_else(|| panic!("no piece {s:?}"))
}

#[test]
fn spm_special_tokens_bos_and_byte_fallback() {
    let t = Tokenizer::from_parts(gemma_like()).unwrap();
    assert_eq!(t.kind(), "llama");
    let ids = t
        .encode("<start_of_turn>user\n hi  hi\n\n東", true)
        .unwrap();
    let byte = |b: u8| 9 + b as u32;
    let expect = vec![
        2,
        4,
        piece(&t, "user"),
        6,
        piece(&t, "▁hi"),
        8, // "  " merged from ▁▁, not matched verbatim
        piece(&t, "hi"),
        7,
        byte(0xE6),
        byte(0x9D),
        byte(0xB1),
    ];
    assert_eq!(ids, expect);
    assert_eq!(t.decode(&ids), "<bos><start_of_turn>user\n hi  hi\n\n東");
    assert_eq!(t.decode(&ids[1..]), "<start_of_turn>user\n hi  hi\n\n東");
    // Without add_special: no BOS; without parse_special: control text is plain text.
    assert_eq!(t.encode("hi", false).unwrap(), vec![piece(&t, "hi")]);
    let plain = t.encode_with("<eos>", false, false).unwrap();
    assert!(!plain.contains(&1));
    assert_eq!(t.decode(&plain), "<eos>");
}

#[test]
fn spm_space_prefix_like_llama_cpp() {
    let mut p = gemma_like();
    p.add_space_prefix = true;
    p.merge_order = MergeOrder::Score;
    p.space_run_tokens = false;
    p.scores = (0..p.tokens.len()).map(|i| -(i as f32)).collect();
    let t = Tokenizer::from_parts(p).unwrap();
    let ids = t.encode("hi<end_of_turn>hi", false).unwrap();
    assert_eq!(ids, vec![piece(&t, "▁hi"), 5, piece(&t, "▁hi")]);
    assert_eq!(t.decode(&ids), "hi<end_of_turn> hi");
    assert_eq!(t.decode(&t.encode("hi hi", true).unwrap()), "<bos>hi hi");
}

#[test]
fn add_eos_and_metadata_flags() {
    let mut p = gemma_like();
    p.add_bos = false;
    p.add_eos = true;
    let t = Tokenizer::from_parts(p).unwrap();
    assert_eq!(t.encode("hi", true).unwrap(), vec![piece(&t, "hi"), 1]);
    assert_eq!(t.encode("", true).unwrap(), vec![1]);
    assert!(!t.add_bos());

    let mut p = gemma_like();
    p.bos_id = None;
    assert!(matches!(Tokenizer::from_parts(p), Err(Error::Tokenizer(_))));
    let mut p = gemma_like();
    p.eos_id = Some(100_000);
    assert!(matches!(Tokenizer::from_parts(p), Err(Error::Tokenizer(_))));
}

#[test]
fn end_of_generation_tokens() {
    let t = Tokenizer::from_parts(gemma_like()).unwrap();
    assert!(t.is_end_of_generation(1)); // <eos>
    assert!(t.is_end_of_generation(5)); // <end_of_turn>, a control token
    assert!(!t.is_end_of_generation(4));
    assert!(!t.is_end_of_generation(2));
    assert_eq!(t.eos_id(), Some(1));
    assert_eq!(t.bos_id(), Some(2));
}

/// A byte-level vocabulary: the 256 byte characters, a few merges and ChatML tokens.
fn gpt2_like() -> TokenizerParts {
    let alphabet = bpe::byte_chars();
    let mut tokens = strings(&["<|endoftext|>", "<|im_start|>", "<|im_end|>"]);
    let mut types = vec![TokenType::Control; 3];
    for c in alphabet {
        tokens.push(c.to_string());
        types.push(TokenType::Normal);
    }
    let merges = ["Ġ h", "h i", "Ġh i", "ð Ł"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(TokenType::Normal);
    }
    let mut p = TokenizerParts::new(TokenizerKind::Gpt2, tokens);
    p.token_types = types;
    p.merges = strings(&merges);
    p.bos_id = Some(0);
    p.eos_id = Some(2);
    p.pre = "smollm".into();
    p
}

#[test]
fn gpt2_encode_decode_with_specials() {
    let t = Tokenizer::from_parts(gpt2_like()).unwrap();
    assert_eq!(t.kind(), "gpt2");
    assert!(t.warnings().is_empty());
    let text = "<|im_start|>hi hi🚀<|im_end|>";
    let ids = t.encode(text, true).unwrap();
    let hi = piece(&t, "hi");
    let ghi = piece(&t, "Ġhi");
    let fb = piece(&t, "ðŁ");
    let byte = |b: u8| 3 + b as u32;
    // 🚀 = F0 9F 9A 80: "ðŁ" merges the first two bytes.
    assert_eq!(ids, vec![1, hi, ghi, fb, byte(0x9A), byte(0x80), 2]);
    assert_eq!(t.decode(&ids), text);
    assert!(t.is_end_of_generation(2));
    assert!(t.is_end_of_generation(0)); // <|endoftext|> as a control token
    assert!(!t.add_bos());
}

#[test]
fn stream_decoder_waits_for_whole_characters() {
    let t = Tokenizer::from_parts(gpt2_like()).unwrap();
    let ids = t.encode("a🚀b", false).unwrap();
    assert_eq!(ids.len(), 5);
    let mut d = t.stream_decoder();
    let pieces: Vec<String> = ids.iter().map(|&id| d.push(&t, id)).collect();
    assert_eq!(pieces, vec!["a", "", "", "🚀", "b"]);
    assert!(d.pending().is_empty());

    // An incomplete character at the end comes out as U+FFFD on finish;
    // a byte that can never start a character comes out at once.
    let byte = |b: u8| 3 + b as u32;
    assert_eq!(d.push(&t, byte(0xF0)), "");
    assert_eq!(d.finish(), "\u{FFFD}");
    assert_eq!(d.push(&t, byte(0xFF)), "\u{FFFD}");
    assert_eq!(d.push(&t, byte(b'x')), "x");
}

#[test]
fn spm_stream_decoder_with_byte_tokens() {
    let t = Tokenizer::from_parts(gemma_like()).unwrap();
    let ids = t.encode("東 hi", false).unwrap();
    let mut d = StreamDecoder::new();
    let out: Vec<String> = ids.iter().map(|&id| d.push(&t, id)).collect();
    assert_eq!(out.concat(), "東 hi");
    assert_eq!(out[0], "");
    assert_eq!(out[2], "東");
}

#[test]
fn from_gguf_reads_metadata() {
    let p = gemma_like();
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", Value::String("gemma3".into()));
    w.add_metadata("tokenizer.ggml.model", Value::String("llama".into()));
    w.add_array(
        "tokenizer.ggml.tokens",
        ValueType::String,
        p.tokens.iter().map(|s| Value::String(s.clone())).collect(),
    )
    .unwrap();
    let types = p
        .token_types
        .iter()
        .map(|t| Value::I32(*t as i32))
        .collect();
    w.add_array("tokenizer.ggml.token_type", ValueType::I32, types)
        .unwrap();
    let scores = (0..p.tokens.len())
        .map(|i| Value::F32(-(i as f32)))
        .collect();
    w.add_array("tokenizer.ggml.scores", ValueType::F32, scores)
        .unwrap();
    w.add_metadata("tokenizer.ggml.bos_token_id", Value::U32(2));
    w.add_metadata("tokenizer.ggml.eos_token_id", Value::U32(1));
    w.add_metadata("tokenizer.ggml.unknown_token_id", Value::U32(3));
    w.add_metadata("tokenizer.ggml.add_space_prefix", Value::Bool(false));
    let mut bytes = Vec::new();
    w.write(&mut bytes).unwrap();
    let file = GgufFile::from_bytes(bytes).unwrap();

    let parts = TokenizerParts::from_gguf(&file).unwrap();
    assert_eq!(parts.merge_order, MergeOrder::VocabOrder);
    assert!(parts.space_run_tokens);
    assert!(parts.add_bos, "llama default");
    assert_eq!(parts.token_types, p.token_types);
    let t = Tokenizer::from_gguf(&file).unwrap();
    let direct = Tokenizer::from_parts(p).unwrap();
    for s in ["<start_of_turn>user\n hi  hi\n\n東", "hi"] {
        assert_eq!(t.encode(s, true).unwrap(), direct.encode(s, true).unwrap());
    }
    assert!(ChatTemplate::from_gguf(&file).unwrap().is_none());
}

#[test]
fn from_gguf_rejects_unknown_models() {
    let mut w = GgufWriter::new();
    w.add_metadata("tokenizer.ggml.model", Value::String("rwkv".into()));
    let mut bytes = Vec::new();
    w.write(&mut bytes).unwrap();
    let file = GgufFile::from_bytes(bytes).unwrap();
    match Tokenizer::from_gguf(&file) {
        Err(Error::Tokenizer(m)) => assert!(m.contains("rwkv"), "{m}"),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<ChatTemplate>();
}

#[test]
fn gpt2_split_regex_pre_tokenizers() {
    for pre in ["llama3", "qwen2", "qwen35", "tekken", "gpt-4o"] {
        let mut p = gpt2_like();
        p.pre = pre.into();
        let t = Tokenizer::from_parts(p).unwrap();
        assert!(t.warnings().is_empty(), "{pre}");
        let text = "hi 12345\n\n  x<|im_end|>";
        let ids = t.encode(text, false).unwrap();
        assert_eq!(t.decode(&ids), text, "{pre}");
        assert_eq!(*ids.last().unwrap(), 2, "{pre}");
    }
}
