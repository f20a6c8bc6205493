//! Row drivers for exact dequantization and f32 dot products, instantiated per
//! [`Level`]. Lengths are validated by the caller (`mod.rs`).
//!
//! Dot products decode one block into a stack array and fold it into 16
//! accumulator lanes ([`fma_block`]); the row is never materialized.

use super::GgmlType;
use super::blocks::{Block, QK, QK_K, as_blocks};
use super::kquants::{decode_q4_k, decode_q5_k, decode_q6_k};
use super::legacy::{
    decode_bf16, decode_bf16x32, decode_f16x32, decode_f32, decode_f32x32, decode_q4_0,
    decode_q4_1, decode_q5_0, decode_q5_1, decode_q8_0,
};
#[cfg(target_arch = "x86_64")]
use super::simd::Avx2;
use super::simd::{Isa, Level, Portable, fma_block, reduce};

#[inline(always)]
fn dequant_blocks<B: Block, const N: usize>(
    src: &[u8],
    dst: &mut [f32],
    decode: impl Fn(&B, &mut [f32; N]),
) {
    for (b, y) in as_blocks::<B>(src).iter().zip(dst.chunks_exact_mut(N)) {
        decode(b, y.try_into().expect("chunk of N"));
    }
}

#[inline(always)]
fn dot_blocks<I: Isa, B: Block, const N: usize>(
    isa: I,
    src: &[u8],
    x: &[f32],
    decode: impl Fn(&B, &mut [f32; N]),
) -> f32 {
    let mut acc = [0f32; 16];
    for (b, xc) in as_blocks::<B>(src).iter().zip(x.chunks_exact(N)) {
        let mut w = [0f32; N];
        decode(b, &mut w);
        fma_block(isa, &mut acc, &w, xc);
    }
    reduce(&acc)
}

/// A float row (element size `S` bytes): runs of 32 through `decode32`, the tail
/// value by value.
#[inline(always)]
fn dequant_float<const S: usize>(
    src: &[u8],
    dst: &mut [f32],
    decode32: impl Fn(&[u8], &mut [f32; QK]),
    decode1: impl Fn(&[u8]) -> f32,
) {
    let mut ys = dst.chunks_exact_mut(QK);
    let mut bs = src.chunks_exact(QK * S);
    for (y, b) in (&mut ys).zip(&mut bs) {
        decode32(b, y.try_into().expect("chunk of 32"));
    }
    for (y, c) in ys.into_remainder().iter_mut().zip(bs.remainder().chunks_exact(S)) {
        *y = decode1(c);
    }
}

#[inline(always)]
fn dot_float<I: Isa, const S: usize>(
    isa: I,
    src: &[u8],
    x: &[f32],
    decode32: impl Fn(&[u8], &mut [f32; QK]),
    decode1: impl Fn(&[u8]) -> f32,
) -> f32 {
    let mut acc = [0f32; 16];
    let mut xs = x.chunks_exact(QK);
    let mut bs = src.chunks_exact(QK * S);
    for (xc, b) in (&mut xs).zip(&mut bs) {
        let mut w = [0f32; QK];
        decode32(b, &mut w);
        fma_block(isa, &mut acc, &w, xc);
    }
    let mut sum = reduce(&acc);
    for (xv, c) in xs.remainder().iter().zip(bs.remainder().chunks_exact(S)) {
        sum = isa.mul_add(decode1(c), *xv, sum);
    }
    sum
}

#[inline(always)]
fn dequantize_generic<I: Isa>(isa: I, ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    use GgmlType as T;
    match ty {
        T::F32 => dequant_float::<4>(src, dst, |b, y| decode_f32x32(arr(b), y), decode_f32),
        T::F16 => dequant_float::<2>(
            src,
            dst,
            |b, y| decode_f16x32(isa, arr(b), y),
            |c| isa.f16([c[0], c[1]]),
        ),
        T::BF16 => dequant_float::<2>(src, dst, |b, y| decode_bf16x32(arr(b), y), decode_bf16),
        T::Q4_0 => dequant_blocks(src, dst, |b, y| decode_q4_0(isa, b, y)),
        T::Q4_1 => dequant_blocks(src, dst, |b, y| decode_q4_1(isa, b, y)),
        T::Q5_0 => dequant_blocks(src, dst, |b, y| decode_q5_0(isa, b, y)),
        T::Q5_1 => dequant_blocks(src, dst, |b, y| decode_q5_1(isa, b, y)),
        T::Q8_0 => dequant_blocks(src, dst, |b, y| decode_q8_0(isa, b, y)),
        T::Q4_K => dequant_blocks(src, dst, |b, y| decode_q4_k(isa, b, y)),
        T::Q5_K => dequant_blocks(src, dst, |b, y| decode_q5_k(isa, b, y)),
        T::Q6_K => dequant_blocks(src, dst, |b, y| decode_q6_k(isa, b, y)),
    }
}

#[inline(always)]
fn dot_generic<I: Isa>(isa: I, ty: GgmlType, src: &[u8], x: &[f32]) -> f32 {
    use GgmlType as T;
    match ty {
        T::F32 => dot_float::<I, 4>(isa, src, x, |b, y| decode_f32x32(arr(b), y), decode_f32),
        T::F16 => dot_float::<I, 2>(
            isa,
            src,
            x,
            |b, y| decode_f16x32(isa, arr(b), y),
            |c| isa.f16([c[0], c[1]]),
        ),
        T::BF16 => dot_float::<I, 2>(isa, src, x, |b, y| decode_bf16x32(arr(b), y), decode_bf16),
        T::Q4_0 => dot_blocks::<I, _, QK>(isa, src, x, |b, y| decode_q4_0(isa, b, y)),
        T::Q4_1 => dot_blocks::<I, _, QK>(isa, src, x, |b, y| decode_q4_1(isa, b, y)),
        T::Q5_0 => dot_blocks::<I, _, QK>(isa, src, x, |b, y| decode_q5_0(isa, b, y)),
        T::Q5_1 => dot_blocks::<I, _, QK>(isa, src, x, |b, y| decode_q5_1(isa, b, y)),
        T::Q8_0 => dot_blocks::<I, _, QK>(isa, src, x, |b, y| decode_q8_0(isa, b, y)),
        T::Q4_K => dot_blocks::<I, _, QK_K>(isa, src, x, |b, y| decode_q4_k(isa, b, y)),
        T::Q5_K => dot_blocks::<I, _, QK_K>(isa, src, x, |b, y| decode_q5_k(isa, b, y)),
        T::Q6_K => dot_blocks::<I, _, QK_K>(isa, src, x, |b, y| decode_q6_k(isa, b, y)),
    }
}

/// A chunk known by construction to be `N` bytes long.
#[inline(always)]
fn arr<const N: usize>(b: &[u8]) -> &[u8; N] {
    b.try_into().expect("chunk length")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn dequantize_avx2(isa: Avx2, ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    dequantize_generic(isa, ty, src, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_avx2(isa: Avx2, ty: GgmlType, src: &[u8], x: &[f32]) -> f32 {
    dot_generic(isa, ty, src, x)
}

/// Decodes `src` into `dst` with `level`'s kernels (lengths already checked).
pub(crate) fn dequantize(level: Level, ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    match level {
        Level::Portable => dequantize_generic(Portable, ty, src, dst),
        // SAFETY: the token proves the CPU has the enabled features.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2(t) => unsafe { dequantize_avx2(t, ty, src, dst) },
    }
}

/// `Σ row·x` with `level`'s kernels (lengths already checked).
pub(crate) fn dot(level: Level, ty: GgmlType, src: &[u8], x: &[f32]) -> f32 {
    match level {
        Level::Portable => dot_generic(Portable, ty, src, x),
        // SAFETY: the token proves the CPU has the enabled features.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2(t) => unsafe { dot_avx2(t, ty, src, x) },
    }
}
