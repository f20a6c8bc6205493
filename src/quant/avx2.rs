//! AVX2/FMA/F16C forms of the [`Isa`] operations, and register helpers shared
//! with `q8_avx2.rs`.
//!
//! Everything here is `#[inline(always)]` and reached only through the
//! `#[target_feature(enable = "avx2,fma,f16c")]` wrappers, whose callers hold an
//! [`Avx2`] token. The legacy block decoders compute exactly the portable
//! formulas (one multiply, then one add for the offset types; never fused), so
//! both levels give bit-identical values.

use std::arch::x86_64::*;

use super::blocks::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, QK};
use super::simd::{Avx2, Isa};

impl Isa for Avx2 {
    /// Four 8-lane accumulators: four independent FMA chains per 32 values.
    type Acc = [__m256; 4];

    #[inline(always)]
    fn f16(self, bits: [u8; 2]) -> f32 {
        // SAFETY: the token proves F16C is present.
        unsafe {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                u16::from_le_bytes(bits) as i32
            )))
        }
    }
    #[inline(always)]
    fn f16x32(self, bits: &[u8; 64], y: &mut [f32; QK]) {
        // SAFETY: the token proves F16C/AVX; unaligned accesses within the arrays.
        unsafe {
            for k in 0..4 {
                let h = _mm_loadu_si128(bits.as_ptr().add(16 * k).cast());
                _mm256_storeu_ps(y.as_mut_ptr().add(8 * k), _mm256_cvtph_ps(h));
            }
        }
    }
    #[inline(always)]
    fn mul_add(self, a: f32, b: f32, c: f32) -> f32 {
        // Inlined into `target_feature(enable = "fma")` code this is one vfmadd.
        a.mul_add(b, c)
    }
    #[inline(always)]
    fn acc_zero(self) -> [__m256; 4] {
        // SAFETY: the token proves AVX.
        unsafe { [_mm256_setzero_ps(); 4] }
    }
    #[inline(always)]
    fn fma32(self, acc: &mut [__m256; 4], w: &[f32; QK], x: &[f32; QK]) {
        // SAFETY: the token proves AVX/FMA; loads of 8 within 32-value arrays.
        unsafe {
            for (k, a) in acc.iter_mut().enumerate() {
                let wv = _mm256_loadu_ps(w.as_ptr().add(8 * k));
                let xv = _mm256_loadu_ps(x.as_ptr().add(8 * k));
                *a = _mm256_fmadd_ps(wv, xv, *a);
            }
        }
    }
    #[inline(always)]
    fn acc_sum(self, acc: [__m256; 4]) -> f32 {
        // SAFETY: the token proves AVX.
        unsafe {
            let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            hsum(s)
        }
    }

    #[inline(always)]
    fn decode_q4_0(self, b: &BlockQ4_0, y: &mut [f32; QK]) {
        // SAFETY (this and the methods below): the token proves AVX2/FMA/F16C;
        // all loads and stores stay within the block and the 32-value arrays.
        unsafe { store(y, weights_q4_0(self, b)) }
    }
    #[inline(always)]
    fn decode_q4_1(self, b: &BlockQ4_1, y: &mut [f32; QK]) {
        unsafe { store(y, weights_q4_1(self, b)) }
    }
    #[inline(always)]
    fn decode_q5_0(self, b: &BlockQ5_0, y: &mut [f32; QK]) {
        unsafe { store(y, weights_q5_0(self, b)) }
    }
    #[inline(always)]
    fn decode_q5_1(self, b: &BlockQ5_1, y: &mut [f32; QK]) {
        unsafe { store(y, weights_q5_1(self, b)) }
    }
    #[inline(always)]
    fn decode_q8_0(self, b: &BlockQ8_0, y: &mut [f32; QK]) {
        unsafe { store(y, weights_q8_0(self, b)) }
    }
    #[inline(always)]
    fn dot_q4_0(self, acc: &mut [__m256; 4], b: &BlockQ4_0, x: &[f32; QK]) {
        unsafe { fma(acc, weights_q4_0(self, b), x) }
    }
    #[inline(always)]
    fn dot_q4_1(self, acc: &mut [__m256; 4], b: &BlockQ4_1, x: &[f32; QK]) {
        unsafe { fma(acc, weights_q4_1(self, b), x) }
    }
    #[inline(always)]
    fn dot_q5_0(self, acc: &mut [__m256; 4], b: &BlockQ5_0, x: &[f32; QK]) {
        unsafe { fma(acc, weights_q5_0(self, b), x) }
    }
    #[inline(always)]
    fn dot_q5_1(self, acc: &mut [__m256; 4], b: &BlockQ5_1, x: &[f32; QK]) {
        unsafe { fma(acc, weights_q5_1(self, b), x) }
    }
    #[inline(always)]
    fn dot_q8_0(self, acc: &mut [__m256; 4], b: &BlockQ8_0, x: &[f32; QK]) {
        unsafe { fma(acc, weights_q8_0(self, b), x) }
    }
}

// The decoded weights of one legacy block, in four registers of 8.

#[inline(always)]
unsafe fn weights_q4_0(isa: Avx2, b: &BlockQ4_0) -> [__m256; 4] {
    unsafe {
        let q = _mm256_sub_epi8(nibbles(&b.qs), _mm256_set1_epi8(8));
        scaled(to_f32x32(q, true), isa.f16(b.d), None)
    }
}

#[inline(always)]
unsafe fn weights_q4_1(isa: Avx2, b: &BlockQ4_1) -> [__m256; 4] {
    unsafe {
        scaled(
            to_f32x32(nibbles(&b.qs), false),
            isa.f16(b.d),
            Some(isa.f16(b.m)),
        )
    }
}

#[inline(always)]
unsafe fn weights_q5_0(isa: Avx2, b: &BlockQ5_0) -> [__m256; 4] {
    unsafe {
        let q = _mm256_or_si256(nibbles(&b.qs), q5_high_signed(b.qh));
        scaled(to_f32x32(q, true), isa.f16(b.d), None)
    }
}

#[inline(always)]
unsafe fn weights_q5_1(isa: Avx2, b: &BlockQ5_1) -> [__m256; 4] {
    unsafe {
        let q = _mm256_or_si256(nibbles(&b.qs), q5_high_unsigned(b.qh));
        scaled(to_f32x32(q, false), isa.f16(b.d), Some(isa.f16(b.m)))
    }
}

#[inline(always)]
unsafe fn weights_q8_0(isa: Avx2, b: &BlockQ8_0) -> [__m256; 4] {
    unsafe {
        let q = _mm256_loadu_si256(b.qs.as_ptr().cast());
        scaled(to_f32x32(q, true), isa.f16(b.d), None)
    }
}

#[inline(always)]
unsafe fn store(y: &mut [f32; QK], w: [__m256; 4]) {
    unsafe {
        for (k, wk) in w.into_iter().enumerate() {
            _mm256_storeu_ps(y.as_mut_ptr().add(8 * k), wk);
        }
    }
}

#[inline(always)]
unsafe fn fma(acc: &mut [__m256; 4], w: [__m256; 4], x: &[f32; QK]) {
    unsafe {
        for k in 0..4 {
            acc[k] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(x.as_ptr().add(8 * k)), acc[k]);
        }
    }
}

/// Sum of the 8 lanes.
#[inline(always)]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// 16 packed bytes to 32 nibbles: low nibbles in bytes 0..16, high in 16..32
/// (the legacy blocks' order).
#[inline(always)]
pub(crate) unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
    unsafe {
        let v = _mm_loadu_si128(qs.as_ptr().cast());
        let m4 = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(v, m4);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        _mm256_set_m128i(hi, lo)
    }
}

/// Byte `i` is 0xFF where bit `i` of the little-endian u32 `bits` is set, else 0.
#[inline(always)]
pub(crate) unsafe fn bit_mask(bits: [u8; 4]) -> __m256i {
    unsafe {
        let v = _mm256_set1_epi32(i32::from_le_bytes(bits));
        #[rustfmt::skip]
        let spread = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        let v = _mm256_and_si256(_mm256_shuffle_epi8(v, spread), bit);
        _mm256_cmpeq_epi8(v, bit)
    }
}

/// What to OR into Q5_0 nibbles to get `q − 16` as i8: 0xF0 where the fifth
/// bit is clear (nibble − 16), 0 where set (the nibble itself).
#[inline(always)]
pub(crate) unsafe fn q5_high_signed(qh: [u8; 4]) -> __m256i {
    unsafe { _mm256_andnot_si256(bit_mask(qh), _mm256_set1_epi8(0xF0_u8 as i8)) }
}

/// The fifth bits of Q5_1 as 0x10 per byte.
#[inline(always)]
pub(crate) unsafe fn q5_high_unsigned(qh: [u8; 4]) -> __m256i {
    unsafe { _mm256_and_si256(bit_mask(qh), _mm256_set1_epi8(0x10)) }
}

/// 32 bytes (signed or unsigned) to 32 f32, exactly.
#[inline(always)]
unsafe fn to_f32x32(q: __m256i, signed: bool) -> [__m256; 4] {
    unsafe {
        let lo = _mm256_castsi256_si128(q);
        let hi = _mm256_extracti128_si256(q, 1);
        let parts = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
        let mut out = [_mm256_setzero_ps(); 4];
        for k in 0..4 {
            let i = if signed {
                _mm256_cvtepi8_epi32(parts[k])
            } else {
                _mm256_cvtepu8_epi32(parts[k])
            };
            out[k] = _mm256_cvtepi32_ps(i);
        }
        out
    }
}

/// `q·d` or `q·d + m`, rounded after each operation like the portable code.
#[inline(always)]
unsafe fn scaled(q: [__m256; 4], d: f32, m: Option<f32>) -> [__m256; 4] {
    unsafe {
        let dv = _mm256_set1_ps(d);
        let mut w = [_mm256_setzero_ps(); 4];
        for k in 0..4 {
            w[k] = _mm256_mul_ps(q[k], dv);
            if let Some(m) = m {
                w[k] = _mm256_add_ps(w[k], _mm256_set1_ps(m));
            }
        }
        w
    }
}
