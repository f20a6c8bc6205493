//! Writing GGUF files: metadata and tensors collected in memory, then written
//! in one pass (header, padding, aligned tensor data).

use super::reader::tensor_bytes;
use super::value::{Value, ValueType};
use super::{DEFAULT_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS};
use crate::quant::GgmlType;
use std::collections::HashMap;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The metadata key that carries the alignment.
const ALIGNMENT_KEY: &str = "general.alignment";

/// One metadata entry; `elem` is the element type of an array when given explicitly.
struct MetaEntry {
    key: String,
    value: Value,
    elem: Option<ValueType>,
}

/// A tensor waiting to be written.
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

/// Builds a GGUF file in memory and writes it out.
///
/// Metadata keeps insertion order; adding a key again replaces its value in
/// place. Tensors are written in insertion order, each at an offset aligned
/// to the alignment.
///
/// Arrays: the element type of a [`Value::Array`] is that of its first
/// element, and every element must have that type (checked by
/// [`write`](Self::write)). An empty array added through
/// [`add_metadata`](Self::add_metadata) is written with element type `u8`;
/// use [`add_array`](Self::add_array) to choose it.
///
/// Alignment: a file whose alignment is not 32 gets a `general.alignment`
/// u32 entry (first, unless the caller added the key). Adding that key with
/// a power-of-two integer value sets the alignment, like
/// [`with_alignment`](Self::with_alignment).
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    metadata: Vec<MetaEntry>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<PendingTensor>,
    tensor_index: HashMap<String, usize>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty version-3 file with alignment 32.
    pub fn new() -> GgufWriter {
        GgufWriter {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            meta_index: HashMap::new(),
            tensors: Vec::new(),
            tensor_index: HashMap::new(),
        }
    }

    /// Write this GGUF version instead (2 or 3; anything else fails at write time).
    pub fn with_version(mut self, version: u32) -> GgufWriter {
        self.version = version;
        self
    }

    /// Align the data section and every tensor to `alignment` bytes (a power of
    /// two that fits in u32; anything else fails at write time).
    pub fn with_alignment(mut self, alignment: u64) -> GgufWriter {
        self.alignment = alignment;
        if let Some(&i) = self.meta_index.get(ALIGNMENT_KEY) {
            self.metadata[i].value = Value::U32(u32::try_from(alignment).unwrap_or(u32::MAX));
        }
        self
    }

    /// Add (or replace) a metadata entry.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        if key == ALIGNMENT_KEY
            && let Some(a) = value.as_u64().filter(|a| a.is_power_of_two())
        {
            self.alignment = a;
        }
        self.put(key, value, None);
    }

    /// Add (or replace) an array whose elements all have type `elem`; works for
    /// empty arrays, whose element type cannot be inferred.
    pub fn add_array(
        &mut self,
        key: impl Into<String>,
        elem: ValueType,
        values: Vec<Value>,
    ) -> crate::Result<()> {
        let key = key.into();
        if let Some((i, v)) = values
            .iter()
            .enumerate()
            .find(|(_, v)| v.value_type() != elem)
        {
            return Err(crate::Error::Invalid(format!(
                "gguf writer: metadata '{key}': array element {i} is {}, expected {elem}",
                v.type_name()
            )));
        }
        self.put(key, Value::Array(values), Some(elem));
        Ok(())
    }

    fn put(&mut self, key: String, value: Value, elem: Option<ValueType>) {
        match self.meta_index.get(&key) {
            Some(&i) => {
                self.metadata[i].value = value;
                self.metadata[i].elem = elem;
            }
            None => {
                self.meta_index.insert(key.clone(), self.metadata.len());
                self.metadata.push(MetaEntry { key, value, elem });
            }
        }
    }

    /// Add a tensor from its encoded bytes, which must be exactly
    /// `ty.row_bytes(dims[0]) * product(dims[1..])` long.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> crate::Result<()> {
        let name = name.into();
        let n_bytes = self.check_tensor(&name, dims, ty)?;
        if data.len() as u64 != n_bytes {
            return Err(tensor_error(
                &name,
                format!(
                    "{} bytes given, a {} tensor of shape {dims:?} needs {n_bytes}",
                    data.len(),
                    ty.name()
                ),
            ));
        }
        self.tensor_index.insert(name.clone(), self.tensors.len());
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            ty,
            data,
        });
        Ok(())
    }

    /// Add a tensor from f32 values in row-major GGML order (`dims[0]` fastest),
    /// encoding each row into `ty` with [`crate::quant::quantize_row`].
    pub fn add_f32_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        values: &[f32],
    ) -> crate::Result<()> {
        let name = name.into();
        let n_bytes = self.check_tensor(&name, dims, ty)?;
        let n_elements: u64 = dims.iter().product();
        if values.len() as u64 != n_elements {
            return Err(tensor_error(
                &name,
                format!(
                    "{} values given, shape {dims:?} has {n_elements}",
                    values.len()
                ),
            ));
        }
        // check_tensor bounded n_bytes by usize and the values exist in memory.
        let row_len = dims[0] as usize;
        let mut data = vec![0u8; n_bytes as usize];
        let row_bytes = data.len() / (values.len() / row_len);
        for (row, out) in values
            .chunks_exact(row_len)
            .zip(data.chunks_exact_mut(row_bytes))
        {
            crate::quant::quantize_row(ty, row, out)?;
        }
        self.tensor_index.insert(name.clone(), self.tensors.len());
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            ty,
            data,
        });
        Ok(())
    }

    /// The byte size of a tensor about to be added, after checking its name and shape.
    fn check_tensor(&self, name: &str, dims: &[u64], ty: GgmlType) -> crate::Result<u64> {
        if self.tensor_index.contains_key(name) {
            return Err(tensor_error(
                name,
                "a tensor with this name was already added".into(),
            ));
        }
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(tensor_error(
                name,
                format!("{} dimensions, must be 1..={MAX_DIMS}", dims.len()),
            ));
        }
        if dims.contains(&0) {
            return Err(tensor_error(
                name,
                format!("shape {dims:?} has a zero dimension"),
            ));
        }
        tensor_bytes(dims, ty).map_err(|m| tensor_error(name, m))
    }

    /// Write the whole file to `w`. Fails with [`io::ErrorKind::InvalidInput`]
    /// for an unsupported version or alignment, or a malformed array.
    pub fn write(&self, w: &mut impl Write) -> io::Result<()> {
        if self.version != 2 && self.version != 3 {
            return Err(invalid(format!(
                "GGUF version {} cannot be written (only 2 and 3)",
                self.version
            )));
        }
        let align = self.alignment;
        if !align.is_power_of_two() || align > u64::from(u32::MAX) {
            return Err(invalid(format!(
                "alignment {align} is not a power of two that fits in u32"
            )));
        }
        let implicit_alignment =
            align != DEFAULT_ALIGNMENT && !self.meta_index.contains_key(ALIGNMENT_KEY);
        if let Some(&i) = self.meta_index.get(ALIGNMENT_KEY) {
            let v = &self.metadata[i].value;
            if v.as_u64() != Some(align) {
                return Err(invalid(format!(
                    "metadata '{ALIGNMENT_KEY}' is {v} but the alignment is {align}"
                )));
            }
        }

        let mut h = Vec::new();
        h.extend_from_slice(b"GGUF");
        h.extend_from_slice(&self.version.to_le_bytes());
        put_u64(&mut h, self.tensors.len() as u64);
        put_u64(
            &mut h,
            (self.metadata.len() + usize::from(implicit_alignment)) as u64,
        );
        if implicit_alignment {
            put_str(&mut h, ALIGNMENT_KEY);
            h.extend_from_slice(&ValueType::U32.id().to_le_bytes());
            h.extend_from_slice(&(align as u32).to_le_bytes());
        }
        for e in &self.metadata {
            put_str(&mut h, &e.key);
            h.extend_from_slice(&e.value.value_type().id().to_le_bytes());
            put_value(&mut h, &e.value, e.elem, 0)
                .map_err(|m| invalid(format!("metadata '{}': {m}", e.key)))?;
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut h, &t.name);
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for &d in &t.dims {
                put_u64(&mut h, d);
            }
            h.extend_from_slice(&(t.ty as u32).to_le_bytes());
            put_u64(&mut h, offset);
            offset = (offset + t.data.len() as u64).next_multiple_of(align);
        }
        pad(&mut h, align);
        w.write_all(&h)?;

        let zeros = vec![0u8; align as usize];
        for t in &self.tensors {
            w.write_all(&t.data)?;
            let padded = (t.data.len() as u64).next_multiple_of(align);
            w.write_all(&zeros[..(padded - t.data.len() as u64) as usize])?;
        }
        Ok(())
    }

    /// Write the file to `path` atomically: into a temporary file in the same
    /// directory, flushed to disk, then renamed over `path`. On failure `path`
    /// is untouched and the temporary file is removed.
    pub fn write_file(&self, path: impl AsRef<Path>) -> crate::Result<()> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = path.as_ref();
        let file_name = path.file_name().ok_or_else(|| {
            crate::Error::Invalid(format!(
                "gguf writer: {} is not a file path",
                path.display()
            ))
        })?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{}",
            file_name.to_string_lossy(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            let mut out = io::BufWriter::with_capacity(1 << 20, file);
            self.write(&mut out)?;
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(crate::Error::io(path, e));
        }
        // Persist the rename itself; not every platform can open a directory, so best effort.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

fn tensor_error(name: &str, msg: String) -> crate::Error {
    crate::Error::Invalid(format!("gguf writer: tensor '{name}': {msg}"))
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("gguf writer: {msg}"))
}

fn put_u64(h: &mut Vec<u8>, v: u64) {
    h.extend_from_slice(&v.to_le_bytes());
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    put_u64(h, s.len() as u64);
    h.extend_from_slice(s.as_bytes());
}

fn pad(h: &mut Vec<u8>, align: u64) {
    let n = (h.len() as u64).next_multiple_of(align) as usize;
    h.resize(n, 0);
}

/// The bytes of `v` (its type id is written by the caller); `elem` overrides an
/// array's element type; `depth` counts the arrays around `v`.
fn put_value(
    h: &mut Vec<u8>,
    v: &Value,
    elem: Option<ValueType>,
    depth: usize,
) -> Result<(), String> {
    match v {
        Value::U8(x) => h.push(*x),
        Value::I8(x) => h.push(*x as u8),
        Value::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => h.push(u8::from(*x)),
        Value::String(s) => put_str(h, s),
        Value::Array(items) => {
            if depth + 1 > MAX_ARRAY_DEPTH {
                return Err(format!(
                    "arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
                ));
            }
            let elem = elem
                .or_else(|| items.first().map(Value::value_type))
                .unwrap_or(ValueType::U8);
            h.extend_from_slice(&elem.id().to_le_bytes());
            put_u64(h, items.len() as u64);
            for (i, item) in items.iter().enumerate() {
                if item.value_type() != elem {
                    return Err(format!(
                        "array element {i} is {}, expected {elem}",
                        item.type_name()
                    ));
                }
                put_value(h, item, None, depth + 1)?;
            }
        }
    }
    Ok(())
}
