//! Decoders for the float types and the 32-value legacy blocks (Q4_0 … Q8_0).
//!
//! Each decoder computes exactly what ggml's `dequantize_row_*` computes, in the
//! same float operations (one multiply, then one add for the offset types), so
//! every instantiation gives bit-identical values.

use super::blocks::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, QK};
use super::simd::Isa;

/// Q4_0: `d·(q − 8)`.
#[inline(always)]
pub(crate) fn decode_q4_0<I: Isa>(isa: I, b: &BlockQ4_0, y: &mut [f32; QK]) {
    let d = isa.f16(b.d);
    for j in 0..QK / 2 {
        y[j] = ((b.qs[j] & 0xF) as i32 - 8) as f32 * d;
        y[j + QK / 2] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: `d·q + m`.
#[inline(always)]
pub(crate) fn decode_q4_1<I: Isa>(isa: I, b: &BlockQ4_1, y: &mut [f32; QK]) {
    let d = isa.f16(b.d);
    let m = isa.f16(b.m);
    for j in 0..QK / 2 {
        y[j] = (b.qs[j] & 0xF) as f32 * d + m;
        y[j + QK / 2] = (b.qs[j] >> 4) as f32 * d + m;
    }
}

/// The 5-bit quants of a Q5_0/Q5_1 block, unsigned (0..32).
#[inline(always)]
fn q5_quants(qh: [u8; 4], qs: &[u8; QK / 2]) -> [u8; QK] {
    let qh = u32::from_le_bytes(qh);
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        q[j] = (qs[j] & 0xF) | h0 as u8;
        q[j + QK / 2] = (qs[j] >> 4) | h1 as u8;
    }
    q
}

/// Q5_0: `d·(q − 16)`.
#[inline(always)]
pub(crate) fn decode_q5_0<I: Isa>(isa: I, b: &BlockQ5_0, y: &mut [f32; QK]) {
    let d = isa.f16(b.d);
    let q = q5_quants(b.qh, &b.qs);
    for (v, &q) in y.iter_mut().zip(&q) {
        *v = (q as i32 - 16) as f32 * d;
    }
}

/// Q5_1: `d·q + m`.
#[inline(always)]
pub(crate) fn decode_q5_1<I: Isa>(isa: I, b: &BlockQ5_1, y: &mut [f32; QK]) {
    let d = isa.f16(b.d);
    let m = isa.f16(b.m);
    let q = q5_quants(b.qh, &b.qs);
    for (v, &q) in y.iter_mut().zip(&q) {
        *v = q as f32 * d + m;
    }
}

/// Q8_0: `d·q`.
#[inline(always)]
pub(crate) fn decode_q8_0<I: Isa>(isa: I, b: &BlockQ8_0, y: &mut [f32; QK]) {
    let d = isa.f16(b.d);
    for (v, &q) in y.iter_mut().zip(&b.qs) {
        *v = q as f32 * d;
    }
}

/// 32 little-endian f32 (128 bytes).
#[inline(always)]
pub(crate) fn decode_f32x32(b: &[u8; 128], y: &mut [f32; QK]) {
    for (v, c) in y.iter_mut().zip(b.chunks_exact(4)) {
        *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

/// 32 little-endian f16 (64 bytes).
#[inline(always)]
pub(crate) fn decode_f16x32<I: Isa>(isa: I, b: &[u8; 64], y: &mut [f32; QK]) {
    isa.f16x32(b, y)
}

/// 32 little-endian bf16 (64 bytes): the f32 with the same top 16 bits.
#[inline(always)]
pub(crate) fn decode_bf16x32(b: &[u8; 64], y: &mut [f32; QK]) {
    for (v, c) in y.iter_mut().zip(b.chunks_exact(2)) {
        *v = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
    }
}

/// One f32 value.
#[inline(always)]
pub(crate) fn decode_f32(c: &[u8]) -> f32 {
    f32::from_le_bytes([c[0], c[1], c[2], c[3]])
}

/// One bf16 value.
#[inline(always)]
pub(crate) fn decode_bf16(c: &[u8]) -> f32 {
    f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)
}
