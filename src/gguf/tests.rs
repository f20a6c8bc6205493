//! Round trips through the writer and reader, one test per malformed-file
//! case, and a check against a real model when it is present.

use super::*;
use crate::quant::GgmlType;

/// The bytes a writer produces.
pub(super) fn bytes_of(w: &GgufWriter) -> Vec<u8> {
    let mut out = Vec::new();
    w.write(&mut out).unwrap();
    out
}

/// The message of the error a parse of `bytes` must give.
pub(super) fn parse_err(bytes: Vec<u8>) -> String {
    match GgufFile::from_bytes(bytes) {
        Ok(_) => panic!("malformed file was accepted"),
        Err(e @ crate::Error::Gguf { .. }) => e.to_string(),
        Err(e) => panic!("wrong error kind: {e}"),
    }
}

pub(super) fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
}

/// Position of the first occurrence of `needle` in `hay`.
pub(super) fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("pattern not found")
}

/// Hand-built GGUF bytes, for headers the writer refuses to produce.
pub(super) struct Raw(pub(super) Vec<u8>);

impl Raw {
    pub(super) fn new(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        Raw(b"GGUF".to_vec()).u32(version).u64(n_tensors).u64(n_kv)
    }
    pub(super) fn u8(mut self, v: u8) -> Raw {
        self.0.push(v);
        self
    }
    pub(super) fn u32(mut self, v: u32) -> Raw {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(super) fn u64(mut self, v: u64) -> Raw {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(super) fn str(self, s: &str) -> Raw {
        let mut r = self.u64(s.len() as u64);
        r.0.extend_from_slice(s.as_bytes());
        r
    }
    /// A tensor info: name, dims, type id, offset.
    pub(super) fn tensor(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Raw {
        let mut r = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            r = r.u64(d);
        }
        r.u32(ty).u64(offset)
    }
    /// Pad to 32 and append `n` data bytes.
    pub(super) fn data(mut self, n: usize) -> Vec<u8> {
        self.0.resize(self.0.len().next_multiple_of(32) + n, 0);
        self.0
    }
}

/// A small valid file: a few metadata types and two tensors.
pub(super) fn sample_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", Value::String("llama".into()));
    w.add_metadata("llama.block_count", Value::U32(2));
    w.add_metadata(
        "tokenizer.ggml.tokens",
        Value::Array(vec![Value::String("a".into()), Value::String("bc".into())]),
    );
    w.add_metadata("flag", Value::Bool(true));
    w.add_tensor("tok_a", &[8, 2], GgmlType::F32, vec![1u8; 64])
        .unwrap();
    w.add_tensor("tok_b", &[32], GgmlType::Q8_0, vec![2u8; 34])
        .unwrap();
    w
}

fn every_value_type() -> Vec<(&'static str, Value)> {
    vec![
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-100)),
        ("t.u16", Value::U16(60000)),
        ("t.i16", Value::I16(-30000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.u64", Value::U64(u64::MAX)),
        ("t.i64", Value::I64(i64::MIN)),
        ("t.f32", Value::F32(1.5e-5)),
        ("t.f64", Value::F64(-2.25e300)),
        ("t.bool.true", Value::Bool(true)),
        ("t.bool.false", Value::Bool(false)),
        (
            "t.string",
            Value::String("héllo ▁ \u{1F600} {{ x }}\n".into()),
        ),
        ("t.string.empty", Value::String(String::new())),
        (
            "t.array.f32",
            Value::Array(vec![Value::F32(1.0), Value::F32(-0.5), Value::F32(3.25)]),
        ),
        (
            "t.array.i32",
            Value::Array(vec![Value::I32(-1), Value::I32(7)]),
        ),
        (
            "t.array.u8",
            Value::Array(vec![Value::U8(0), Value::U8(255)]),
        ),
        (
            "t.array.bool",
            Value::Array(vec![Value::Bool(true), Value::Bool(false)]),
        ),
        ("t.array.u64", Value::Array(vec![Value::U64(1 << 40)])),
        ("t.array.f64", Value::Array(vec![Value::F64(0.1)])),
        (
            "t.array.nested",
            Value::Array(vec![
                Value::Array(vec![Value::I16(1), Value::I16(2)]),
                Value::Array(vec![Value::String("x".into())]),
            ]),
        ),
    ]
}

fn roundtrip_every_value_type(version: u32) {
    let mut w = GgufWriter::new().with_version(version);
    for (k, v) in every_value_type() {
        w.add_metadata(k, v);
    }
    w.add_array("t.array.empty", ValueType::String, vec![])
        .unwrap();
    let f = GgufFile::from_bytes(bytes_of(&w)).unwrap();
    assert_eq!(f.version(), version);
    let mut expected = every_value_type();
    expected.push(("t.array.empty", Value::Array(vec![])));
    assert_eq!(f.metadata().len(), expected.len());
    for ((k, v), (rk, rv)) in expected.iter().zip(f.metadata()) {
        assert_eq!(k, rk);
        assert_eq!(v, rv, "{k}");
        assert_eq!(f.get(k), Some(v));
    }
    assert!(f.tensors().is_empty());
}

#[test]
fn roundtrip_every_value_type_v3() {
    roundtrip_every_value_type(3);
}

#[test]
fn roundtrip_every_value_type_v2() {
    roundtrip_every_value_type(2);
}

#[test]
fn v2_and_v3_differ_only_in_version() {
    let v3 = bytes_of(&sample_writer());
    let v2 = bytes_of(&sample_writer().with_version(2));
    assert_eq!(&v2[4..8], &2u32.to_le_bytes());
    assert_eq!(&v2[8..], &v3[8..]);
    let f = GgufFile::from_bytes(v2).unwrap();
    assert_eq!(f.version(), 2);
    assert_eq!(f.tensor_bytes("tok_b"), Some(&[2u8; 34][..]));
}

#[test]
fn roundtrip_large_string_array() {
    let n = 262_144;
    let tokens: Vec<Value> = (0..n).map(|i| Value::String(format!("tok{i}"))).collect();
    let mut w = GgufWriter::new();
    w.add_metadata("tokenizer.ggml.tokens", Value::Array(tokens));
    let f = GgufFile::from_bytes(bytes_of(&w)).unwrap();
    let a = f.get_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(a.len(), n);
    assert_eq!(a[0].as_str(), Some("tok0"));
    assert_eq!(a[n - 1].as_str(), Some("tok262143"));
    assert_eq!(
        f.get("tokenizer.ggml.tokens").unwrap().to_string(),
        "[262144 × string]"
    );
}

#[test]
fn roundtrip_tensors_of_several_types() {
    let shapes: [(&str, &[u64], GgmlType); 7] = [
        ("f32", &[3, 5], GgmlType::F32),
        ("f16", &[7], GgmlType::F16),
        ("bf16", &[2, 2, 2, 2], GgmlType::BF16),
        ("q4_0", &[64, 3], GgmlType::Q4_0),
        ("q8_0", &[32, 2, 3], GgmlType::Q8_0),
        ("q4_k", &[256, 2], GgmlType::Q4_K),
        ("q6_k", &[512], GgmlType::Q6_K),
    ];
    let mut w = GgufWriter::new();
    let mut expected = Vec::new();
    for (i, (name, dims, ty)) in shapes.iter().enumerate() {
        let n =
            ty.row_bytes(dims[0] as usize).unwrap() * dims[1..].iter().product::<u64>() as usize;
        let data: Vec<u8> = (0..n).map(|j| (j * 31 + i * 7) as u8).collect();
        w.add_tensor(*name, dims, *ty, data.clone()).unwrap();
        expected.push(data);
    }
    let f = GgufFile::from_bytes(bytes_of(&w)).unwrap();
    assert_eq!(f.data_offset() % 32, 0);
    assert_eq!(f.tensors().len(), shapes.len());
    for ((name, dims, ty), data) in shapes.iter().zip(&expected) {
        let t = f.tensor(name).unwrap();
        assert_eq!(t.dims, *dims);
        assert_eq!(t.ty, *ty);
        assert_eq!(t.n_bytes, data.len() as u64);
        assert_eq!(t.offset % 32, 0);
        assert_eq!(f.tensor_data(t), &data[..]);
    }
    let last = f.tensors().last().unwrap();
    assert!(f.data_offset() + last.offset + last.n_bytes <= f.file_size());
}

#[test]
fn add_f32_tensor_encodes_rows() {
    let values: Vec<f32> = (0..64 * 3).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut w = GgufWriter::new();
    w.add_f32_tensor("w32", &[64, 3], GgmlType::F32, &values)
        .unwrap();
    w.add_f32_tensor("w8", &[64, 3], GgmlType::Q8_0, &values)
        .unwrap();
    let f = GgufFile::from_bytes(bytes_of(&w)).unwrap();
    let raw = f.tensor_bytes("w32").unwrap();
    let back: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(back, values);
    let t = f.tensor("w8").unwrap();
    assert_eq!(t.n_bytes, 3 * 68);
    let data = f.tensor_data(t);
    for (r, row) in values.chunks_exact(64).enumerate() {
        let mut out = vec![0f32; 64];
        crate::quant::dequantize_row(GgmlType::Q8_0, &data[r * 68..(r + 1) * 68], &mut out)
            .unwrap();
        for (a, b) in row.iter().zip(&out) {
            assert!((a - b).abs() < 0.01, "{a} vs {b}");
        }
    }
    let e = w
        .add_f32_tensor("short", &[64, 3], GgmlType::F32, &values[1..])
        .unwrap_err()
        .to_string();
    assert_mentions(&e, &["short", "191"]);
}

#[test]
fn writer_rejects_bad_tensors() {
    let mut w = sample_writer();
    let e = w.add_tensor("tok_a", &[8], GgmlType::F32, vec![0; 32]);
    assert_mentions(&e.unwrap_err().to_string(), &["tok_a", "already"]);
    let e = w.add_tensor("len", &[8], GgmlType::F32, vec![0; 31]);
    assert_mentions(&e.unwrap_err().to_string(), &["len", "31", "32"]);
    let e = w.add_tensor("row", &[33], GgmlType::Q4_0, vec![0; 18]);
    assert_mentions(&e.unwrap_err().to_string(), &["row", "33", "block size 32"]);
    let e = w.add_tensor("zero", &[8, 0], GgmlType::F32, vec![]);
    assert_mentions(&e.unwrap_err().to_string(), &["zero", "zero dimension"]);
    let e = w.add_tensor("five", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4]);
    assert_mentions(&e.unwrap_err().to_string(), &["five", "5 dimensions"]);
    let e = w.add_tensor("huge", &[1 << 40, 1 << 40], GgmlType::F32, vec![]);
    assert_mentions(&e.unwrap_err().to_string(), &["huge", "overflows"]);
}

#[test]
fn writer_rejects_bad_version_alignment_and_mixed_arrays() {
    let mut out = Vec::new();
    let e = sample_writer().with_version(1).write(&mut out).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    let e = sample_writer()
        .with_alignment(48)
        .write(&mut out)
        .unwrap_err();
    assert!(e.to_string().contains("48"), "{e}");
    let mut w = GgufWriter::new();
    w.add_metadata("mixed", Value::Array(vec![Value::U8(1), Value::I8(1)]));
    let e = w.write(&mut out).unwrap_err().to_string();
    assert_mentions(&e, &["mixed", "element 1", "i8", "u8"]);
    let e = w
        .add_array("typed", ValueType::F32, vec![Value::F64(1.0)])
        .unwrap_err();
    assert_mentions(&e.to_string(), &["typed", "f64", "f32"]);
    let mut deep = Value::Array(vec![Value::U8(1)]);
    for _ in 0..MAX_ARRAY_DEPTH {
        deep = Value::Array(vec![deep]);
    }
    let mut w = GgufWriter::new();
    w.add_metadata("deep", deep);
    let e = w.write(&mut out).unwrap_err().to_string();
    assert_mentions(&e, &["deep", "nested"]);
}

#[test]
fn metadata_replaces_in_place() {
    let mut w = GgufWriter::new();
    w.add_metadata("a", Value::U8(1));
    w.add_metadata("b", Value::U8(2));
    w.add_metadata("a", Value::String("again".into()));
    let f = GgufFile::from_bytes(bytes_of(&w)).unwrap();
    assert_eq!(
        f.metadata()[0],
        ("a".to_string(), Value::String("again".into()))
    );
    assert_eq!(f.metadata().len(), 2);
}

#[test]
fn custom_alignment_roundtrip() {
    let w = sample_writer().with_alignment(64);
    let f = GgufFile::from_bytes(bytes_of(&w)).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.get_u64("general.alignment"), Some(64));
    assert_eq!(f.data_offset() % 64, 0);
    assert!(f.tensors().iter().all(|t| t.offset % 64 == 0));
    assert_eq!(f.tensor_bytes("tok_b"), Some(&[2u8; 34][..]));

    // Copying metadata from a file carries its alignment along.
    let mut copy = GgufWriter::new();
    for (k, v) in f.metadata() {
        copy.add_metadata(k.clone(), v.clone());
    }
    copy.add_tensor("x", &[4], GgmlType::F32, vec![0; 16])
        .unwrap();
    let g = GgufFile::from_bytes(bytes_of(&copy)).unwrap();
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.metadata().len(), f.metadata().len());
}

#[test]
fn write_file_is_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    sample_writer().write_file(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.path(), path);
    assert_eq!(f.get_str("general.architecture"), Some("llama"));
    assert_eq!(f.file_size(), std::fs::metadata(&path).unwrap().len());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    // A failed write leaves the previous file and no temporary behind.
    let before = std::fs::read(&path).unwrap();
    let e = sample_writer()
        .with_version(7)
        .write_file(&path)
        .unwrap_err();
    assert!(e.to_string().contains("m.gguf"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    let fresh = dir.path().join("never.gguf");
    assert!(sample_writer().with_version(7).write_file(&fresh).is_err());
    assert!(!fresh.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn open_reports_missing_and_empty_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    let e = GgufFile::open(&missing).unwrap_err();
    assert!(matches!(e, crate::Error::Io { .. }));
    assert!(e.to_string().contains("missing.gguf"));
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let e = GgufFile::open(&empty).unwrap_err().to_string();
    assert_mentions(&e, &["empty.gguf", "truncated", "magic", "offset 0"]);
}

#[test]
fn typed_getters() {
    let mut w = GgufWriter::new();
    w.add_metadata("neg", Value::I32(-3));
    w.add_metadata("pos", Value::I16(12));
    w.add_metadata("big", Value::U64(u64::MAX));
    w.add_metadata("f64", Value::F64(0.5));
    w.add_metadata("s", Value::String("x".into()));
    w.add_metadata("b", Value::Bool(false));
    w.add_metadata("arr", Value::Array(vec![Value::U32(1)]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.gguf");
    w.write_file(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.get_u64("neg"), None);
    assert_eq!(f.get_i64("neg"), Some(-3));
    assert_eq!(f.get_u64("pos"), Some(12));
    assert_eq!(f.get_u64("big"), Some(u64::MAX));
    assert_eq!(f.get_i64("big"), None);
    assert_eq!(f.get_f32("f64"), Some(0.5));
    assert_eq!(f.get_f32("pos"), Some(12.0));
    assert_eq!(f.get_f32("s"), None);
    assert_eq!(f.get_str("s"), Some("x"));
    assert_eq!(f.get_str("b"), None);
    assert_eq!(f.get_bool("b"), Some(false));
    assert_eq!(f.get_array("arr"), Some(&[Value::U32(1)][..]));
    assert_eq!(f.get_u64("nope"), None);
    assert_eq!(f.require_str("s").unwrap(), "x");
    assert_eq!(f.require_u64("pos").unwrap(), 12);
    assert_eq!(f.require_f32("neg").unwrap(), -3.0);
    let e = f.require_str("nope").unwrap_err().to_string();
    assert_mentions(&e, &["g.gguf", "'nope'", "missing"]);
    let e = f.require_u64("neg").unwrap_err().to_string();
    assert_mentions(&e, &["g.gguf", "'neg'", "i32"]);
    let e = f.require_f32("s").unwrap_err().to_string();
    assert_mentions(&e, &["'s'", "string"]);
    let e = f.require_array("b").unwrap_err().to_string();
    assert_mentions(&e, &["'b'", "bool"]);
}

#[test]
fn value_display_and_type_names() {
    assert_eq!(Value::U32(7).to_string(), "7");
    assert_eq!(Value::F32(0.5).to_string(), "0.5");
    assert_eq!(Value::Bool(true).to_string(), "true");
    assert_eq!(Value::String("a\"b\n".into()).to_string(), r#""a\"b\n""#);
    let long = Value::String("x".repeat(100)).to_string();
    assert!(long.ends_with("\"…") && long.len() < 80, "{long}");
    let arr = Value::Array(vec![Value::F32(1.0); 3]);
    assert_eq!(arr.to_string(), "[3 × f32]");
    assert_eq!(Value::Array(vec![]).to_string(), "[0 × ?]");
    assert_eq!(arr.type_name(), "array");
    assert_eq!(Value::I64(1).type_name(), "i64");
    for id in 0..13 {
        assert_eq!(ValueType::from_u32(id).unwrap().id(), id);
    }
    assert_eq!(ValueType::from_u32(13), None);
}

// ---- the real model ----

const SMOLLM2: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
);

#[test]
fn real_model_smollm2() {
    if !std::path::Path::new(SMOLLM2).exists() {
        eprintln!("skipping: {SMOLLM2} not found (see models/)");
        return;
    }
    let f = GgufFile::open(SMOLLM2).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.get_str("general.architecture"), Some("llama"));
    assert_eq!(f.get_u64("llama.block_count"), Some(30));
    let t = f.tensor("token_embd.weight").unwrap();
    assert_eq!(t.dims, [576, 49152]);
    assert_eq!(t.ty, GgmlType::Q8_0);
    assert_eq!(t.n_bytes, 49152 * 576 / 32 * 34);
    assert_eq!(f.tensor("blk.0.attn_q.weight").unwrap().ty, GgmlType::Q4_1);
    let tokens = f.get_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    assert!(tokens.iter().all(|v| v.as_str().is_some()));
    assert_eq!(f.tensors().len(), 272);
    for t in f.tensors() {
        assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes);
    }
    assert!(f.data_offset() < f.file_size());
}

#[test]
fn real_model_rewrite_roundtrip() {
    if !std::path::Path::new(SMOLLM2).exists() {
        eprintln!("skipping: {SMOLLM2} not found (see models/)");
        return;
    }
    let f = GgufFile::open(SMOLLM2).unwrap();
    let mut w = GgufWriter::new().with_alignment(f.alignment());
    for (k, v) in f.metadata() {
        w.add_metadata(k.clone(), v.clone());
    }
    for t in f.tensors() {
        w.add_tensor(t.name.clone(), &t.dims, t.ty, f.tensor_data(t).to_vec())
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("copy.gguf");
    w.write_file(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.metadata(), f.metadata());
    assert_eq!(g.tensors().len(), f.tensors().len());
    for (a, b) in f.tensors().iter().zip(g.tensors()) {
        assert_eq!((&a.name, &a.dims, a.ty), (&b.name, &b.dims, b.ty));
        assert!(f.tensor_data(a) == g.tensor_data(b), "{}", a.name);
    }
}
