//! GGUF v2/v3 files: a zero-copy reader over `memmap2` and a writer.
//!
//! Layout (little-endian): magic `GGUF`, version u32, tensor count u64,
//! metadata count u64, the metadata entries (key string, value type u32,
//! value), the tensor infos (name string, n_dims u32, dims u64 × n_dims,
//! ggml type u32, data offset u64), zero padding to `general.alignment`
//! (default 32), then the data section. Strings are a u64 byte length and
//! UTF-8 bytes. Versions 2 and 3 are identical for little-endian files.
//!
//! [`GgufFile::open`] validates the whole header before returning: a
//! malformed file gives an [`Error::Gguf`](crate::Error::Gguf) naming the
//! byte offset or the tensor at fault, never a panic.

mod reader;
mod value;
mod writer;

#[cfg(test)]
mod malformed_tests;
#[cfg(test)]
mod tests;

pub use value::{Value, ValueType};
pub use writer::GgufWriter;

use crate::quant::GgmlType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Alignment of the data section and of each tensor's data when the file has no
/// `general.alignment` key.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a tensor may have (as in ggml).
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of arrays inside metadata values (1 = an array of scalars).
pub const MAX_ARRAY_DEPTH: usize = 4;

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

impl TensorInfo {
    /// Number of elements, the product of `dims` (validated not to overflow on load).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |n, &d| n.saturating_mul(d))
    }
}

/// Where the file's bytes live.
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An open GGUF file; tensor data stays in the memory map.
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    version: u32,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl GgufFile {
    /// Map and parse a file, validating every header field and tensor extent.
    pub fn open(path: impl AsRef<Path>) -> crate::Result<GgufFile> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| crate::Error::io(path, e))?;
        if !meta.is_file() {
            return Err(crate::Error::Gguf {
                path: path.to_path_buf(),
                msg: "not a regular file (a directory or device?): expected a .gguf model file"
                    .into(),
            });
        }
        let len = meta.len();
        // Mapping an empty file fails on some platforms; let the parser report it.
        let bytes = if len == 0 {
            Bytes::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only and private to this process. Another
            // process truncating or rewriting the file while it is mapped would
            // break the bytes under us; like every mmap-based model loader we
            // accept that, and our own writers replace files by rename instead.
            let map =
                unsafe { memmap2::Mmap::map(&file) }.map_err(|e| crate::Error::io(path, e))?;
            Bytes::Mapped(map)
        };
        Self::from_parts(path.to_path_buf(), bytes)
    }

    /// Parse a GGUF image held in memory (tests, embedded models); errors carry an empty path.
    pub fn from_bytes(bytes: Vec<u8>) -> crate::Result<GgufFile> {
        Self::from_parts(PathBuf::new(), Bytes::Owned(bytes))
    }

    fn from_parts(path: PathBuf, bytes: Bytes) -> crate::Result<GgufFile> {
        let h = match reader::parse(bytes.as_slice()) {
            Ok(h) => h,
            Err(msg) => return Err(crate::Error::Gguf { path, msg }),
        };
        Ok(GgufFile {
            path,
            bytes,
            version: h.version,
            metadata: h.metadata,
            meta_index: h.meta_index,
            tensors: h.tensors,
            tensor_index: h.tensor_index,
            alignment: h.alignment,
            data_offset: h.data_offset,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Alignment of the data section and tensor offsets (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    /// Byte offset of the data section from the start of the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }
    /// Size of the whole file in bytes.
    pub fn file_size(&self) -> u64 {
        self.bytes.as_slice().len() as u64
    }
    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }
    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }
    /// All tensors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
    /// The tensor's bytes, borrowed from the memory map.
    ///
    /// # Panics
    /// If `t` is not from this file's header and its extent lies outside the
    /// data section (the extents of this file's tensors were checked on load).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let range = self
            .data_offset
            .checked_add(t.offset)
            .and_then(|start| usize::try_from(start).ok())
            .zip(usize::try_from(t.n_bytes).ok())
            .and_then(|(start, n)| Some(start..start.checked_add(n)?));
        match range.and_then(|r| self.bytes.as_slice().get(r)) {
            Some(s) => s,
            None => panic!(
                "tensor '{}' is not from {}: its data lies outside the file",
                t.name,
                self.path.display()
            ),
        }
    }
    /// A tensor's bytes by name, or `None` when there is no such tensor.
    pub fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        self.tensor(name).map(|t| self.tensor_data(t))
    }

    /// A string value; `None` when missing or of another type.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }
    /// Any integer type holding a non-negative value; `None` otherwise.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }
    /// Any integer type whose value fits in `i64`; `None` otherwise.
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key)?.as_i64()
    }
    /// An `f32`, `f64` or integer value as `f32`; `None` otherwise.
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f32()
    }
    /// A bool value; `None` when missing or of another type.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }
    /// An array's elements; `None` when missing or of another type.
    pub fn get_array(&self, key: &str) -> Option<&[Value]> {
        self.get(key)?.as_array()
    }

    /// A string value, or an error naming the file and the missing or mistyped key.
    pub fn require_str(&self, key: &str) -> crate::Result<&str> {
        self.require(key, "string", Value::as_str)
    }
    /// A non-negative integer, or an error naming the file and the key.
    pub fn require_u64(&self, key: &str) -> crate::Result<u64> {
        self.require(key, "non-negative integer", Value::as_u64)
    }
    /// A float or integer as `f32`, or an error naming the file and the key.
    pub fn require_f32(&self, key: &str) -> crate::Result<f32> {
        self.require(key, "number", Value::as_f32)
    }
    /// An array's elements, or an error naming the file and the key.
    pub fn require_array(&self, key: &str) -> crate::Result<&[Value]> {
        self.require(key, "array", Value::as_array)
    }

    fn require<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        conv: impl FnOnce(&'a Value) -> Option<T>,
    ) -> crate::Result<T> {
        let v = self.get(key).ok_or_else(|| crate::Error::Gguf {
            path: self.path.clone(),
            msg: format!("metadata key '{key}' is missing"),
        })?;
        conv(v).ok_or_else(|| crate::Error::Gguf {
            path: self.path.clone(),
            msg: format!(
                "metadata key '{key}' is {} {v}, expected a {expected}",
                v.type_name()
            ),
        })
    }
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}
