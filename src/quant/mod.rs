//! GGML block formats: their layouts, CPU dequantization and dot products.
//!
//! A row of a quantized tensor is a sequence of blocks; each format decodes
//! `block_size()` values from `type_size()` bytes.

/// A GGML tensor element type, by its GGUF type id.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    BF16 = 30,
}

impl GgmlType {
    /// The type for a GGUF type id, or `None` for ids edgetune does not support.
    pub fn from_u32(id: u32) -> Option<Self> {
        todo!()
    }
    /// Elements per block (1 for F32/F16/BF16, 32 for Q4_0…Q8_0, 256 for k-quants).
    pub fn block_size(self) -> usize {
        todo!()
    }
    /// Bytes per block.
    pub fn type_size(self) -> usize {
        todo!()
    }
    /// The GGML name: "F32", "Q4_K", …
    pub fn name(self) -> &'static str {
        todo!()
    }
    /// Bytes of a row of `n` elements, or `None` when `n` is not a multiple of the block size
    /// (or the byte count overflows).
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        todo!()
    }
}

/// Decode one row: `src` holds exactly `ty.row_bytes(dst.len())` bytes.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> crate::Result<()> {
    todo!()
}

/// `sum_i row[i] * x[i]` for one quantized row; `src` holds exactly `ty.row_bytes(x.len())` bytes.
pub fn dot_row(ty: GgmlType, src: &[u8], x: &[f32]) -> f32 {
    todo!()
}

/// Encode one row of f32 into `ty` (round-to-nearest, as ggml's reference quantizers).
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> crate::Result<()> {
    todo!()
}
