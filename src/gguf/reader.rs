//! Parsing and validating a GGUF header from bytes.
//!
//! Every count read from the file is checked against the bytes left before
//! anything is allocated for it, every size is computed with checked
//! arithmetic, and every error names the byte offset or the tensor at fault.

use super::value::{Value, ValueType};
use super::{DEFAULT_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS, TensorInfo};
use crate::quant::GgmlType;
use std::collections::HashMap;

/// Fewest bytes of one metadata entry: key length, value type, a one-byte value.
const MIN_KV_SIZE: usize = 8 + 4 + 1;
/// Fewest bytes of one tensor info: name length, n_dims, one dim, type, offset.
const MIN_TENSOR_INFO_SIZE: usize = 8 + 4 + 8 + 4 + 8;

/// What a parse yields; the caller owns the bytes the data section lies in.
pub(super) struct Header {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub meta_index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    pub tensor_index: HashMap<String, usize>,
    pub alignment: u64,
    pub data_offset: u64,
}

/// A parse error message (the caller adds the path).
type PResult<T> = Result<T, String>;

/// A bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// `n` bytes for `what`, or a "truncated" error naming the offset.
    fn take(&mut self, n: usize, what: &str) -> PResult<&'a [u8]> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {} but only {} remain (file is {} bytes)",
                self.pos,
                self.remaining(),
                self.buf.len()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> PResult<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> PResult<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> PResult<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> PResult<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> PResult<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_size` bytes long; it cannot exceed what
    /// the remaining bytes could hold, so a vector of that capacity is safe to reserve.
    fn count(&mut self, min_size: usize, what: &str) -> PResult<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let max = self.remaining() / min_size.max(1);
        match usize::try_from(n) {
            Ok(n) if n <= max => Ok(n),
            _ => Err(format!(
                "{what} {n} at offset {at} is impossible: {} bytes remain, room for at most {max}",
                self.remaining()
            )),
        }
    }

    /// A GGUF string: u64 byte length, then that many bytes of UTF-8.
    fn str(&mut self, what: &str) -> PResult<&'a str> {
        let at = self.pos;
        let n = self.u64(what)?;
        if n > self.remaining() as u64 {
            return Err(format!(
                "truncated: {what} at offset {at} has length {n} but only {} bytes remain",
                self.remaining()
            ));
        }
        let bytes = self.take(n as usize, what)?;
        std::str::from_utf8(bytes).map_err(|e| {
            format!(
                "{what} at offset {at} is not valid UTF-8 (bad byte at offset {})",
                at + 8 + e.valid_up_to()
            )
        })
    }

    fn value_type(&mut self, what: &str) -> PResult<ValueType> {
        let at = self.pos;
        let id = self.u32(what)?;
        ValueType::from_u32(id)
            .ok_or_else(|| format!("unknown metadata value type id {id} at offset {at}"))
    }

    /// One value of type `ty`; `depth` counts the arrays around it.
    fn value(&mut self, ty: ValueType, depth: usize) -> PResult<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.u8("u8 value")?),
            ValueType::I8 => Value::I8(self.u8("i8 value")? as i8),
            ValueType::U16 => Value::U16(self.u16("u16 value")?),
            ValueType::I16 => Value::I16(self.u16("i16 value")? as i16),
            ValueType::U32 => Value::U32(self.u32("u32 value")?),
            ValueType::I32 => Value::I32(self.u32("i32 value")? as i32),
            ValueType::U64 => Value::U64(self.u64("u64 value")?),
            ValueType::I64 => Value::I64(self.u64("i64 value")? as i64),
            ValueType::F32 => Value::F32(f32::from_bits(self.u32("f32 value")?)),
            ValueType::F64 => Value::F64(f64::from_bits(self.u64("f64 value")?)),
            ValueType::Bool => {
                let at = self.pos;
                match self.u8("bool value")? {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => {
                        return Err(format!(
                            "invalid bool byte {b} at offset {at} (must be 0 or 1)"
                        ));
                    }
                }
            }
            ValueType::String => Value::String(self.str("string value")?.to_owned()),
            ValueType::Array => self.array_value(depth + 1)?,
        })
    }

    /// An array (its element type and count, then the elements) at nesting `depth` (1 = outermost).
    fn array_value(&mut self, depth: usize) -> PResult<Value> {
        let at = self.pos;
        if depth > MAX_ARRAY_DEPTH {
            return Err(format!(
                "arrays nested deeper than {MAX_ARRAY_DEPTH} levels at offset {at}"
            ));
        }
        let elem = self.value_type("array element type")?;
        let n = self.count(elem.min_size(), "array length")?;
        let mut out = Vec::with_capacity(n);
        match elem {
            // The common large case (vocabularies): no per-element dispatch.
            ValueType::String => {
                for _ in 0..n {
                    out.push(Value::String(self.str("array string")?.to_owned()));
                }
            }
            _ => {
                for _ in 0..n {
                    out.push(self.value(elem, depth)?);
                }
            }
        }
        Ok(Value::Array(out))
    }
}

/// Parse and validate everything before the data section of a GGUF file held in `buf`.
pub(super) fn parse(buf: &[u8]) -> PResult<Header> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.take(4, "magic")?;
    if magic != b"GGUF" {
        return Err(format!(
            "bad magic {:?} at offset 0 (expected \"GGUF\"): not a GGUF file",
            String::from_utf8_lossy(magic)
        ));
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(
                "unsupported GGUF version 1 at offset 4 (only versions 2 and 3 are supported)"
                    .into(),
            );
        }
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err(format!(
                "unsupported version {v:#x} at offset 4: a big-endian GGUF file; only little-endian is supported"
            ));
        }
        v => {
            return Err(format!(
                "unsupported GGUF version {v} at offset 4 (only versions 2 and 3 are supported)"
            ));
        }
    }
    let tensor_count = c.count(MIN_TENSOR_INFO_SIZE, "tensor_count")?;
    let kv_count = c.count(MIN_KV_SIZE, "kv_count")?;

    let mut metadata = Vec::with_capacity(kv_count);
    let mut meta_index = HashMap::with_capacity(kv_count);
    for i in 0..kv_count {
        let at = c.pos;
        let key = c
            .str("metadata key")
            .map_err(|m| format!("metadata entry #{i}: {m}"))?;
        if meta_index.contains_key(key) {
            return Err(format!("duplicate metadata key '{key}' at offset {at}"));
        }
        let value = c
            .value_type("metadata value type")
            .and_then(|ty| c.value(ty, 0))
            .map_err(|m| format!("metadata '{key}': {m}"))?;
        meta_index.insert(key.to_owned(), metadata.len());
        metadata.push((key.to_owned(), value));
    }

    let alignment = match meta_index.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(&i) => {
            let v = &metadata[i].1;
            match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                Some(a) => {
                    return Err(format!(
                        "general.alignment is {a}: it must be a nonzero power of two"
                    ));
                }
                None => {
                    return Err(format!(
                        "general.alignment has type {}, expected an unsigned integer",
                        v.type_name()
                    ));
                }
            }
        }
    };

    // Re-check the count now that the metadata has consumed its bytes.
    if tensor_count > c.remaining() / MIN_TENSOR_INFO_SIZE {
        return Err(format!(
            "tensor_count {tensor_count} is impossible: the tensor infos at offset {} have {} bytes",
            c.pos,
            c.remaining()
        ));
    }
    let mut tensors = Vec::with_capacity(tensor_count);
    let mut tensor_index = HashMap::with_capacity(tensor_count);
    for i in 0..tensor_count {
        let at = c.pos;
        let name = c
            .str("tensor name")
            .map_err(|m| format!("tensor info #{i}: {m}"))?;
        let info =
            tensor_info(&mut c, name, alignment).map_err(|m| format!("tensor '{name}': {m}"))?;
        if tensor_index.contains_key(name) {
            return Err(format!("duplicate tensor name '{name}' at offset {at}"));
        }
        tensor_index.insert(name.to_owned(), tensors.len());
        tensors.push(info);
    }

    let header_end = c.pos as u64;
    let data_offset = header_end
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| format!("data section offset overflows (alignment {alignment})"))?;
    let file_len = buf.len() as u64;
    if !tensors.is_empty() && data_offset > file_len {
        return Err(format!(
            "data section starts at offset {data_offset} (header ends at {header_end}, alignment {alignment}) \
             but the file is only {file_len} bytes"
        ));
    }
    let data_len = file_len.saturating_sub(data_offset);
    for t in &tensors {
        let end = t.offset.checked_add(t.n_bytes).filter(|&e| e <= data_len);
        if end.is_none() {
            return Err(format!(
                "tensor '{}': data at offset {} + {} bytes in the data section (file offset {}) \
                 extends past the end of the file ({file_len} bytes)",
                t.name,
                t.offset,
                t.n_bytes,
                data_offset as u128 + t.offset as u128
            ));
        }
    }
    check_overlaps(&tensors)?;

    Ok(Header {
        version,
        metadata,
        meta_index,
        tensors,
        tensor_index,
        alignment,
        data_offset,
    })
}

/// The rest of a tensor info after its name: dims, type, offset; validated.
fn tensor_info(c: &mut Cursor<'_>, name: &str, alignment: u64) -> PResult<TensorInfo> {
    let at = c.pos;
    let n_dims = c.u32("n_dims")?;
    if n_dims == 0 || n_dims as usize > MAX_DIMS {
        return Err(format!(
            "n_dims {n_dims} at offset {at} is out of range (1..={MAX_DIMS})"
        ));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for d in 0..n_dims {
        let at = c.pos;
        let v = c.u64("dimension")?;
        if v == 0 {
            return Err(format!("dimension {d} at offset {at} is zero"));
        }
        if v > i64::MAX as u64 {
            return Err(format!("dimension {d} at offset {at} is absurd ({v})"));
        }
        dims.push(v);
    }
    let at = c.pos;
    let id = c.u32("ggml type")?;
    let ty = GgmlType::from_u32(id)
        .ok_or_else(|| format!("unknown or unsupported ggml type id {id} at offset {at}"))?;
    let at = c.pos;
    let offset = c.u64("data offset")?;
    if !offset.is_multiple_of(alignment) {
        return Err(format!(
            "data offset {offset} (read at offset {at}) is not a multiple of the alignment {alignment}"
        ));
    }
    let n_bytes = tensor_bytes(&dims, ty)?;
    Ok(TensorInfo {
        name: name.to_owned(),
        dims,
        ty,
        offset,
        n_bytes,
    })
}

/// `row_bytes(dims[0]) * product(dims[1..])`, with every step checked.
pub(super) fn tensor_bytes(dims: &[u64], ty: GgmlType) -> PResult<u64> {
    let shape = || format!("{dims:?}");
    let mut n_elements: u64 = 1;
    for &d in dims {
        n_elements = n_elements
            .checked_mul(d)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| format!("element count of shape {} overflows", shape()))?;
    }
    let row = dims[0];
    let block = ty.block_size() as u64;
    if !row.is_multiple_of(block) {
        return Err(format!(
            "row length {row} is not a multiple of the {} block size {block}",
            ty.name()
        ));
    }
    let row_bytes = usize::try_from(row)
        .ok()
        .and_then(|r| ty.row_bytes(r))
        .ok_or_else(|| format!("row of {row} {} elements overflows", ty.name()))?;
    dims[1..]
        .iter()
        .try_fold(row_bytes as u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| usize::try_from(n).is_ok())
        .ok_or_else(|| format!("byte size of shape {} ({}) overflows", shape(), ty.name()))
}

/// Tensors must not share bytes.
fn check_overlaps(tensors: &[TensorInfo]) -> PResult<()> {
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| t.offset);
    for w in order.windows(2) {
        // Extents were checked against the file size, so the sum cannot overflow.
        if w[0].offset + w[0].n_bytes > w[1].offset {
            return Err(format!(
                "tensor '{}' (data offset {}) overlaps tensor '{}' (data offset {}, {} bytes)",
                w[1].name, w[1].offset, w[0].name, w[0].offset, w[0].n_bytes
            ));
        }
    }
    Ok(())
}
