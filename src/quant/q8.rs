//! The integer matrix-vector path: an activation quantized to 8 bits in blocks
//! of 32, and dot products of quantized rows with it in integer arithmetic.
//!
//! Per 32-value activation block `b` (scale `da`, quants `a`, `s = da·Σa`) and
//! the row's matching weights:
//! - Q8_0/Q4_0/Q5_0 (`w = dw·q`): `dw·da·Σ q·a`;
//! - Q4_1/Q5_1 (`w = dw·q + m`): `dw·da·Σ q·a + m·s`;
//! - Q4_K/Q5_K sub-block `j` (`w = d·sc·q − dmin·m`): `d·sc·da·Σ q·a − dmin·m·s`;
//! - Q6_K, two 16-value halves with scales `sc0, sc1`: `d·da·(sc0·Σ₀ + sc1·Σ₁)`.
//!
//! Every `Σ` is exact in i32; the portable kernels here are the reference for the
//! AVX2 ones in `q8_avx2.rs`.

use super::GgmlType;
use super::blocks::{
    BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, QK,
    as_blocks, scales_mins_k4,
};
use super::kernels;
#[cfg(target_arch = "x86_64")]
use super::simd::Avx2;
use super::simd::{Isa, Level, Portable};

/// An activation vector quantized for [`dot_row_q8`](super::dot_row_q8): blocks of
/// 32 signed 8-bit quants with an f32 scale, plus the original f32 values (for
/// float rows).
#[derive(Debug, Clone, Default)]
pub struct QuantizedActivation {
    pub(crate) len: usize,
    /// Quants, zero-padded to whole blocks.
    pub(crate) qs: Vec<[i8; QK]>,
    /// Per-block scale `max|x|/127`.
    pub(crate) d: Vec<f32>,
    /// Per-block `d·Σqs`, for the offset term of Q4_1/Q5_1/Q4_K/Q5_K.
    pub(crate) s: Vec<f32>,
    /// The unquantized values.
    pub(crate) x: Vec<f32>,
}

impl QuantizedActivation {
    /// An empty activation (length 0); fill it with [`quantize`](Self::quantize).
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of values (before padding).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The unquantized values this was made from.
    pub fn values(&self) -> &[f32] {
        &self.x
    }

    /// Re-quantize from `x`, reusing the buffers.
    pub fn quantize(&mut self, x: &[f32]) {
        let nb = x.len().div_ceil(QK);
        self.len = x.len();
        self.qs.resize(nb, [0; QK]);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        self.x.clear();
        self.x.extend_from_slice(x);
        match super::simd::level() {
            Level::Portable => quantize_generic(Portable, self),
            // SAFETY: the token proves the CPU has the enabled features.
            #[cfg(target_arch = "x86_64")]
            Level::Avx2(t) => unsafe { quantize_avx2(t, self) },
        }
    }

    /// The dequantized activation `d·q` (tests measure the rounding with it).
    #[cfg(test)]
    pub(crate) fn dequantized(&self) -> Vec<f32> {
        let mut v: Vec<f32> = (self.qs.iter().zip(&self.d))
            .flat_map(|(q, d)| q.iter().map(move |&q| q as f32 * d))
            .collect();
        v.truncate(self.len);
        v
    }
}

/// Round to the nearest integer (ties to even) for |v| < 2²²: adding 1.5·2²³
/// leaves the rounded value in the low mantissa bits. Branch-free, so it
/// vectorizes on every instruction set.
#[inline(always)]
fn nearest_i8(v: f32) -> i8 {
    let t = v + 12_582_912.0;
    ((t.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000).clamp(-127, 127) as i8
}

#[inline(always)]
fn quantize_block(x: &[f32; QK], q: &mut [i8; QK]) -> (f32, f32) {
    let mut amax = [0f32; 8];
    // 0·x is NaN for a NaN or infinite x: it poisons the scale, so NaN reaches
    // the dot products as it would in f32 instead of quantizing to 0.
    let mut poison = [0f32; 8];
    for c in x.chunks_exact(8) {
        for l in 0..8 {
            amax[l] = amax[l].max(c[l].abs());
            poison[l] += c[l] * 0.0;
        }
    }
    let amax = amax.iter().fold(0f32, |m, &v| m.max(v));
    let d = amax / 127.0 + poison.iter().sum::<f32>();
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for l in 0..QK {
        q[l] = nearest_i8(x[l] * id);
        sum += q[l] as i32;
    }
    (d, d * sum as f32)
}

#[inline(always)]
fn quantize_generic<I: Isa>(isa: I, a: &mut QuantizedActivation) {
    quantize_with(a, |x, q, d, s| blocks_generic(isa, x, q, d, s))
}

/// Quantize `a`'s whole blocks with `blocks`, then its partial last one.
#[inline(always)]
fn quantize_with(
    a: &mut QuantizedActivation,
    blocks: impl FnOnce(&[f32], &mut [i8], &mut [f32], &mut [f32]),
) {
    let full = a.len / QK;
    blocks(
        &a.x[..QK * full],
        a.qs[..full].as_flattened_mut(),
        &mut a.d[..full],
        &mut a.s[..full],
    );
    if full < a.qs.len() {
        let mut x = [0f32; QK];
        x[..a.len - QK * full].copy_from_slice(&a.x[QK * full..]);
        (a.d[full], a.s[full]) = quantize_block(&x, &mut a.qs[full]);
    }
}

/// Quantize whole 32-value blocks of `x` (its length a multiple of 32) into
/// `qs`, with each block's scale in `d` and `d·Σq` in `s`: the activation
/// form of [`QuantizedActivation`] for many rows at once.
pub(crate) fn quantize_blocks(
    level: Level,
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
) {
    assert!(
        x.len().is_multiple_of(QK) && qs.len() == x.len(),
        "quantize_blocks: lengths"
    );
    assert!(
        d.len() == x.len() / QK && s.len() == d.len(),
        "quantize_blocks: scales"
    );
    match level {
        Level::Portable => blocks_generic(Portable, x, qs, d, s),
        // SAFETY: the token proves the CPU has the enabled features.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2(t) => unsafe { blocks_avx2(t, x, qs, d, s) },
    }
}

#[inline(always)]
fn blocks_generic<I: Isa>(_isa: I, x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for (((xb, qb), d), s) in x
        .chunks_exact(QK)
        .zip(qs.chunks_exact_mut(QK))
        .zip(d.iter_mut())
        .zip(s.iter_mut())
    {
        let xb: &[f32; QK] = xb.try_into().expect("32 values");
        let qb: &mut [i8; QK] = qb.try_into().expect("32 quants");
        (*d, *s) = quantize_block(xb, qb);
    }
}

/// [`quantize_block`] over whole blocks, by hand in AVX2 (the compiler's
/// vectorization of it runs at about 1 ns per value): the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn blocks_avx2(_: Avx2, x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = d.len();
    assert!(x.len() == nb * QK && qs.len() == nb * QK && s.len() == nb);
    // SAFETY: AVX2 is enabled on this function; every load and store is
    // within the slices checked above.
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        let zero = _mm256_setzero_ps();
        let magic = _mm256_set1_ps(12_582_912.0);
        let mant = _mm256_set1_epi32(0x007f_ffff);
        let (half, lo, hi) = (
            _mm256_set1_epi32(0x0040_0000),
            _mm256_set1_epi32(-127),
            _mm256_set1_epi32(127),
        );
        // packs interleave the 128-bit halves: this puts the bytes back.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for b in 0..nb {
            let p = x.as_ptr().add(b * QK);
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
            // max(|v|, amax) keeps amax where v is NaN, as f32::max does.
            let mut amax = zero;
            let mut poison = zero;
            for v in v {
                amax = _mm256_max_ps(_mm256_andnot_ps(sign, v), amax);
                poison = _mm256_add_ps(poison, _mm256_mul_ps(v, zero));
            }
            // Across lanes: the max of non-NaN values and a sum of zeros and
            // NaNs are the same in any order.
            let amax = _mm256_max_ps(amax, _mm256_permute2f128_ps(amax, amax, 1));
            let amax = _mm256_max_ps(amax, _mm256_shuffle_ps(amax, amax, 0b0100_1110));
            let amax = _mm256_max_ps(amax, _mm256_shuffle_ps(amax, amax, 0b1011_0001));
            let poison = _mm256_add_ps(poison, _mm256_permute2f128_ps(poison, poison, 1));
            let poison = _mm256_add_ps(poison, _mm256_shuffle_ps(poison, poison, 0b0100_1110));
            let poison = _mm256_add_ps(poison, _mm256_shuffle_ps(poison, poison, 0b1011_0001));
            let db = _mm256_cvtss_f32(amax) / 127.0 + _mm256_cvtss_f32(poison);
            let id = _mm256_set1_ps(if db != 0.0 { 1.0 / db } else { 0.0 });
            let q: [__m256i; 4] = std::array::from_fn(|i| {
                let t = _mm256_add_ps(_mm256_mul_ps(v[i], id), magic);
                let r = _mm256_sub_epi32(_mm256_and_si256(_mm256_castps_si256(t), mant), half);
                _mm256_max_epi32(_mm256_min_epi32(r, hi), lo)
            });
            let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let s128 = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256(sum, 1),
            );
            let s64 = _mm_add_epi32(s128, _mm_unpackhi_epi64(s128, s128));
            let total = _mm_cvtsi128_si32(_mm_add_epi32(s64, _mm_shuffle_epi32(s64, 1)));
            let words = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let bytes = _mm256_permutevar8x32_epi32(words, order);
            _mm256_storeu_si256(qs.as_mut_ptr().add(b * QK).cast(), bytes);
            d[b] = db;
            s[b] = db * total as f32;
        }
    }
}

/// The portable quantizer, whatever the CPU (tests compare the levels).
#[cfg(test)]
pub(crate) fn quantize_portable(a: &mut QuantizedActivation) {
    quantize_generic(Portable, a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_avx2(isa: Avx2, a: &mut QuantizedActivation) {
    quantize_with(a, |x, q, d, s| blocks_avx2(isa, x, q, d, s))
}

/// `Σ q[i]·a[i]` over one 32-value block.
#[inline(always)]
fn idot32(q: &[i8; QK], a: &[i8; QK]) -> i32 {
    let mut s = 0i32;
    for l in 0..QK {
        s += q[l] as i32 * a[l] as i32;
    }
    s
}

/// `Σ (q[i] − o)·a[i]` for unsigned quants `q` (less than 128).
#[inline(always)]
fn idot32_u8(q: &[u8; QK], o: i32, a: &[i8; QK]) -> i32 {
    let mut s = 0i32;
    for l in 0..QK {
        s += (q[l] as i32 - o) * a[l] as i32;
    }
    s
}

/// Low nibbles then high nibbles, as the legacy 4-bit blocks order them.
#[inline(always)]
fn unpack_nibbles(qs: &[u8; QK / 2]) -> [u8; QK] {
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        q[j] = qs[j] & 0xF;
        q[j + QK / 2] = qs[j] >> 4;
    }
    q
}

/// `1 << (j % 8)` for byte lane `j`.
const LANE_BIT: [u8; QK] = {
    let mut b = [0u8; QK];
    let mut j = 0;
    while j < QK {
        b[j] = 1 << (j % 8);
        j += 1;
    }
    b
};

/// 5-bit quants of Q5_0/Q5_1 (0..32): bit `j` of the u32 `qh` is bit 4 of `q[j]`.
#[inline(always)]
fn unpack_q5(qh: [u8; 4], qs: &[u8; QK / 2]) -> [u8; QK] {
    let mut q = unpack_nibbles(qs);
    for j in 0..QK {
        q[j] |= if qh[j / 8] & LANE_BIT[j] != 0 {
            0x10
        } else {
            0
        };
    }
    q
}

#[inline(always)]
fn dot_legacy<I: Isa, B: super::blocks::Block>(
    isa: I,
    src: &[u8],
    a: &QuantizedActivation,
    block: impl Fn(&B, &[i8; QK], f32, f32) -> f32,
) -> f32 {
    let _ = isa;
    let mut sum = 0f32;
    for (i, b) in as_blocks::<B>(src).iter().enumerate() {
        sum += block(b, &a.qs[i], a.d[i], a.s[i]);
    }
    sum
}

#[inline(always)]
fn dot_q4k_like<I: Isa, B: super::blocks::Block>(
    isa: I,
    src: &[u8],
    a: &QuantizedActivation,
    parts: impl Fn(&B) -> ([u8; 2], [u8; 2], [u8; 12], [[u8; QK]; 8]),
) -> f32 {
    let mut sum = 0f32;
    for (i, b) in as_blocks::<B>(src).iter().enumerate() {
        let (d, dmin, scales, q) = parts(b);
        let (d, dmin) = (isa.f16(d), isa.f16(dmin));
        let (sc, m) = scales_mins_k4(&scales);
        let mut acc = 0f32;
        let mut mins = 0f32;
        for j in 0..8 {
            let k = 8 * i + j;
            acc += (sc[j] as f32 * a.d[k]) * idot32_u8(&q[j], 0, &a.qs[k]) as f32;
            mins += m[j] as f32 * a.s[k];
        }
        sum += d * acc - dmin * mins;
    }
    sum
}

/// The eight 32-value sub-blocks of Q4_K quants.
#[inline(always)]
fn q4k_quants(qs: &[u8; 128]) -> [[u8; QK]; 8] {
    let mut q = [[0u8; QK]; 8];
    for p in 0..4 {
        for l in 0..QK {
            q[2 * p][l] = qs[32 * p + l] & 0xF;
            q[2 * p + 1][l] = qs[32 * p + l] >> 4;
        }
    }
    q
}

#[inline(always)]
fn dot_q6k<I: Isa>(isa: I, src: &[u8], a: &QuantizedActivation) -> f32 {
    let mut sum = 0f32;
    for (i, b) in as_blocks::<BlockQ6K>(src).iter().enumerate() {
        let mut acc = 0f32;
        for h in 0..2 {
            let ql = &b.ql[64 * h..64 * h + 64];
            let qh = &b.qh[32 * h..32 * h + 32];
            for g in 0..4 {
                // Group g: weights 128h + 32g + l, from ql[32·(g%2)+l] nibble g/2
                // and qh[l] bits 2g..2g+2.
                let (lo_shift, hi_shift) = (4 * (g / 2), 2 * g);
                let mut q = [0i8; QK];
                for l in 0..QK {
                    let lo = (ql[32 * (g % 2) + l] >> lo_shift) & 0xF;
                    let hi = (qh[l] >> hi_shift) & 3;
                    q[l] = (lo | (hi << 4)) as i8 - 32;
                }
                let k = 8 * i + 4 * h + g;
                let aq = &a.qs[k];
                let s0: i32 = (0..16).map(|l| q[l] as i32 * aq[l] as i32).sum();
                let s1: i32 = (16..32).map(|l| q[l] as i32 * aq[l] as i32).sum();
                let sc = &b.scales[8 * h + 2 * g..];
                acc += a.d[k] * (sc[0] as i32 * s0 + sc[1] as i32 * s1) as f32;
            }
        }
        sum += isa.f16(b.d) * acc;
    }
    sum
}

#[inline(always)]
fn dot_generic<I: Isa>(isa: I, ty: GgmlType, src: &[u8], a: &QuantizedActivation) -> f32 {
    use GgmlType as T;
    match ty {
        T::F32 | T::F16 | T::BF16 => unreachable!("float rows are dispatched to the f32 kernels"),
        T::Q4_0 => dot_legacy(isa, src, a, |b: &BlockQ4_0, aq, da, _| {
            isa.f16(b.d) * da * idot32_u8(&unpack_nibbles(&b.qs), 8, aq) as f32
        }),
        T::Q4_1 => dot_legacy(isa, src, a, |b: &BlockQ4_1, aq, da, s| {
            let q = unpack_nibbles(&b.qs);
            isa.f16(b.d) * da * idot32_u8(&q, 0, aq) as f32 + isa.f16(b.m) * s
        }),
        T::Q5_0 => dot_legacy(isa, src, a, |b: &BlockQ5_0, aq, da, _| {
            isa.f16(b.d) * da * idot32_u8(&unpack_q5(b.qh, &b.qs), 16, aq) as f32
        }),
        T::Q5_1 => dot_legacy(isa, src, a, |b: &BlockQ5_1, aq, da, s| {
            let q = unpack_q5(b.qh, &b.qs);
            isa.f16(b.d) * da * idot32_u8(&q, 0, aq) as f32 + isa.f16(b.m) * s
        }),
        T::Q8_0 => dot_legacy(isa, src, a, |b: &BlockQ8_0, aq, da, _| {
            isa.f16(b.d) * da * idot32(&b.qs, aq) as f32
        }),
        T::Q4_K => dot_q4k_like(isa, src, a, |b: &BlockQ4K| {
            (b.d, b.dmin, b.scales, q4k_quants(&b.qs))
        }),
        T::Q5_K => dot_q4k_like(isa, src, a, |b: &BlockQ5K| {
            let mut q = q4k_quants(&b.qs);
            for (j, qj) in q.iter_mut().enumerate() {
                for (l, v) in qj.iter_mut().enumerate() {
                    *v |= ((b.qh[l] >> j) & 1) << 4;
                }
            }
            (b.d, b.dmin, b.scales, q)
        }),
        T::Q6_K => dot_q6k(isa, src, a),
    }
}

/// `Σ row·x` through the quantized activation with `level`'s kernels (lengths
/// already checked).
pub(crate) fn dot(level: Level, ty: GgmlType, src: &[u8], a: &QuantizedActivation) -> f32 {
    if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        return kernels::dot(level, ty, src, &a.x);
    }
    match level {
        Level::Portable => dot_generic(Portable, ty, src, a),
        // SAFETY: the token proves the CPU has the enabled features.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2(t) => unsafe { super::q8_avx2::dot(t, ty, src, a) },
    }
}
