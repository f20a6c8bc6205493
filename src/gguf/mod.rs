//! GGUF v2/v3 files: a zero-copy reader over `memmap2` and a writer.

use crate::quant::GgmlType;
use std::path::{Path, PathBuf};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

/// One tensor's header entry.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in GGML order: `dims[0]` is the row length (fastest varying).
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub n_bytes: u64,
}

/// An open GGUF file; tensor data stays in the memory map.
pub struct GgufFile {
    path: PathBuf,
}

impl GgufFile {
    /// Map and parse a file, validating every header field and tensor extent.
    pub fn open(path: impl AsRef<Path>) -> crate::Result<GgufFile> {
        todo!()
    }
    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        todo!()
    }
    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        todo!()
    }
    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        todo!()
    }
    /// All tensors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        todo!()
    }
    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        todo!()
    }
    /// The tensor's bytes, borrowed from the memory map.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        todo!()
    }
}
