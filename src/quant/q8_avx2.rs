//! AVX2 integer kernels for [`dot_row_q8`](super::dot_row_q8); the formulas
//! are those of `q8.rs`, whose portable kernels are their reference.
//!
//! Each 32-weight group becomes 32 bytes in one register and meets the 32
//! activation quants in `vpmaddubsw` (unsigned × signed byte pairs → i16) and
//! `vpmaddwd` (i16 pairs → i32), then one `vcvtdq2ps` + `vfmadd` with the
//! group's float scale. `vpmaddubsw` needs an unsigned operand: unsigned quants
//! (Q4_1, Q5_1, k-quants) go in directly, signed ones (Q8_0, Q4_0, Q5_0) as
//! `|q|` against `a·sign(q)`. Activation quants are in −127..=127, so no i16
//! sum saturates (at most 2·128·127).
//!
//! No closures: per-type code is in trait implementations so that everything
//! inlines into the `#[target_feature]` entry point (see `kernels.rs`).

use std::arch::x86_64::*;

use super::GgmlType;
use super::avx2::{hsum, nibbles, q5_high_signed, q5_high_unsigned};
use super::blocks::{
    Block, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, QK,
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
            T::Q4_0 => dot_legacy::<BlockQ4_0>(isa, src, a),
            T::Q4_1 => dot_legacy::<BlockQ4_1>(isa, src, a),
            T::Q5_0 => dot_legacy::<BlockQ5_0>(isa, src, a),
            T::Q5_1 => dot_legacy::<BlockQ5_1>(isa, src, a),
            T::Q8_0 => dot_legacy::<BlockQ8_0>(isa, src, a),
            T::Q4_K => dot_k4::<BlockQ4K>(isa, src, a),
            T::Q5_K => dot_k4::<BlockQ5K>(isa, src, a),
            T::Q6_K => dot_q6_k(isa, src, a),
            T::F32 | T::F16 | T::BF16 => unreachable!("float rows use the f32 kernels"),
        }
    }
}

#[inline(always)]
unsafe fn load(p: &[i8; QK]) -> __m256i {
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

#[inline(always)]
unsafe fn load_u8(p: &[u8]) -> __m256i {
    assert!(p.len() >= 32);
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
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

/// A legacy block against its activation block (quants `y`, scale `da`, `s = da·Σy`).
trait Legacy: Block {
    /// The 8 lanes of `Σ q·y` (as f32), their factor `dw·da`, and the offset
    /// term `m·s` (0 for the symmetric types).
    unsafe fn part(&self, isa: Avx2, y: __m256i, da: f32, s: f32) -> (__m256, f32, f32);
}

impl Legacy for BlockQ8_0 {
    #[inline(always)]
    unsafe fn part(&self, isa: Avx2, y: __m256i, da: f32, _: f32) -> (__m256, f32, f32) {
        unsafe {
            let q = _mm256_loadu_si256(self.qs.as_ptr().cast());
            (dot_i8_i8(q, y), isa.f16(self.d) * da, 0.0)
        }
    }
}

impl Legacy for BlockQ4_0 {
    #[inline(always)]
    unsafe fn part(&self, isa: Avx2, y: __m256i, da: f32, _: f32) -> (__m256, f32, f32) {
        unsafe {
            let q = _mm256_sub_epi8(nibbles(&self.qs), _mm256_set1_epi8(8));
            (dot_i8_i8(q, y), isa.f16(self.d) * da, 0.0)
        }
    }
}

impl Legacy for BlockQ5_0 {
    #[inline(always)]
    unsafe fn part(&self, isa: Avx2, y: __m256i, da: f32, _: f32) -> (__m256, f32, f32) {
        unsafe {
            let q = _mm256_or_si256(nibbles(&self.qs), q5_high_signed(self.qh));
            (dot_i8_i8(q, y), isa.f16(self.d) * da, 0.0)
        }
    }
}

impl Legacy for BlockQ4_1 {
    #[inline(always)]
    unsafe fn part(&self, isa: Avx2, y: __m256i, da: f32, s: f32) -> (__m256, f32, f32) {
        unsafe {
            let p = _mm256_cvtepi32_ps(dot_u8_i8(nibbles(&self.qs), y));
            (p, isa.f16(self.d) * da, isa.f16(self.m) * s)
        }
    }
}

impl Legacy for BlockQ5_1 {
    #[inline(always)]
    unsafe fn part(&self, isa: Avx2, y: __m256i, da: f32, s: f32) -> (__m256, f32, f32) {
        unsafe {
            let q = _mm256_or_si256(nibbles(&self.qs), q5_high_unsigned(self.qh));
            let p = _mm256_cvtepi32_ps(dot_u8_i8(q, y));
            (p, isa.f16(self.d) * da, isa.f16(self.m) * s)
        }
    }
}

/// A row of legacy blocks, two blocks per step into two accumulators.
#[inline(always)]
unsafe fn dot_legacy<B: Legacy>(isa: Avx2, src: &[u8], a: &QuantizedActivation) -> f32 {
    let blocks = as_blocks::<B>(src);
    let n = blocks.len();
    let (qs, d, s) = (&a.qs[..n], &a.d[..n], &a.s[..n]);
    unsafe {
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let (mut off0, mut off1) = (0f32, 0f32);
        let mut i = 0;
        while i + 2 <= n {
            let (p0, f0, o0) = blocks[i].part(isa, load(&qs[i]), d[i], s[i]);
            let (p1, f1, o1) = blocks[i + 1].part(isa, load(&qs[i + 1]), d[i + 1], s[i + 1]);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f0), p0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(f1), p1, acc1);
            off0 += o0;
            off1 += o1;
            i += 2;
        }
        if i < n {
            let (p0, f0, o0) = blocks[i].part(isa, load(&qs[i]), d[i], s[i]);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f0), p0, acc0);
            off0 += o0;
        }
        hsum(_mm256_add_ps(acc0, acc1)) + (off0 + off1)
    }
}

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

/// A Q4_K-shaped super-block: 8 sub-blocks of 32 with 6-bit scales and mins.
trait K4: Block {
    /// `(d, dmin, scales)`.
    fn header(&self) -> ([u8; 2], [u8; 2], [u8; 12]);
    /// Unsigned quants of sub-blocks `2p` and `2p+1`; `state` carries data
    /// between the calls for `p = 0, 1, 2, 3` (in that order).
    unsafe fn quants(&self, p: usize, state: &mut __m256i) -> (__m256i, __m256i);
}

impl K4 for BlockQ4K {
    #[inline(always)]
    fn header(&self) -> ([u8; 2], [u8; 2], [u8; 12]) {
        (self.d, self.dmin, self.scales)
    }
    #[inline(always)]
    unsafe fn quants(&self, p: usize, _: &mut __m256i) -> (__m256i, __m256i) {
        unsafe {
            let v = load_u8(&self.qs[32 * p..]);
            let m4 = _mm256_set1_epi8(0x0F);
            (
                _mm256_and_si256(v, m4),
                _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
            )
        }
    }
}

impl K4 for BlockQ5K {
    #[inline(always)]
    fn header(&self) -> ([u8; 2], [u8; 2], [u8; 12]) {
        (self.d, self.dmin, self.scales)
    }
    #[inline(always)]
    unsafe fn quants(&self, p: usize, hv: &mut __m256i) -> (__m256i, __m256i) {
        unsafe {
            // `hv` is qh shifted right by 2p: bits 0 and 1 of each byte are the
            // fifth bits of sub-blocks 2p and 2p+1.
            *hv = if p == 0 {
                load_u8(&self.qh)
            } else {
                _mm256_srli_epi16(*hv, 2)
            };
            let v = load_u8(&self.qs[32 * p..]);
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
        }
    }
}

/// Q4_K and Q5_K.
#[inline(always)]
unsafe fn dot_k4<B: K4>(isa: Avx2, src: &[u8], a: &QuantizedActivation) -> f32 {
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let mut accm = _mm256_setzero_ps();
        for (i, b) in as_blocks::<B>(src).iter().enumerate() {
            let (d, dmin, scales) = b.header();
            let (d, dmin) = (isa.f16(d), isa.f16(dmin));
            let (sc, m) = scales_mins_k4(&scales);
            let da = _mm256_loadu_ps(a.d[8 * i..8 * i + 8].as_ptr());
            let sa = _mm256_loadu_ps(a.s[8 * i..8 * i + 8].as_ptr());
            // Per sub-block j: d·sc[j]·da[j]; and the offsets dmin·Σ m[j]·s[j].
            let f = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(d), u8x8_ps(sc)), da);
            accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_mul_ps(u8x8_ps(m), sa), accm);
            let ys = &a.qs[8 * i..8 * i + 8];
            let mut state = _mm256_setzero_si256();
            for p in 0..4 {
                let (lo, hi) = b.quants(p, &mut state);
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
unsafe fn dot_q6_k(isa: Avx2, src: &[u8], a: &QuantizedActivation) -> f32 {
    unsafe {
        // Byte shuffles putting i16 scale 2g in the low 128-bit lane and 2g+1
        // in the high one: bytes (4g, 4g+1) and (4g+2, 4g+3) repeated.
        let mut pick = [_mm256_setzero_si256(); 4];
        for (g, pk) in pick.iter_mut().enumerate() {
            let lo = 4 * g as i16;
            let lo = _mm_set1_epi16(lo | ((lo + 1) << 8));
            let hi = _mm_set1_epi16((4 * g as i16 + 2) | ((4 * g as i16 + 3) << 8));
            *pk = _mm256_set_m128i(hi, lo);
        }
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
                // The four 32-weight groups of this half (see `BlockQ6K`).
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
