//! GGML block formats: their layouts, CPU dequantization and dot products.
//!
//! A row of a quantized tensor is a sequence of blocks; each format decodes
//! `block_size()` values from `type_size()` bytes. The layouts are declared once
//! in [`blocks`].
//!
//! Three ways to use a row, fastest last:
//! - [`dequantize_row`] decodes it exactly as ggml does (bit-identical values);
//!   the GEMM path decodes a panel of rows into scratch and multiplies in f32.
//! - [`dot_row`] is `Σ row[i]·x[i]` over the exact decoded values, decoded block
//!   by block on the stack: the oracle for the path below.
//! - [`dot_row_q8`] multiplies the row's integer quants with an activation
//!   quantized once to 8 bits ([`quantize_activation_q8`]), as llama.cpp does;
//!   it is the matrix-vector path of generation ([`matvec_q8`]).
//!
//! All kernels are chosen at run time for the CPU (AVX2+FMA+F16C on x86-64,
//! portable Rust elsewhere); [`cpu_features`] names the choice.

#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod blocks;
mod kernels;
mod kquants;
mod legacy;
pub mod q4_gemm;
mod q8;
#[cfg(target_arch = "x86_64")]
mod q8_avx2;
mod quantize;
mod simd;

#[cfg(test)]
mod tests;

pub use q8::QuantizedActivation;

use crate::{Error, Result};

/// A GGML tensor element type, by its GGUF type id.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    /// 32-bit IEEE float.
    F32 = 0,
    /// 16-bit IEEE float.
    F16 = 1,
    /// 32 values: f16 scale, 4-bit quants.
    Q4_0 = 2,
    /// 32 values: f16 scale and min, 4-bit quants.
    Q4_1 = 3,
    /// 32 values: f16 scale, 5-bit quants.
    Q5_0 = 6,
    /// 32 values: f16 scale and min, 5-bit quants.
    Q5_1 = 7,
    /// 32 values: f16 scale, 8-bit quants.
    Q8_0 = 8,
    /// 256 values: 8 sub-blocks with 6-bit scales and mins, 4-bit quants.
    Q4_K = 12,
    /// 256 values: as Q4_K with 5-bit quants.
    Q5_K = 13,
    /// 256 values: 16 sub-blocks with 8-bit scales, 6-bit quants.
    Q6_K = 14,
    /// bfloat16: the top half of an f32.
    BF16 = 30,
}

impl GgmlType {
    /// Every supported type, in id order.
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::BF16,
    ];

    /// The type for a GGUF type id, or `None` for ids edgetune does not support.
    pub fn from_u32(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| *t as u32 == id)
    }
    /// Elements per block (1 for F32/F16/BF16, 32 for Q4_0…Q8_0, 256 for k-quants).
    pub fn block_size(self) -> usize {
        use GgmlType as T;
        match self {
            T::F32 | T::F16 | T::BF16 => 1,
            T::Q4_0 | T::Q4_1 | T::Q5_0 | T::Q5_1 | T::Q8_0 => blocks::QK,
            T::Q4_K | T::Q5_K | T::Q6_K => blocks::QK_K,
        }
    }
    /// Bytes per block.
    pub fn type_size(self) -> usize {
        use GgmlType as T;
        use std::mem::size_of;
        match self {
            T::F32 => 4,
            T::F16 | T::BF16 => 2,
            T::Q4_0 => size_of::<blocks::BlockQ4_0>(),
            T::Q4_1 => size_of::<blocks::BlockQ4_1>(),
            T::Q5_0 => size_of::<blocks::BlockQ5_0>(),
            T::Q5_1 => size_of::<blocks::BlockQ5_1>(),
            T::Q8_0 => size_of::<blocks::BlockQ8_0>(),
            T::Q4_K => size_of::<blocks::BlockQ4K>(),
            T::Q5_K => size_of::<blocks::BlockQ5K>(),
            T::Q6_K => size_of::<blocks::BlockQ6K>(),
        }
    }
    /// The GGML name: "F32", "Q4_K", …
    pub fn name(self) -> &'static str {
        use GgmlType as T;
        match self {
            T::F32 => "F32",
            T::F16 => "F16",
            T::Q4_0 => "Q4_0",
            T::Q4_1 => "Q4_1",
            T::Q5_0 => "Q5_0",
            T::Q5_1 => "Q5_1",
            T::Q8_0 => "Q8_0",
            T::Q4_K => "Q4_K",
            T::Q5_K => "Q5_K",
            T::Q6_K => "Q6_K",
            T::BF16 => "BF16",
        }
    }
    /// Bytes of a row of `n` elements, or `None` when `n` is not a multiple of the block size
    /// (or the byte count overflows).
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.type_size())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Checks that `bytes` is exactly a row of `n` values of `ty`.
fn check_row(ty: GgmlType, bytes: usize, n: usize) -> Result<()> {
    match ty.row_bytes(n) {
        Some(b) if b == bytes => Ok(()),
        Some(b) => Err(Error::Quant(format!(
            "{ty} row of {n} values is {b} bytes, got {bytes}"
        ))),
        None => Err(Error::Quant(format!(
            "{ty} row length {n} is not a multiple of the block size {}",
            ty.block_size()
        ))),
    }
}

/// Decode one row: `src` holds exactly `ty.row_bytes(dst.len())` bytes.
///
/// The values are bit-identical to ggml's `dequantize_row_*` (and to the `gguf`
/// Python package's `dequantize`). A length mismatch is an [`Error::Quant`].
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_row(ty, src.len(), dst.len())?;
    kernels::dequantize(simd::level(), ty, src, dst);
    Ok(())
}

/// `sum_i row[i] * x[i]` for one quantized row; `src` holds exactly `ty.row_bytes(x.len())` bytes.
///
/// `row[i]` are the exact values of [`dequantize_row`]; the sum is in f32 with
/// 16 partial sums (fused multiply-adds where the CPU has them).
///
/// # Panics
/// When `src.len()` is not `ty.row_bytes(x.len())`: callers size rows from the
/// tensor's validated shape, so a mismatch is a bug, not bad input.
pub fn dot_row(ty: GgmlType, src: &[u8], x: &[f32]) -> f32 {
    if let Err(e) = check_row(ty, src.len(), x.len()) {
        panic!("dot_row: {e}");
    }
    kernels::dot(simd::level(), ty, src, x)
}

/// Encode one row of f32 into `ty` (round-to-nearest, as ggml's reference quantizers).
///
/// `dst` holds exactly `ty.row_bytes(src.len())` bytes. The legacy types give the
/// bytes of ggml's `quantize_row_*_ref`; the k-quants use a plain round-to-nearest
/// choice of sub-block scales (ggml searches for better ones), so their bytes may
/// differ from llama.cpp's while decoding to within one quantization step.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_row(ty, dst.len(), src.len())?;
    quantize::quantize(ty, src, dst);
    Ok(())
}

/// Quantize an activation vector to 8 bits per value for [`dot_row_q8`].
///
/// Blocks of 32 values get an f32 scale `max|x|/127` and rounded quants; the
/// vector is zero-padded to a multiple of 32. To reuse the buffers across calls
/// use [`QuantizedActivation::quantize`].
pub fn quantize_activation_q8(x: &[f32]) -> QuantizedActivation {
    let mut a = QuantizedActivation::new();
    a.quantize(x);
    a
}

/// `Σ row[i]·x[i]` from integer dot products with the quantized activation.
///
/// Integer-exact within each 32-value block; the only error beyond [`dot_row`]'s
/// is the activation's 8-bit rounding (relative error about 0.5% of
/// `Σ|row[i]·x[i]|` at worst, typically far less). F32/F16/BF16 rows use the
/// activation's f32 copy and equal [`dot_row`].
///
/// # Panics
/// When `src.len()` is not `ty.row_bytes(a.len())` (see [`dot_row`]).
pub fn dot_row_q8(ty: GgmlType, src: &[u8], a: &QuantizedActivation) -> f32 {
    if let Err(e) = check_row(ty, src.len(), a.len()) {
        panic!("dot_row_q8: {e}");
    }
    q8::dot(simd::level(), ty, src, a)
}

/// Matrix-vector product: `out[r] = dot_row_q8(ty, row r, a)` for the
/// `out.len()` consecutive rows of `a.len()` values in `src`.
///
/// Single-threaded; split `out` and `src` by rows to parallelize.
pub fn matvec_q8(ty: GgmlType, src: &[u8], a: &QuantizedActivation, out: &mut [f32]) -> Result<()> {
    let row = ty.row_bytes(a.len()).ok_or_else(|| {
        Error::Quant(format!(
            "{ty} row length {} is not a multiple of the block size {}",
            a.len(),
            ty.block_size()
        ))
    })?;
    if row.checked_mul(out.len()) != Some(src.len()) {
        return Err(Error::Quant(format!(
            "{ty} matrix of {} rows × {} values is {} bytes, got {}",
            out.len(),
            a.len(),
            row.saturating_mul(out.len()),
            src.len()
        )));
    }
    let level = simd::level();
    if row == 0 {
        out.fill(0.0);
        return Ok(());
    }
    for (o, r) in out.iter_mut().zip(src.chunks_exact(row)) {
        *o = q8::dot(level, ty, r, a);
    }
    Ok(())
}

/// The instruction set the kernels run with on this CPU: `"avx2+fma+f16c"` or
/// `"portable"` (also when `EDGETUNE_PORTABLE=1` forces it).
pub fn cpu_features() -> &'static str {
    if wide_simd() {
        return "avx2+fma+f16c";
    }
    "portable"
}

/// Whether the AVX2+FMA kernels are chosen (false with `EDGETUNE_PORTABLE=1`):
/// other modules' `#[target_feature]` paths follow the same choice.
pub(crate) fn wide_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    if let simd::Level::Avx2(_) = simd::level() {
        return true;
    }
    false
}
