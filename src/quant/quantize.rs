//! Round-to-nearest reference quantizers (lengths checked by the caller).
//!
//! The float and legacy types reproduce ggml's `quantize_row_*_ref` byte for
//! byte. The k-quants pick each sub-block's scale (and min) from its range,
//! quantize those to 6 (Q4_K/Q5_K) or 8 (Q6_K) bits against one f16 super-scale,
//! then round every weight with the scale it will be decoded with; ggml instead
//! searches for error-minimizing scales, so its bytes may differ.

use super::GgmlType;
use super::blocks::{
    BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, QK, QK_K,
    as_blocks_mut, pack_scales_mins_k4,
};

/// Encodes `src` into `dst` (`dst.len() == ty.row_bytes(src.len())`).
pub(crate) fn quantize(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    use GgmlType as T;
    match ty {
        T::F32 => {
            for (c, v) in dst.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        T::F16 => {
            for (c, v) in dst.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        T::BF16 => {
            for (c, v) in dst.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&f32_to_bf16(*v).to_le_bytes());
            }
        }
        T::Q4_0 => each(src, dst, q4_0),
        T::Q4_1 => each(src, dst, q4_1),
        T::Q5_0 => each(src, dst, q5_0),
        T::Q5_1 => each(src, dst, q5_1),
        T::Q8_0 => each(src, dst, q8_0),
        T::Q4_K => each(src, dst, q4_k),
        T::Q5_K => each(src, dst, q5_k),
        T::Q6_K => each(src, dst, q6_k),
    }
}

fn each<B: super::blocks::Block, const N: usize>(
    src: &[f32],
    dst: &mut [u8],
    f: impl Fn(&[f32; N], &mut B),
) {
    for (x, b) in src.chunks_exact(N).zip(as_blocks_mut::<B>(dst)) {
        f(x.try_into().expect("chunk of N"), b);
    }
}

/// ggml's `GGML_FP32_TO_BF16`: round to nearest even; NaN stays a (quiet) NaN.
fn f32_to_bf16(v: f32) -> u16 {
    let u = v.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u as u64 + 0x7fff + ((u >> 16) & 1) as u64) >> 16) as u16
}

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

fn f16_value(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// The value of largest magnitude (the first one on ties), with its sign.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter().fold((f32::MAX, -f32::MAX), |(lo, hi), &v| {
        (if v < lo { v } else { lo }, if v > hi { v } else { hi })
    })
}

fn inverse(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

/// Packs 32 values < 16 as the legacy blocks order nibbles.
fn pack_nibbles(q: &[u8; QK]) -> [u8; QK / 2] {
    std::array::from_fn(|j| q[j] | (q[j + QK / 2] << 4))
}

/// Fifth bits of 32 values < 32 as a little-endian u32.
fn pack_fifth_bits(q: &[u8; QK]) -> [u8; 4] {
    let bits = (0..QK).fold(0u32, |h, j| h | (((q[j] >> 4) as u32 & 1) << j));
    bits.to_le_bytes()
}

fn q4_0(x: &[f32; QK], b: &mut BlockQ4_0) {
    let d = signed_absmax(x) / -8.0;
    let id = inverse(d);
    b.d = f16_bytes(d);
    // `as i8` truncates toward zero like C's `(int8_t)` cast (and saturates).
    let q = x.map(|v| ((v * id + 8.5) as i8).clamp(0, 15) as u8);
    b.qs = pack_nibbles(&q);
}

fn q4_1(x: &[f32; QK], b: &mut BlockQ4_1) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    b.d = f16_bytes(d);
    b.m = f16_bytes(min);
    let q = x.map(|v| (((v - min) * id + 0.5) as i8).clamp(0, 15) as u8);
    b.qs = pack_nibbles(&q);
}

fn q5_0(x: &[f32; QK], b: &mut BlockQ5_0) {
    let d = signed_absmax(x) / -16.0;
    let id = inverse(d);
    b.d = f16_bytes(d);
    let q = x.map(|v| ((v * id + 16.5) as i8).clamp(0, 31) as u8);
    b.qh = pack_fifth_bits(&q);
    b.qs = pack_nibbles(&q.map(|v| v & 0xF));
}

fn q5_1(x: &[f32; QK], b: &mut BlockQ5_1) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    b.d = f16_bytes(d);
    b.m = f16_bytes(min);
    let q = x.map(|v| (((v - min) * id + 0.5) as u8).min(31));
    b.qh = pack_fifth_bits(&q);
    b.qs = pack_nibbles(&q.map(|v| v & 0xF));
}

fn q8_0(x: &[f32; QK], b: &mut BlockQ8_0) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    b.d = f16_bytes(d);
    // `round` is C's `roundf` (halves away from zero).
    b.qs = x.map(|v| (v * id).round() as i8);
}

/// Nearest integer (ties to even) of `v` clamped to `lo..=hi`; NaN gives 0.
fn nearest(v: f32, lo: i32, hi: i32) -> i32 {
    v.clamp(lo as f32, hi as f32).round_ties_even() as i32
}

/// Q4_K/Q5_K: 6-bit sub-block scales and mins and the unsigned `nmax`-level
/// quants, plus the f16 super-scales `(d, dmin)`.
fn k_scales_quants(x: &[f32; QK_K], nmax: i32) -> ([u8; 2], [u8; 2], [u8; 12], [u8; QK_K]) {
    let mut scale = [0f32; 8];
    let mut min = [0f32; 8];
    for j in 0..8 {
        let (lo, hi) = min_max(&x[32 * j..32 * j + 32]);
        let lo = lo.min(0.0);
        scale[j] = (hi - lo) / nmax as f32;
        min[j] = -lo;
    }
    let max_scale = scale.iter().fold(0f32, |m, &v| m.max(v));
    let max_min = min.iter().fold(0f32, |m, &v| m.max(v));
    let (is, im) = (inverse(max_scale) * 63.0, inverse(max_min) * 63.0);
    let ls = scale.map(|s| nearest(s * is, 0, 63) as u8);
    let lm = min.map(|m| nearest(m * im, 0, 63) as u8);
    let (d, dmin) = (max_scale / 63.0, max_min / 63.0);
    let (dv, dminv) = (f16_value(d), f16_value(dmin));
    let mut q = [0u8; QK_K];
    for j in 0..8 {
        let dl = dv * ls[j] as f32;
        let ml = dminv * lm[j] as f32;
        let idl = inverse(dl);
        for l in 32 * j..32 * j + 32 {
            q[l] = nearest((x[l] + ml) * idl, 0, nmax) as u8;
        }
    }
    (
        f16_bytes(d),
        f16_bytes(dmin),
        pack_scales_mins_k4(&ls, &lm),
        q,
    )
}

/// Packs Q4_K/Q5_K low nibbles: sub-blocks 2p and 2p+1 share `qs[32p..32p+32]`.
fn pack_k_nibbles(q: &[u8; QK_K]) -> [u8; QK_K / 2] {
    std::array::from_fn(|i| {
        let (p, l) = (i / 32, i % 32);
        (q[64 * p + l] & 0xF) | ((q[64 * p + 32 + l] & 0xF) << 4)
    })
}

fn q4_k(x: &[f32; QK_K], b: &mut BlockQ4K) {
    let (d, dmin, scales, q) = k_scales_quants(x, 15);
    (b.d, b.dmin, b.scales) = (d, dmin, scales);
    b.qs = pack_k_nibbles(&q);
}

fn q5_k(x: &[f32; QK_K], b: &mut BlockQ5K) {
    let (d, dmin, scales, q) = k_scales_quants(x, 31);
    (b.d, b.dmin, b.scales) = (d, dmin, scales);
    b.qs = pack_k_nibbles(&q);
    b.qh = std::array::from_fn(|l| (0..8).fold(0u8, |h, j| h | (((q[32 * j + l] >> 4) & 1) << j)));
}

fn q6_k(x: &[f32; QK_K], b: &mut BlockQ6K) {
    // Sub-block scale: the signed extreme maps to −32.
    let scale: [f32; 16] = std::array::from_fn(|j| signed_absmax(&x[16 * j..16 * j + 16]) / -32.0);
    let max_scale = signed_absmax(&scale);
    let iscale = inverse(max_scale) * -128.0;
    let d = inverse(iscale);
    let sc = scale.map(|s| nearest(s * iscale, -128, 127) as i8);
    let dv = f16_value(d);
    let mut q = [0u8; QK_K];
    for ((qc, xc), &s) in q.chunks_exact_mut(16).zip(x.chunks_exact(16)).zip(&sc) {
        let idl = inverse(dv * s as f32);
        for (q, &x) in qc.iter_mut().zip(xc) {
            *q = (nearest(x * idl, -32, 31) + 32) as u8;
        }
    }
    b.d = f16_bytes(d);
    b.scales = sc;
    for h in 0..2 {
        let q = &q[128 * h..128 * h + 128];
        for l in 0..32 {
            let (q1, q2, q3, q4) = (q[l], q[l + 32], q[l + 64], q[l + 96]);
            b.ql[64 * h + l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            b.ql[64 * h + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            b.qh[32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}
