//! One test per malformed-file case: each must give an error naming the
//! fault (offset or tensor), never a panic.

use super::tests::{Raw, assert_mentions, bytes_of, find, parse_err, sample_writer};
use super::*;

#[test]
fn bad_magic() {
    let mut b = bytes_of(&sample_writer());
    b[0..4].copy_from_slice(b"GGML");
    assert_mentions(&parse_err(b), &["bad magic", "offset 0"]);
}

#[test]
fn unsupported_versions() {
    let e = parse_err(Raw::new(1, 0, 0).0);
    assert_mentions(&e, &["version 1", "offset 4"]);
    let e = parse_err(Raw::new(4, 0, 0).0);
    assert_mentions(&e, &["version 4", "offset 4"]);
    let e = parse_err(Raw::new(3u32.swap_bytes(), 0, 0).0);
    assert_mentions(&e, &["big-endian", "offset 4"]);
}

#[test]
fn truncated_anywhere_is_an_error_with_an_offset() {
    // Trailing padding after the last tensor is optional; everything before it is not.
    let full = bytes_of(&sample_writer());
    let f = GgufFile::from_bytes(full.clone()).unwrap();
    let last = f.tensors().last().unwrap();
    let needed = (f.data_offset() + last.offset + last.n_bytes) as usize;
    GgufFile::from_bytes(full[..needed].to_vec()).unwrap();
    for cut in 0..needed {
        let e = parse_err(full[..cut].to_vec());
        assert!(e.contains("offset"), "cut at {cut}: {e}");
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    let full = bytes_of(&sample_writer());
    let f = GgufFile::from_bytes(full.clone()).unwrap();
    let header_len = f.data_offset() as usize;
    for i in 0..header_len {
        for v in [0x00, 0x01, 0x07, 0x80, 0xff] {
            let mut b = full.clone();
            b[i] = v;
            let _ = GgufFile::from_bytes(b);
        }
    }
}

#[test]
fn truncated_string() {
    let e = parse_err(Raw::new(3, 0, 1).str("k").u32(8).u64(100).0);
    assert_mentions(&e, &["metadata 'k'", "length 100", "offset 37"]);
    let e = parse_err(Raw::new(3, 0, 1).u64(1 << 62).u64(0).0);
    assert_mentions(&e, &["metadata key", "offset 24"]);
}

#[test]
fn truncated_array() {
    let e = parse_err(
        Raw::new(3, 0, 1)
            .str("k")
            .u32(9)
            .u32(4)
            .u64(3)
            .u32(1)
            .u32(2)
            .0,
    );
    assert_mentions(&e, &["metadata 'k'", "array length 3", "offset 41"]);
    let e = parse_err(
        Raw::new(3, 0, 1)
            .str("k")
            .u32(9)
            .u32(8)
            .u64(2)
            .str("a")
            .u64(9)
            .0,
    );
    assert_mentions(&e, &["metadata 'k'", "truncated", "offset 58"]);
}

#[test]
fn truncated_tensor_info() {
    let name = "weight.with.a.long.name";
    let b = Raw::new(3, 1, 0).str(name).u32(2).u64(4).0;
    assert_mentions(
        &parse_err(b),
        &["tensor 'weight.with", "truncated", "offset 67"],
    );
}

#[test]
fn absurd_counts() {
    let e = parse_err(Raw::new(3, u64::MAX, 0).0);
    assert_mentions(&e, &["tensor_count", "offset 8", "impossible"]);
    let e = parse_err(Raw::new(3, 0, 1 << 40).0);
    assert_mentions(&e, &["kv_count", "offset 16", "impossible"]);
    let e = parse_err(Raw::new(3, 0, 1).str("k").u32(9).u32(8).u64(u64::MAX / 2).0);
    assert_mentions(&e, &["array length", "offset 41", "impossible"]);
    // 16 bytes remain: room for 16 u8 but only 2 strings.
    let b = Raw::new(3, 0, 1)
        .str("k")
        .u32(9)
        .u32(8)
        .u64(3)
        .u64(0)
        .u64(0)
        .0;
    assert_mentions(&parse_err(b), &["array length 3", "at most 2"]);
    // Tensor count that fits the header size but not what is left after the metadata.
    let b = Raw::new(3, 2, 1)
        .str("k")
        .u32(8)
        .str(&"x".repeat(40))
        .data(0);
    assert_mentions(&parse_err(b), &["tensor_count 2", "impossible"]);
}

#[test]
fn unknown_metadata_value_type() {
    let e = parse_err(Raw::new(3, 0, 1).str("key").u32(13).u32(0).0);
    assert_mentions(&e, &["metadata 'key'", "type id 13", "offset 35"]);
    let e = parse_err(Raw::new(3, 0, 1).str("key").u32(9).u32(77).u64(0).0);
    assert_mentions(&e, &["metadata 'key'", "type id 77", "offset 39"]);
}

#[test]
fn invalid_bool() {
    let e = parse_err(Raw::new(3, 0, 1).str("k").u32(7).u8(2).0);
    assert_mentions(&e, &["bool", "offset 37"]);
}

#[test]
fn invalid_utf8() {
    let mut b = bytes_of(&sample_writer());
    let at = find(&b, b"llama.block_count");
    b[at + 2] = 0xff;
    assert_mentions(
        &parse_err(b.clone()),
        &["UTF-8", &format!("offset {}", at + 2)],
    );
    let mut b = bytes_of(&sample_writer());
    let at = find(&b, b"bc");
    b[at] = 0xc3;
    assert_mentions(&parse_err(b), &["tokenizer.ggml.tokens", "UTF-8"]);
    let mut b = bytes_of(&sample_writer());
    let at = find(&b, b"tok_b");
    b[at + 4] = 0x80;
    assert_mentions(&parse_err(b), &["tensor info #1", "UTF-8"]);
}

#[test]
fn nested_arrays_too_deep() {
    let mut r = Raw::new(3, 0, 1).str("k").u32(9);
    for _ in 0..MAX_ARRAY_DEPTH {
        r = r.u32(9).u64(1);
    }
    let b = r.u32(4).u64(1).u32(0).0;
    assert_mentions(&parse_err(b), &["metadata 'k'", "nested deeper", "offset"]);
    // One level less is fine.
    let mut r = Raw::new(3, 0, 1).str("k").u32(9);
    for _ in 1..MAX_ARRAY_DEPTH {
        r = r.u32(9).u64(1);
    }
    let f = GgufFile::from_bytes(r.u32(4).u64(1).u32(0).0).unwrap();
    assert!(f.get_array("k").is_some());
}

#[test]
fn duplicate_metadata_keys() {
    let b = Raw::new(3, 0, 2)
        .str("a.b")
        .u32(0)
        .u8(1)
        .str("a.b")
        .u32(0)
        .u8(2)
        .0;
    assert_mentions(
        &parse_err(b),
        &["duplicate metadata key 'a.b'", "offset 40"],
    );
}

#[test]
fn duplicate_tensor_names() {
    let mut b = bytes_of(&sample_writer());
    let at = find(&b, b"tok_b");
    b[at + 4] = b'a';
    assert_mentions(&parse_err(b), &["duplicate tensor name 'tok_a'", "offset"]);
}

#[test]
fn tensor_dims_out_of_range() {
    let e = parse_err(
        Raw::new(3, 1, 0)
            .tensor("t5", &[1, 1, 1, 1, 1], 0, 0)
            .data(4),
    );
    assert_mentions(&e, &["tensor 't5'", "n_dims 5"]);
    let e = parse_err(Raw::new(3, 1, 0).tensor("t0", &[], 0, 0).data(4));
    assert_mentions(&e, &["tensor 't0'", "n_dims 0"]);
    let e = parse_err(Raw::new(3, 1, 0).tensor("tz", &[4, 0], 0, 0).data(16));
    assert_mentions(&e, &["tensor 'tz'", "dimension 1", "zero"]);
    let e = parse_err(Raw::new(3, 1, 0).tensor("ta", &[1 << 63], 0, 0).data(16));
    assert_mentions(&e, &["tensor 'ta'", "absurd"]);
}

#[test]
fn overflowing_dimension_products() {
    let e = parse_err(
        Raw::new(3, 1, 0)
            .tensor("big", &[1 << 32, 1 << 32, 4], 0, 0)
            .data(16),
    );
    assert_mentions(&e, &["tensor 'big'", "overflows"]);
    // Element count fits in i64, byte count does not.
    let e = parse_err(
        Raw::new(3, 1, 0)
            .tensor("bytes", &[1 << 61, 2], 0, 0)
            .data(16),
    );
    assert_mentions(&e, &["tensor 'bytes'", "overflows"]);
}

#[test]
fn unknown_ggml_type() {
    let e = parse_err(Raw::new(3, 1, 0).tensor("w", &[32], 99, 0).data(64));
    assert_mentions(&e, &["tensor 'w'", "type id 99"]);
}

#[test]
fn row_not_a_multiple_of_block_size() {
    let e = parse_err(Raw::new(3, 1, 0).tensor("q", &[48, 2], 8, 0).data(256));
    assert_mentions(&e, &["tensor 'q'", "row length 48", "Q8_0", "32"]);
}

#[test]
fn misaligned_tensor_offset() {
    let e = parse_err(Raw::new(3, 1, 0).tensor("w", &[4], 0, 8).data(64));
    assert_mentions(&e, &["tensor 'w'", "offset 8", "alignment 32"]);
}

#[test]
fn data_section_past_end_of_file() {
    let full = bytes_of(&sample_writer());
    let f = GgufFile::from_bytes(full.clone()).unwrap();
    let header_end = find(&full, b"tok_b") + 5 + 4 + 8 + 4 + 8;
    assert!(header_end < f.data_offset() as usize, "test needs padding");
    let e = parse_err(full[..header_end].to_vec());
    assert_mentions(
        &e,
        &["data section", &format!("offset {}", f.data_offset())],
    );
}

#[test]
fn tensor_data_past_end_of_file() {
    let full = bytes_of(&sample_writer());
    let e = parse_err(full[..full.len() - 31].to_vec());
    assert_mentions(&e, &["tensor 'tok_b'", "past the end"]);
    let e = parse_err(Raw::new(3, 1, 0).tensor("w", &[4], 0, 1 << 63).data(16));
    assert_mentions(&e, &["tensor 'w'", "past the end"]);
}

#[test]
fn overlapping_tensors() {
    let b = Raw::new(3, 2, 0)
        .tensor("a", &[16], 0, 0)
        .tensor("b", &[4], 0, 32)
        .data(128);
    assert_mentions(&parse_err(b), &["tensor 'b'", "overlaps tensor 'a'"]);
}

#[test]
fn bad_alignment_values() {
    for (v, what) in [(48u32, "48"), (0, "is 0")] {
        let b = Raw::new(3, 0, 1).str("general.alignment").u32(4).u32(v).0;
        assert_mentions(&parse_err(b), &["general.alignment", what, "power of two"]);
    }
    let b = Raw::new(3, 0, 1)
        .str("general.alignment")
        .u32(8)
        .str("32")
        .0;
    assert_mentions(&parse_err(b), &["general.alignment", "string"]);
}

#[test]
fn tensor_data_is_zero_copy() {
    let f = GgufFile::from_bytes(bytes_of(&sample_writer())).unwrap();
    let t = f.tensor("tok_a").unwrap();
    let data = f.tensor_data(t);
    let whole = f.bytes.as_slice();
    assert_eq!(
        data.as_ptr() as usize - whole.as_ptr() as usize,
        (f.data_offset() + t.offset) as usize
    );
}
