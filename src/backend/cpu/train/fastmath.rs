//! `exp` for f32 that the compiler vectorizes (pure arithmetic, no calls,
//! no branches), accurate to a few ulp: the activations, softmaxes and the
//! loss call it hundreds of millions of times per step.
//!
//! And the row kernels built on it. Each is compiled twice by [`simd_fn!`]:
//! for the baseline target and with AVX2+FMA enabled, chosen at run time
//! like the quantized kernels (`EDGETUNE_PORTABLE=1` forces the baseline).
//! Sums use 8 independent lanes, so they vectorize and give the same bits
//! on both paths (Rust never contracts `a·b + c` into an FMA by itself).

/// `e^x` for f32, relative error below 4e-7 on [−87, 88]; 0 below −87.3
/// and `+∞` above 88.7, like `f32::exp`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a high part exact in f32 and a low remainder.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Round to nearest by the 1.5·2²³ trick: `round` is a library call
    // (no SSE4.1 in the baseline target) and would stop vectorization.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.5, 88.5);
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    // e^r on |r| ≤ ln2/2: Taylor to degree 7 in Horner form.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n by building the exponent bits; n + 127 stays in 1..=255 after the
    // clamp except at the very bottom, where the result flushes to 0.
    let bits = ((n as i32 + 127).max(0) as u32) << 23;
    let scaled = p * f32::from_bits(bits);
    if x <= -87.4 { 0.0 } else { scaled }
}

/// Defines a row kernel twice, as portable code and inside an
/// `avx2,fma` target-feature function, and calls the one the CPU allows.
/// Kernels are sequential: parallel loops call them per row or chunk.
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn body($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn fast($($a: $t),*) $(-> $r)? {
                    body($($a),*)
                }
                if crate::quant::wide_simd() {
                    // SAFETY: `wide_simd` is true only when the CPU has AVX2 and FMA.
                    return unsafe { fast($($a),*) };
                }
            }
            body($($a),*)
        }
    };
}
pub(crate) use simd_fn;

/// Lanes of the vectorized reductions.
const L: usize = 8;

/// The lanes' total, combined pairwise in a fixed order.
#[inline(always)]
fn combine(acc: [f32; L]) -> f32 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

simd_fn! {
    /// The largest value (`−∞` for none; NaN-ignoring like `f32::max`).
    pub fn max(x: &[f32]) -> f32 {
        let (chunks, rest) = x.as_chunks::<L>();
        let mut acc = [f32::NEG_INFINITY; L];
        for c in chunks {
            for l in 0..L {
                acc[l] = acc[l].max(c[l]);
            }
        }
        for (a, &v) in acc.iter_mut().zip(rest) {
            *a = a.max(v);
        }
        acc.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }
}

simd_fn! {
    /// `x ← e^(scale·x − shift)`, returning the sum of the new values.
    pub fn exp_sum(x: &mut [f32], scale: f32, shift: f32) -> f32 {
        let (chunks, rest) = x.as_chunks_mut::<L>();
        let mut acc = [0.0f32; L];
        for c in chunks {
            for l in 0..L {
                c[l] = exp(c[l] * scale - shift);
                acc[l] += c[l];
            }
        }
        for (a, v) in acc.iter_mut().zip(rest) {
            *v = exp(*v * scale - shift);
            *a += *v;
        }
        combine(acc)
    }
}

simd_fn! {
    /// `x ← e^(scale·x − shift)`.
    pub fn exp_shift(x: &mut [f32], scale: f32, shift: f32) {
        for v in x.iter_mut() {
            *v = exp(*v * scale - shift);
        }
    }
}

simd_fn! {
    /// The softmax's backward on one row: `dp ← p ⊙ (dp − dot) · scale`.
    pub fn softmax_back(dp: &mut [f32], p: &[f32], dot: f32, scale: f32) {
        for (x, &pv) in dp.iter_mut().zip(p) {
            *x = pv * (*x - dot) * scale;
        }
    }
}

simd_fn! {
    /// `x ← k·x`.
    pub fn scale(x: &mut [f32], k: f32) {
        for v in x.iter_mut() {
            *v *= k;
        }
    }
}

simd_fn! {
    /// `Σ a·b` over the shorter length.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (ca, ra) = a[..n].as_chunks::<L>();
        let (cb, rb) = b[..n].as_chunks::<L>();
        let mut acc = [0.0f32; L];
        for (x, y) in ca.iter().zip(cb) {
            for l in 0..L {
                acc[l] += x[l] * y[l];
            }
        }
        for ((s, &x), &y) in acc.iter_mut().zip(ra).zip(rb) {
            *s += x * y;
        }
        combine(acc)
    }
}

simd_fn! {
    /// `Σ a·b·c` over the shortest length.
    pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
        let n = a.len().min(b.len()).min(c.len());
        let (ca, ra) = a[..n].as_chunks::<L>();
        let (cb, rb) = b[..n].as_chunks::<L>();
        let (cc, rc) = c[..n].as_chunks::<L>();
        let mut acc = [0.0f32; L];
        for ((x, y), z) in ca.iter().zip(cb).zip(cc) {
            for l in 0..L {
                acc[l] += x[l] * y[l] * z[l];
            }
        }
        for (((s, &x), &y), &z) in acc.iter_mut().zip(ra).zip(rb).zip(rc) {
            *s += x * y * z;
        }
        combine(acc)
    }
}

simd_fn! {
    /// `y ← a ⊙ b · k`.
    pub fn mul_scaled(y: &mut [f32], a: &[f32], b: &[f32], k: f32) {
        for ((o, &x), &w) in y.iter_mut().zip(a).zip(b) {
            *o = x * k * w;
        }
    }
}

simd_fn! {
    /// `y ← y + x`.
    pub fn add_assign(y: &mut [f32], x: &[f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o += v;
        }
    }
}

/// `1 / (1 + e^−x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `tanh(x) = 1 − 2 / (e^{2x} + 1)`.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_accurate_over_the_whole_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = super::exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_3;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(super::exp(-200.0), 0.0);
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert!(super::exp(89.0).is_infinite() || super::exp(89.0) > 1e38);
        assert!((super::tanh(0.5) - 0.5f32.tanh()).abs() < 1e-6);
        assert!((super::tanh(-20.0) + 1.0).abs() < 1e-6 && (super::tanh(20.0) - 1.0).abs() < 1e-6);
        assert!((super::sigmoid(-3.0) - 1.0 / (1.0 + 3.0f32.exp())).abs() < 1e-7);
    }

    /// Values in [−4, 4) from a fixed LCG.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 8.0 - 4.0
            })
            .collect()
    }

    #[test]
    fn row_kernels_match_their_formulas_at_every_length() {
        // Lengths around the lane count exercise the remainders.
        for n in [0, 1, 7, 8, 9, 63, 64, 577] {
            let (a, b, c) = (values(n, 1), values(n, 2), values(n, 3));
            let close = |got: f32, want: f64| {
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "n={n}: {got} vs {want}"
                );
            };
            let want_max = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(super::max(&a), want_max, "n={n}");
            close(
                super::dot(&a, &b),
                a.iter()
                    .zip(&b)
                    .map(|(&x, &y)| f64::from(x) * f64::from(y))
                    .sum(),
            );
            let want3: f64 = (0..n)
                .map(|i| f64::from(a[i]) * f64::from(b[i]) * f64::from(c[i]))
                .sum();
            close(super::dot3(&a, &b, &c), want3);
            let mut e = a.clone();
            let sum = super::exp_sum(&mut e, 0.5, 1.25);
            let want_e: Vec<f64> = a
                .iter()
                .map(|&x| (0.5 * f64::from(x) - 1.25).exp())
                .collect();
            close(sum, want_e.iter().sum());
            for (&got, &want) in e.iter().zip(&want_e) {
                close(got, want);
            }
            let mut d = b.clone();
            super::softmax_back(&mut d, &c, 0.3, 0.125);
            for i in 0..n {
                close(d[i], f64::from(c[i]) * (f64::from(b[i]) - 0.3) * 0.125);
            }
            let mut y = vec![0.0; n];
            super::mul_scaled(&mut y, &a, &b, 3.0);
            super::add_assign(&mut y, &c);
            super::scale(&mut y, 0.5);
            for i in 0..n {
                close(
                    y[i],
                    (f64::from(a[i]) * 3.0 * f64::from(b[i]) + f64::from(c[i])) * 0.5,
                );
            }
        }
    }
}
