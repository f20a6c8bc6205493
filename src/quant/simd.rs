//! Runtime CPU dispatch.
//!
//! Kernels are written once as `#[inline(always)]` generic code over an [`Isa`]
//! token and instantiated twice: as plain Rust ([`Portable`]) and inside
//! `#[target_feature(enable = "avx2,fma,f16c")]` wrappers ([`Avx2`]), where LLVM
//! vectorizes them for 256-bit registers. The choice is made once per process
//! ([`level`]); setting `EDGETUNE_PORTABLE=1` forces the portable kernels.

use super::blocks::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, QK};
use super::legacy;
use std::sync::OnceLock;

/// The instruction set the fast paths use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 with AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2(Avx2),
}

/// The level detected for this CPU, cached.
#[inline]
pub(crate) fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        if std::env::var_os("EDGETUNE_PORTABLE").is_some_and(|v| v != "0") {
            return Level::Portable;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = Avx2::detect() {
            return Level::Avx2(t);
        }
        Level::Portable
    })
}

/// Every level this CPU can run (the portable one first); tests compare them.
#[cfg(test)]
pub(crate) fn available_levels() -> Vec<Level> {
    let mut v = vec![Level::Portable];
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = Avx2::detect() {
        v.push(Level::Avx2(t));
    }
    v
}

/// Operations whose best form depends on the instruction set. A value of an
/// implementing type proves the CPU supports it. The block decoders default to
/// the portable formulas of `legacy.rs`; an implementation may override them
/// with code that gives bit-identical values.
pub(crate) trait Isa: Copy {
    /// Partial sums of a dot product.
    type Acc: Copy;
    /// IEEE binary16 (little-endian bytes) to f32, exactly.
    fn f16(self, bits: [u8; 2]) -> f32;
    /// 32 IEEE binary16 values (64 little-endian bytes) to f32, exactly.
    #[inline(always)]
    fn f16x32(self, bits: &[u8; 64], y: &mut [f32; QK]) {
        for (v, c) in y.iter_mut().zip(bits.chunks_exact(2)) {
            *v = self.f16([c[0], c[1]]);
        }
    }
    /// `a·b + c`, fused where the CPU has FMA (the portable form rounds twice).
    fn mul_add(self, a: f32, b: f32, c: f32) -> f32;
    /// Empty partial sums.
    fn acc_zero(self) -> Self::Acc;
    /// Adds `Σ w·x` of 32 values to the partial sums.
    fn fma32(self, acc: &mut Self::Acc, w: &[f32; QK], x: &[f32; QK]);
    /// The total of the partial sums.
    fn acc_sum(self, acc: Self::Acc) -> f32;

    /// Q4_0 block to 32 values.
    #[inline(always)]
    fn decode_q4_0(self, b: &BlockQ4_0, y: &mut [f32; QK]) {
        legacy::decode_q4_0(self, b, y)
    }
    /// Q4_1 block to 32 values.
    #[inline(always)]
    fn decode_q4_1(self, b: &BlockQ4_1, y: &mut [f32; QK]) {
        legacy::decode_q4_1(self, b, y)
    }
    /// Q5_0 block to 32 values.
    #[inline(always)]
    fn decode_q5_0(self, b: &BlockQ5_0, y: &mut [f32; QK]) {
        legacy::decode_q5_0(self, b, y)
    }
    /// Q5_1 block to 32 values.
    #[inline(always)]
    fn decode_q5_1(self, b: &BlockQ5_1, y: &mut [f32; QK]) {
        legacy::decode_q5_1(self, b, y)
    }
    /// Q8_0 block to 32 values.
    #[inline(always)]
    fn decode_q8_0(self, b: &BlockQ8_0, y: &mut [f32; QK]) {
        legacy::decode_q8_0(self, b, y)
    }
    /// Adds `Σ w·x` for the 32 values `w` of a Q4_0 block.
    #[inline(always)]
    fn dot_q4_0(self, acc: &mut Self::Acc, b: &BlockQ4_0, x: &[f32; QK]) {
        let mut w = [0f32; QK];
        self.decode_q4_0(b, &mut w);
        self.fma32(acc, &w, x)
    }
    /// Adds `Σ w·x` for a Q4_1 block.
    #[inline(always)]
    fn dot_q4_1(self, acc: &mut Self::Acc, b: &BlockQ4_1, x: &[f32; QK]) {
        let mut w = [0f32; QK];
        self.decode_q4_1(b, &mut w);
        self.fma32(acc, &w, x)
    }
    /// Adds `Σ w·x` for a Q5_0 block.
    #[inline(always)]
    fn dot_q5_0(self, acc: &mut Self::Acc, b: &BlockQ5_0, x: &[f32; QK]) {
        let mut w = [0f32; QK];
        self.decode_q5_0(b, &mut w);
        self.fma32(acc, &w, x)
    }
    /// Adds `Σ w·x` for a Q5_1 block.
    #[inline(always)]
    fn dot_q5_1(self, acc: &mut Self::Acc, b: &BlockQ5_1, x: &[f32; QK]) {
        let mut w = [0f32; QK];
        self.decode_q5_1(b, &mut w);
        self.fma32(acc, &w, x)
    }
    /// Adds `Σ w·x` for a Q8_0 block.
    #[inline(always)]
    fn dot_q8_0(self, acc: &mut Self::Acc, b: &BlockQ8_0, x: &[f32; QK]) {
        let mut w = [0f32; QK];
        self.decode_q8_0(b, &mut w);
        self.fma32(acc, &w, x)
    }
}

/// Plain Rust for any CPU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Portable;

impl Isa for Portable {
    /// 16 lanes, so LLVM can keep vector accumulators without a single
    /// loop-carried sum.
    type Acc = [f32; 16];
    #[inline(always)]
    fn f16(self, bits: [u8; 2]) -> f32 {
        f16_to_f32(u16::from_le_bytes(bits))
    }
    #[inline(always)]
    fn mul_add(self, a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
    #[inline(always)]
    fn acc_zero(self) -> [f32; 16] {
        [0.0; 16]
    }
    #[inline(always)]
    fn fma32(self, acc: &mut [f32; 16], w: &[f32; QK], x: &[f32; QK]) {
        for (wc, xc) in w.chunks_exact(16).zip(x.chunks_exact(16)) {
            for l in 0..16 {
                acc[l] += wc[l] * xc[l];
            }
        }
    }
    #[inline(always)]
    fn acc_sum(self, acc: [f32; 16]) -> f32 {
        let mut a = [0f32; 8];
        for l in 0..8 {
            a[l] = acc[l] + acc[l + 8];
        }
        let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
        (b[0] + b[2]) + (b[1] + b[3])
    }
}

/// IEEE binary16 to f32, exactly, branch-free (so loops of it vectorize).
///
/// Normal values rebias the exponent (`+112` in f32's exponent field);
/// subnormals are `m·2^−24`, converted from the integer `m` (no f32 subnormal
/// arithmetic, which is slow on x86); infinities and NaNs keep their payload,
/// NaNs made quiet as F16C's `vcvtph2ps` does.
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let exp = h & 0x7c00;
    let mant = h & 0x03ff;
    let em = (h & 0x7fff) << 13;
    let normal = em + (112 << 23);
    let subnormal = (mant as f32 * f32::from_bits(0x3380_0000)).to_bits();
    let quiet = if mant != 0 { 0x0040_0000 } else { 0 };
    let special = em | 0x7f80_0000 | quiet;
    let bits = if exp == 0 {
        subnormal
    } else if exp == 0x7c00 {
        special
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

/// Proof that the CPU has AVX2, FMA and F16C; only [`Avx2::detect`] makes one.
/// Its [`Isa`] implementation is in `avx2.rs`.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx2(());

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    /// The token, when this CPU has the features.
    pub(crate) fn detect() -> Option<Self> {
        (is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        .then_some(Avx2(()))
    }
}
