//! AVX2 integer kernels for [`dot_row_q8`](super::dot_row_q8); the formulas
//! are those of `q8.rs`, whose portable kernels are their reference.
//!
//! Each 32-weight group becomes 32 bytes in one register and meets the 32
//! activation quants in `vpmaddubsw` (unsigned × signed byte pairs → i16) and
//! `vpmaddwd` (i16 pairs → i32), then one `vcvtdq2ps` + `vfmadd` with the
//! group's float scale. `vpmaddubsw` needs an unsigned operand: unsigned quants
//! (Q4_1, Q5_1, K-quants) go in directly, signed ones (Q8_0, Q4_0, Q5_0) as
//! `|q|` against `a·sign(q)`. Activation quants are in −127..=127, so no i16
//! sum saturates (at most 2·128·127).

use std::arch::x86_64::*;

use super::GgmlType;
use super::blocks::{
    BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, QK,
    as_blocks, scales_mins_k4,
};
use super::q8::QuantizedActivation;
use super::simd::{Avx2, Isa};

/// `Σ row·a` for a quantized `ty` (not a float type; lengths already checked).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot(isa: Avx2, ty: GgmlType, src: &[u8], a: &QuantizedActivation) -> f32 {
    use GgmlType as T;
    // SAFETY (all arms): this function runs with AVX2/FMA/F16C enabled, which
    // the token proves; the kernels only load within their slices.
    unsafe {
        match ty {
            T::Q4_0 => dot_q4_0(isa, src, a),
            T::Q4_1 => dot_q4_1(isa, src, a),
            T::Q5_0 => dot_q5_0(isa, src, a),
            T::Q5_1 => dot_q5_1(isa, src, a),
            T::Q8_0 => dot_q8_0(isa, src, a),
            T::Q4_K => dot_q4_k(isa, src, a),
            T::Q5_K => dot_q5_k(isa, src, a),
            T::Q6_K => dot_q6_k(isa, src, a),
            T::F32 | T::F16 | T::BF16 => super::q8::dot_generic(isa, ty, src, a),
        }
    }
}

#[inline(always)]
unsafe fn load(p: &[i8; QK]) -> __m256i {
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

#[inline(always)]
unsafe fn load_u8(p: &[u8]) -> __m256i {
    debug_assert!(p.len() >= 32);
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

/// Sum of the 8 lanes.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// `Σ` of products of unsigned bytes `q` with signed bytes `y`, as 8 i32 lanes.
#[inline(always)]
unsafe fn dot_u8_i8(q: __m256i, y: __m256i) -> __m256i {
    unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), _mm256_set1_epi16(1)) }
}

/// `Σ` of products of signed bytes `q` (any i8) with `y` (−127..=127), as 8 f32 lanes.
#[inline(always)]
unsafe fn dot_i8_i8(q: __m256i, y: __m256i) -> __m256 {
    unsafe {
        let p = dot_u8_i8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q));
        _mm256_cvtepi32_ps(p)
    }
}

/// 16 packed bytes to 32 nibbles: low nibbles in bytes 0..16, high in 16..32.
#[inline(always)]
unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
    unsafe {
        let v = _mm_loadu_si128(qs.as_ptr().cast());
        let m4 = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(v, m4);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        _mm256_set_m128i(hi, lo)
    }
}

/// Byte `i` is 0xFF where bit `i` of `bits` is set, else 0.
#[inline(always)]
unsafe fn bit_mask(bits: [u8; 4]) -> __m256i {
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

macro_rules! legacy_dot {
    ($name:ident, $block:ty, |$isa:ident, $b:ident, $y:ident| $p:expr, offset: $m:expr) => {
        #[inline(always)]
        unsafe fn $name($isa: Avx2, src: &[u8], a: &QuantizedActivation) -> f32 {
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 2];
                let mut offs = 0f32;
                let blocks = as_blocks::<$block>(src);
                let it = blocks.iter().zip(&a.qs).zip(a.d.iter().zip(&a.s));
                for (i, (($b, q), (&da, &s))) in it.enumerate() {
                    let $y = load(q);
                    let p: __m256 = $p;
                    let k = i & 1;
                    acc[k] = _mm256_fmadd_ps(_mm256_set1_ps($isa.f16($b.d) * da), p, acc[k]);
                    let m: Option<[u8; 2]> = $m;
                    if let Some(m) = m {
                        offs += $isa.f16(m) * s;
                    }
                }
                hsum(_mm256_add_ps(acc[0], acc[1])) + offs
            }
        }
    };
}

legacy_dot!(dot_q8_0, BlockQ8_0, |isa, b, y| dot_i8_i8(load(&b.qs), y), offset: None);
legacy_dot!(dot_q4_0, BlockQ4_0, |isa, b, y| {
    dot_i8_i8(_mm256_sub_epi8(nibbles(&b.qs), _mm256_set1_epi8(8)), y)
}, offset: None);
legacy_dot!(dot_q4_1, BlockQ4_1, |isa, b, y| {
    _mm256_cvtepi32_ps(dot_u8_i8(nibbles(&b.qs), y))
}, offset: Some(b.m));
legacy_dot!(dot_q5_0, BlockQ5_0, |isa, b, y| {
    // q − 16 as i8: bit 4 clear → nibble | 0xF0; set → the nibble itself.
    let high = _mm256_andnot_si256(bit_mask(b.qh), _mm256_set1_epi8(0xF0_u8 as i8));
    dot_i8_i8(_mm256_or_si256(nibbles(&b.qs), high), y)
}, offset: None);
legacy_dot!(dot_q5_1, BlockQ5_1, |isa, b, y| {
    let high = _mm256_and_si256(bit_mask(b.qh), _mm256_set1_epi8(0x10));
    _mm256_cvtepi32_ps(dot_u8_i8(_mm256_or_si256(nibbles(&b.qs), high), y))
}, offset: Some(b.m));

/// Eight u8 as eight f32 lanes.
#[inline(always)]
unsafe fn u8x8_ps(v: [u8; 8]) -> __m256 {
    unsafe { _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(v.as_ptr().cast()))) }
}

/// Lane `j` of `v` in all lanes.
#[inline(always)]
unsafe fn lane(v: __m256, j: i32) -> __m256 {
    unsafe { _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(j)) }
}

/// Q4_K and Q5_K: `qs`/`qh` give the unsigned quants of sub-blocks 2p, 2p+1.
#[inline(always)]
unsafe fn dot_k4<B: super::blocks::Block>(
    isa: Avx2,
    src: &[u8],
    a: &QuantizedActivation,
    parts: impl Fn(&B) -> ([u8; 2], [u8; 2], [u8; 12]),
    quants: impl Fn(&B, usize, &mut __m256i) -> (__m256i, __m256i),
) -> f32 {
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let mut accm = _mm256_setzero_ps();
        let blocks = as_blocks::<B>(src);
        for (i, b) in blocks.iter().enumerate() {
            let (d, dmin, scales) = parts(b);
            let (d, dmin) = (isa.f16(d), isa.f16(dmin));
            let (sc, m) = scales_mins_k4(&scales);
            let da = _mm256_loadu_ps(a.d[8 * i..8 * i + 8].as_ptr());
            let sa = _mm256_loadu_ps(a.s[8 * i..8 * i + 8].as_ptr());
            // Per sub-block j: d·sc[j]·da[j], and the offsets dmin·Σ m[j]·s[j].
            let f = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(d), u8x8_ps(sc)), da);
            accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_mul_ps(u8x8_ps(m), sa), accm);
            let ys = &a.qs[8 * i..8 * i + 8];
            let mut state = _mm256_setzero_si256();
            for p in 0..4 {
                let (lo, hi) = quants(b, p, &mut state);
                let p0 = _mm256_cvtepi32_ps(dot_u8_i8(lo, load(&ys[2 * p])));
                let p1 = _mm256_cvtepi32_ps(dot_u8_i8(hi, load(&ys[2 * p + 1])));
                acc = _mm256_fmadd_ps(lane(f, 2 * p as i32), p0, acc);
                acc = _mm256_fmadd_ps(lane(f, 2 * p as i32 + 1), p1, acc);
            }
        }
        hsum(_mm256_sub_ps(acc, accm))
    }
}

#[inline(always)]
unsafe fn dot_q4_k(isa: Avx2, src: &[u8], a: &QuantizedActivation) -> f32 {
    unsafe {
        dot_k4(
            isa,
            src,
            a,
            |b: &BlockQ4K| (b.d, b.dmin, b.scales),
            |b, p, _| {
                let v = load_u8(&b.qs[32 * p..]);
                let m4 = _mm256_set1_epi8(0x0F);
                (_mm256_and_si256(v, m4), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4))
            },
        )
    }
}

#[inline(always)]
unsafe fn dot_q5_k(isa: Avx2, src: &[u8], a: &QuantizedActivation) -> f32 {
    unsafe {
        dot_k4(
            isa,
            src,
            a,
            |b: &BlockQ5K| (b.d, b.dmin, b.scales),
            |b, p, hv| {
                // `hv` holds qh shifted right by 2p: bits 0 and 1 of each byte are
                // the fifth bits of sub-blocks 2p and 2p+1.
                if p == 0 {
                    *hv = load_u8(&b.qh);
                } else {
                    *hv = _mm256_srli_epi16(*hv, 2);
                }
                let v = load_u8(&b.qs[32 * p..]);
                let m4 = _mm256_set1_epi8(0x0F);
                let b4 = _mm256_set1_epi8(0x10);
                let lo = _mm256_or_si256(
                    _mm256_and_si256(v, m4),
                    _mm256_and_si256(_mm256_slli_epi16(*hv, 4), b4),
                );
                let hi = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
                    _mm256_and_si256(_mm256_slli_epi16(*hv, 3), b4),
                );
                (lo, hi)
            },
        )
    }
}

#[inline(always)]
unsafe fn dot_q6_k(isa: Avx2, src: &[u8], a: &QuantizedActivation) -> f32 {
    unsafe {
        // Shuffles putting i16 scale 2g in the low 128-bit lane, 2g+1 in the high.
        let pick: [__m256i; 4] = std::array::from_fn(|g| {
            let (lo, hi) = (4 * g as i8, 4 * g as i8 + 2);
            let lo = _mm_set1_epi16(i16::from_le_bytes([lo as u8, lo as u8 + 1]));
            let hi = _mm_set1_epi16(i16::from_le_bytes([hi as u8, hi as u8 + 1]));
            _mm256_set_m128i(hi, lo)
        });
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(0x30);
        let k32 = _mm256_set1_epi8(32);
        let mut acc = _mm256_setzero_ps();
        for (i, b) in as_blocks::<BlockQ6K>(src).iter().enumerate() {
            let da = _mm256_loadu_ps(a.d[8 * i..8 * i + 8].as_ptr());
            let f = _mm256_mul_ps(_mm256_set1_ps(isa.f16(b.d)), da);
            let ys = &a.qs[8 * i..8 * i + 8];
            for h in 0..2 {
                let l0 = load_u8(&b.ql[64 * h..]);
                let l1 = load_u8(&b.ql[64 * h + 32..]);
                let qh = load_u8(&b.qh[32 * h..]);
                let q = [
                    _mm256_or_si256(
                        _mm256_and_si256(l0, m4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(l1, m4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                        _mm256_and_si256(qh, m2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                        _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2),
                    ),
                ];
                let sc8 = _mm_loadl_epi64(b.scales[8 * h..].as_ptr().cast());
                let sc = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(sc8));
                for g in 0..4 {
                    let y = load(&ys[4 * h + g]);
                    // (q − 32)·y per byte pair, from unsigned q: q·y − 32·y.
                    let p = _mm256_sub_epi16(
                        _mm256_maddubs_epi16(q[g], y),
                        _mm256_maddubs_epi16(k32, y),
                    );
                    let p = _mm256_madd_epi16(p, _mm256_shuffle_epi8(sc, pick[g]));
                    let fk = lane(f, (4 * h + g) as i32);
                    acc = _mm256_fmadd_ps(fk, _mm256_cvtepi32_ps(p), acc);
                }
            }
        }
        hsum(acc)
    }
}
