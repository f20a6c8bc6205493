//! Row drivers for exact dequantization and f32 dot products, instantiated per
//! [`Level`]. Lengths are validated by the caller (`mod.rs`).
//!
//! Dot products decode one block into a stack array and fold it, 32 values at
//! a time, into the level's partial sums ([`Isa::fma32`]); the row is never
//! materialized.
//!
//! The drivers take their decoders as trait implementations, not closures: a
//! closure is a function of its own without the wrapper's target features, so
//! the intrinsics inside it would not be inlined.

use super::GgmlType;
use super::blocks::{
    Block, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, QK,
    QK_K, as_blocks,
};
use super::kquants::{decode_q4_k, decode_q5_k, decode_q6_k};
use super::legacy::{decode_bf16, decode_bf16x32, decode_f16x32, decode_f32, decode_f32x32};
#[cfg(target_arch = "x86_64")]
use super::simd::Avx2;
use super::simd::{Isa, Level, Portable};

/// A block that decodes to `N` values.
trait Decode<const N: usize>: Block {
    /// The block's values.
    fn decode<I: Isa>(isa: I, b: &Self, y: &mut [f32; N]);
    /// Adds `Σ w·x` over the block's values `w` to `acc`.
    #[inline(always)]
    fn accumulate<I: Isa>(isa: I, acc: &mut I::Acc, b: &Self, x: &[f32]) {
        let mut w = [0f32; N];
        Self::decode(isa, b, &mut w);
        for (wc, xc) in w.chunks_exact(QK).zip(x.chunks_exact(QK)) {
            isa.fma32(acc, wc.try_into().expect("32"), xc.try_into().expect("32"));
        }
    }
}

macro_rules! decode_legacy {
    ($($b:ty, $decode:ident, $dot:ident;)*) => {$(
        impl Decode<QK> for $b {
            #[inline(always)]
            fn decode<I: Isa>(isa: I, b: &Self, y: &mut [f32; QK]) {
                isa.$decode(b, y)
            }
            #[inline(always)]
            fn accumulate<I: Isa>(isa: I, acc: &mut I::Acc, b: &Self, x: &[f32]) {
                isa.$dot(acc, b, x.try_into().expect("32"))
            }
        }
    )*};
}

decode_legacy! {
    BlockQ4_0, decode_q4_0, dot_q4_0;
    BlockQ4_1, decode_q4_1, dot_q4_1;
    BlockQ5_0, decode_q5_0, dot_q5_0;
    BlockQ5_1, decode_q5_1, dot_q5_1;
    BlockQ8_0, decode_q8_0, dot_q8_0;
}

macro_rules! decode_k {
    ($($b:ty, $decode:ident;)*) => {$(
        impl Decode<QK_K> for $b {
            #[inline(always)]
            fn decode<I: Isa>(isa: I, b: &Self, y: &mut [f32; QK_K]) {
                $decode(isa, b, y)
            }
        }
    )*};
}

decode_k! {
    BlockQ4K, decode_q4_k;
    BlockQ5K, decode_q5_k;
    BlockQ6K, decode_q6_k;
}

/// An element format of `SIZE` bytes per value.
trait Float {
    const SIZE: usize;
    /// 32 values from `32·SIZE` bytes.
    fn decode32<I: Isa>(isa: I, b: &[u8], y: &mut [f32; QK]);
    /// One value from `SIZE` bytes.
    fn decode1<I: Isa>(isa: I, c: &[u8]) -> f32;
}

struct F32;
struct F16;
struct Bf16;

impl Float for F32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn decode32<I: Isa>(_: I, b: &[u8], y: &mut [f32; QK]) {
        decode_f32x32(arr(b), y)
    }
    #[inline(always)]
    fn decode1<I: Isa>(_: I, c: &[u8]) -> f32 {
        decode_f32(c)
    }
}

impl Float for F16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn decode32<I: Isa>(isa: I, b: &[u8], y: &mut [f32; QK]) {
        decode_f16x32(isa, arr(b), y)
    }
    #[inline(always)]
    fn decode1<I: Isa>(isa: I, c: &[u8]) -> f32 {
        isa.f16([c[0], c[1]])
    }
}

impl Float for Bf16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn decode32<I: Isa>(_: I, b: &[u8], y: &mut [f32; QK]) {
        decode_bf16x32(arr(b), y)
    }
    #[inline(always)]
    fn decode1<I: Isa>(_: I, c: &[u8]) -> f32 {
        decode_bf16(c)
    }
}

#[inline(always)]
fn dequant_blocks<I: Isa, B: Decode<N>, const N: usize>(isa: I, src: &[u8], dst: &mut [f32]) {
    for (b, y) in as_blocks::<B>(src).iter().zip(dst.chunks_exact_mut(N)) {
        B::decode(isa, b, y.try_into().expect("chunk of N"));
    }
}

#[inline(always)]
fn dot_blocks<I: Isa, B: Decode<N>, const N: usize>(isa: I, src: &[u8], x: &[f32]) -> f32 {
    let mut acc = isa.acc_zero();
    for (b, xc) in as_blocks::<B>(src).iter().zip(x.chunks_exact(N)) {
        B::accumulate(isa, &mut acc, b, xc);
    }
    isa.acc_sum(acc)
}

/// A float row: runs of 32, then the tail value by value.
#[inline(always)]
fn dequant_float<I: Isa, F: Float>(isa: I, src: &[u8], dst: &mut [f32]) {
    let mut ys = dst.chunks_exact_mut(QK);
    let mut bs = src.chunks_exact(QK * F::SIZE);
    for (y, b) in (&mut ys).zip(&mut bs) {
        F::decode32(isa, b, y.try_into().expect("chunk of 32"));
    }
    for (y, c) in ys
        .into_remainder()
        .iter_mut()
        .zip(bs.remainder().chunks_exact(F::SIZE))
    {
        *y = F::decode1(isa, c);
    }
}

#[inline(always)]
fn dot_float<I: Isa, F: Float>(isa: I, src: &[u8], x: &[f32]) -> f32 {
    let mut acc = isa.acc_zero();
    let mut xs = x.chunks_exact(QK);
    let mut bs = src.chunks_exact(QK * F::SIZE);
    for (xc, b) in (&mut xs).zip(&mut bs) {
        let mut w = [0f32; QK];
        F::decode32(isa, b, &mut w);
        isa.fma32(&mut acc, &w, xc.try_into().expect("32"));
    }
    let mut sum = isa.acc_sum(acc);
    for (xv, c) in xs
        .remainder()
        .iter()
        .zip(bs.remainder().chunks_exact(F::SIZE))
    {
        sum = isa.mul_add(F::decode1(isa, c), *xv, sum);
    }
    sum
}

#[inline(always)]
fn dequantize_generic<I: Isa>(isa: I, ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    use GgmlType as T;
    match ty {
        T::F32 => dequant_float::<I, F32>(isa, src, dst),
        T::F16 => dequant_float::<I, F16>(isa, src, dst),
        T::BF16 => dequant_float::<I, Bf16>(isa, src, dst),
        T::Q4_0 => dequant_blocks::<I, BlockQ4_0, QK>(isa, src, dst),
        T::Q4_1 => dequant_blocks::<I, BlockQ4_1, QK>(isa, src, dst),
        T::Q5_0 => dequant_blocks::<I, BlockQ5_0, QK>(isa, src, dst),
        T::Q5_1 => dequant_blocks::<I, BlockQ5_1, QK>(isa, src, dst),
        T::Q8_0 => dequant_blocks::<I, BlockQ8_0, QK>(isa, src, dst),
        T::Q4_K => dequant_blocks::<I, BlockQ4K, QK_K>(isa, src, dst),
        T::Q5_K => dequant_blocks::<I, BlockQ5K, QK_K>(isa, src, dst),
        T::Q6_K => dequant_blocks::<I, BlockQ6K, QK_K>(isa, src, dst),
    }
}

#[inline(always)]
fn dot_generic<I: Isa>(isa: I, ty: GgmlType, src: &[u8], x: &[f32]) -> f32 {
    use GgmlType as T;
    match ty {
        T::F32 => dot_float::<I, F32>(isa, src, x),
        T::F16 => dot_float::<I, F16>(isa, src, x),
        T::BF16 => dot_float::<I, Bf16>(isa, src, x),
        T::Q4_0 => dot_blocks::<I, BlockQ4_0, QK>(isa, src, x),
        T::Q4_1 => dot_blocks::<I, BlockQ4_1, QK>(isa, src, x),
        T::Q5_0 => dot_blocks::<I, BlockQ5_0, QK>(isa, src, x),
        T::Q5_1 => dot_blocks::<I, BlockQ5_1, QK>(isa, src, x),
        T::Q8_0 => dot_blocks::<I, BlockQ8_0, QK>(isa, src, x),
        T::Q4_K => dot_blocks::<I, BlockQ4K, QK_K>(isa, src, x),
        T::Q5_K => dot_blocks::<I, BlockQ5K, QK_K>(isa, src, x),
        T::Q6_K => dot_blocks::<I, BlockQ6K, QK_K>(isa, src, x),
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
