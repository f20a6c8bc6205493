//! Runtime CPU dispatch.
//!
//! Kernels are written once as `#[inline(always)]` generic code over an [`Isa`]
//! token and instantiated twice: as plain Rust ([`Portable`]) and inside
//! `#[target_feature(enable = "avx2,fma,f16c")]` wrappers ([`Avx2`]), where LLVM
//! vectorizes them for 256-bit registers. The choice is made once per process
//! ([`level`]); setting `EDGETUNE_PORTABLE=1` forces the portable kernels.

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

/// Scalar operations whose best form depends on the instruction set. A value of
/// an implementing type proves the CPU supports it.
pub(crate) trait Isa: Copy {
    /// IEEE binary16 (little-endian bytes) to f32, exactly.
    fn f16(self, bits: [u8; 2]) -> f32;
    /// Eight IEEE binary16 values (16 little-endian bytes) to f32, exactly.
    fn f16x8(self, bits: &[u8; 16]) -> [f32; 8];
    /// `a·b + c`, fused where the CPU has FMA (the portable form rounds twice).
    fn mul_add(self, a: f32, b: f32, c: f32) -> f32;
}

/// Plain Rust for any CPU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Portable;

impl Isa for Portable {
    #[inline(always)]
    fn f16(self, bits: [u8; 2]) -> f32 {
        half::f16::from_bits(u16::from_le_bytes(bits)).to_f32()
    }
    #[inline(always)]
    fn f16x8(self, bits: &[u8; 16]) -> [f32; 8] {
        std::array::from_fn(|i| self.f16([bits[2 * i], bits[2 * i + 1]]))
    }
    #[inline(always)]
    fn mul_add(self, a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// Proof that the CPU has AVX2, FMA and F16C; only [`Avx2::detect`] makes one.
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

#[cfg(target_arch = "x86_64")]
impl Isa for Avx2 {
    #[inline(always)]
    fn f16(self, bits: [u8; 2]) -> f32 {
        use std::arch::x86_64::*;
        // SAFETY: the token proves F16C is present.
        unsafe {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                u16::from_le_bytes(bits) as i32
            )))
        }
    }
    #[inline(always)]
    fn f16x8(self, bits: &[u8; 16]) -> [f32; 8] {
        use std::arch::x86_64::*;
        let mut out = [0f32; 8];
        // SAFETY: the token proves F16C and AVX are present; both accesses are
        // unaligned loads/stores within the arrays.
        unsafe {
            let h = _mm_loadu_si128(bits.as_ptr().cast());
            _mm256_storeu_ps(out.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
        out
    }
    #[inline(always)]
    fn mul_add(self, a: f32, b: f32, c: f32) -> f32 {
        // Inlined into `target_feature(enable = "fma")` code this is one vfmadd.
        a.mul_add(b, c)
    }
}

/// Sums `w·x` of one decoded block into `acc`, 16 independent lanes so LLVM keeps
/// two 8-wide accumulators and no loop-carried dependency on a single sum.
#[inline(always)]
pub(crate) fn fma_block<I: Isa, const N: usize>(
    isa: I,
    acc: &mut [f32; 16],
    w: &[f32; N],
    x: &[f32],
) {
    let x: &[f32; N] = x.try_into().expect("x chunk has the block length");
    for (wc, xc) in w.chunks_exact(16).zip(x.chunks_exact(16)) {
        for l in 0..16 {
            acc[l] = isa.mul_add(wc[l], xc[l], acc[l]);
        }
    }
}

/// Pairwise sum of the 16 accumulator lanes.
#[inline(always)]
pub(crate) fn reduce(acc: &[f32; 16]) -> f32 {
    let mut a = [0f32; 8];
    for l in 0..8 {
        a[l] = acc[l] + acc[l + 8];
    }
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (b[0] + b[2]) + (b[1] + b[3])
}
