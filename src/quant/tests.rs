//! Unit tests: type table, length errors, fast paths against the portable ones,
//! the q8 path against the exact dot, and quantizer round trips.
//! (Values against ggml itself are checked in `tests/quant_fixtures.rs`.)

use super::blocks::{pack_scales_mins_k4, scale_min_k4, scales_mins_k4};
use super::q8::QuantizedActivation;
use super::simd::{Level, available_levels};
use super::*;

/// SplitMix64: deterministic test data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(1e-7), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
}

/// Byte offsets of the f16 fields inside one block.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    use GgmlType as T;
    match ty {
        T::Q4_0 | T::Q5_0 | T::Q8_0 => &[0],
        T::Q4_1 | T::Q5_1 | T::Q4_K | T::Q5_K => &[0, 2],
        T::Q6_K => &[208],
        T::F32 | T::F16 | T::BF16 => &[],
    }
}

/// Scale magnitudes worth covering: zero, subnormal, tiny, typical, the f16 maximum.
const SCALES: [f32; 8] = [0.0, 5.96e-8, 1.0e-4, 2.5e-3, 0.04, -0.03, 1.0, 65504.0];

/// A row of `n` values of `ty` from random bytes with finite scales; `scale(k)`
/// picks the value of the k-th f16 field, and block 0 is all zero bytes.
fn random_row(rng: &mut Rng, ty: GgmlType, n: usize, scale: impl Fn(usize) -> f32) -> Vec<u8> {
    use GgmlType as T;
    match ty {
        T::F32 => rng
            .normals(n)
            .iter()
            .flat_map(|v| (v * 3.0).to_le_bytes())
            .collect(),
        T::F16 => (0..n)
            .flat_map(|_| {
                let h = half::f16::from_bits(rng.next() as u16);
                let h = if h.is_finite() {
                    h
                } else {
                    half::f16::from_f32(-1.5)
                };
                h.to_bits().to_le_bytes()
            })
            .collect(),
        T::BF16 => (0..n)
            .flat_map(|_| {
                let b = ((rng.next() as u16) & 0xbfff) as u32; // exponent < 0x80: finite, < 2^64
                (b as u16).to_le_bytes()
            })
            .collect(),
        _ => {
            let mut bytes = rng.bytes(ty.row_bytes(n).unwrap());
            let ts = ty.type_size();
            let mut k = 0;
            for (bi, block) in bytes.chunks_exact_mut(ts).enumerate() {
                if bi == 0 {
                    block.fill(0);
                    continue;
                }
                for &off in f16_fields(ty) {
                    let h = half::f16::from_f32(scale(k)).to_bits().to_le_bytes();
                    block[off..off + 2].copy_from_slice(&h);
                    k += 1;
                }
            }
            bytes
        }
    }
}

fn dequant_with(level: Level, ty: GgmlType, src: &[u8], n: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; n];
    kernels::dequantize(level, ty, src, &mut y);
    y
}

/// `Σ w·x` in f64 and `Σ |w·x|` (the scale of its rounding error).
fn dot64(w: &[f32], x: &[f32]) -> (f64, f64) {
    let dot = w.iter().zip(x).map(|(&w, &x)| w as f64 * x as f64).sum();
    let abs = w
        .iter()
        .zip(x)
        .map(|(&w, &x)| (w as f64 * x as f64).abs())
        .sum();
    (dot, abs)
}

fn lengths(ty: GgmlType) -> Vec<usize> {
    match ty.block_size() {
        1 => vec![1, 31, 37, 64, 576],
        bs => vec![bs, 4 * bs, 576.max(bs) / bs * bs + bs],
    }
}

#[test]
fn ids_names_and_sizes() {
    let table = [
        (0, "F32", 1, 4),
        (1, "F16", 1, 2),
        (2, "Q4_0", 32, 18),
        (3, "Q4_1", 32, 20),
        (6, "Q5_0", 32, 22),
        (7, "Q5_1", 32, 24),
        (8, "Q8_0", 32, 34),
        (12, "Q4_K", 256, 144),
        (13, "Q5_K", 256, 176),
        (14, "Q6_K", 256, 210),
        (30, "BF16", 1, 2),
    ];
    for (id, name, bs, ts) in table {
        let t = GgmlType::from_u32(id).unwrap();
        assert_eq!(
            (t as u32, t.name(), t.block_size(), t.type_size()),
            (id, name, bs, ts)
        );
        assert_eq!(t.to_string(), name);
    }
    assert_eq!(GgmlType::ALL.len(), table.len());
}

#[test]
fn unknown_ids() {
    for id in [4, 5, 9, 10, 11, 15, 16, 20, 29, 31, 39, 1000, u32::MAX] {
        assert_eq!(GgmlType::from_u32(id), None, "id {id}");
    }
}

#[test]
fn row_bytes() {
    assert_eq!(GgmlType::F32.row_bytes(7), Some(28));
    assert_eq!(GgmlType::BF16.row_bytes(0), Some(0));
    assert_eq!(GgmlType::Q4_0.row_bytes(64), Some(36));
    assert_eq!(GgmlType::Q8_0.row_bytes(576), Some(18 * 34));
    assert_eq!(GgmlType::Q6_K.row_bytes(512), Some(420));
    assert_eq!(GgmlType::Q4_1.row_bytes(33), None);
    assert_eq!(GgmlType::Q4_K.row_bytes(576), None);
    assert_eq!(GgmlType::F32.row_bytes(usize::MAX / 2), None);
    assert_eq!(GgmlType::Q8_0.row_bytes(usize::MAX / 32 * 32), None);
}

#[test]
fn wrong_lengths_are_errors() {
    for ty in GgmlType::ALL {
        let n = ty.block_size() * 2;
        let bytes = ty.row_bytes(n).unwrap();
        let mut y = vec![0f32; n];
        for bad in [0, bytes - 1, bytes + 1] {
            let e = dequantize_row(ty, &vec![0u8; bad], &mut y).unwrap_err();
            assert!(matches!(e, Error::Quant(_)), "{ty}: {e}");
            assert!(quantize_row(ty, &y, &mut vec![0u8; bad]).is_err());
        }
        if ty.block_size() > 1 {
            let mut y = vec![0f32; n + 1];
            assert!(dequantize_row(ty, &vec![0u8; bytes], &mut y).is_err());
            assert!(quantize_row(ty, &y, &mut vec![0u8; bytes]).is_err());
        }
        let mut out = [0f32; 3];
        let a = quantize_activation_q8(&vec![1.0; n]);
        assert!(matvec_q8(ty, &vec![0u8; 2 * bytes], &a, &mut out).is_err());
        assert!(matvec_q8(ty, &vec![0u8; 3 * bytes], &a, &mut out).is_ok());
    }
    let e = dequantize_row(GgmlType::Q4_K, &[0u8; 144], &mut [0.0; 255]).unwrap_err();
    assert!(e.to_string().contains("Q4_K"), "{e}");
}

#[test]
#[should_panic(expected = "dot_row")]
fn dot_row_panics_on_length_mismatch() {
    dot_row(GgmlType::Q8_0, &[0u8; 34], &[0.0; 64]);
}

#[test]
fn empty_rows() {
    for ty in GgmlType::ALL {
        dequantize_row(ty, &[], &mut []).unwrap();
        assert_eq!(dot_row(ty, &[], &[]), 0.0);
        assert_eq!(dot_row_q8(ty, &[], &QuantizedActivation::new()), 0.0);
    }
}

#[test]
fn software_f16_conversion_is_exact() {
    for h in 0..=u16::MAX {
        let want = half::f16::from_bits(h).to_f32();
        let got = super::simd::f16_to_f32(h);
        if want.is_nan() {
            assert!(got.is_nan() && got.to_bits() == want.to_bits(), "{h:#06x}");
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "{h:#06x}");
        }
    }
}

#[test]
fn every_f16_decodes_identically_on_every_level() {
    let row: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    let want = dequant_with(Level::Portable, GgmlType::F16, &row, 1 << 16);
    for level in available_levels() {
        let got = dequant_with(level, GgmlType::F16, &row, 1 << 16);
        for (h, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{level:?} {h:#06x}");
        }
    }
}

#[test]
fn k4_scale_unpacking_agrees_and_round_trips() {
    let mut rng = Rng(7);
    for _ in 0..200 {
        let q: [u8; 12] = rng.bytes(12).try_into().unwrap();
        let (sc, m) = scales_mins_k4(&q);
        for j in 0..8 {
            assert_eq!((sc[j], m[j]), scale_min_k4(j, &q));
        }
        assert_eq!(pack_scales_mins_k4(&sc, &m), q);
    }
}

#[test]
fn dequantize_is_identical_on_every_level() {
    let mut rng = Rng(1);
    for ty in GgmlType::ALL {
        for n in lengths(ty) {
            let row = random_row(&mut rng, ty, n, |k| SCALES[k % SCALES.len()]);
            let want = dequant_with(Level::Portable, ty, &row, n);
            assert!(want.iter().all(|v| v.is_finite()), "{ty}");
            for level in available_levels() {
                let got = dequant_with(level, ty, &row, n);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{ty} n={n} {level:?}");
            }
            let mut y = vec![0f32; n];
            dequantize_row(ty, &row, &mut y).unwrap();
            assert!(y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}

#[test]
fn dot_row_matches_f64_dot_on_every_level() {
    let mut rng = Rng(2);
    for ty in GgmlType::ALL {
        for n in lengths(ty) {
            for round in 0..3 {
                let row = random_row(&mut rng, ty, n, |k| SCALES[(k + round) % SCALES.len()]);
                let w = dequant_with(Level::Portable, ty, &row, n);
                let x = rng.normals(n);
                let (want, abs) = dot64(&w, &x);
                for level in available_levels() {
                    let got = kernels::dot(level, ty, &row, &x) as f64;
                    let tol = 4e-7 * abs * (n as f64).sqrt() + 1e-30;
                    assert!(
                        (got - want).abs() <= tol,
                        "{ty} n={n} {level:?}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn zero_rows_give_zero() {
    for ty in GgmlType::ALL {
        let n = 2 * ty.block_size().max(32);
        let row = vec![0u8; ty.row_bytes(n).unwrap()];
        let x = vec![1.0f32; n];
        assert_eq!(dot_row(ty, &row, &x), 0.0);
        assert_eq!(dot_row_q8(ty, &row, &quantize_activation_q8(&x)), 0.0);
        let mut y = vec![1f32; n];
        dequantize_row(ty, &row, &mut y).unwrap();
        assert!(y.iter().all(|&v| v == 0.0), "{ty}");
    }
}

/// The q8 path differs from the exact dot only by the activation's rounding:
/// `|Σ w·(x − x̂)| ≤ Σ_b (d_b/2)·Σ_{i∈b} |w_i|`, plus f32 summation error.
fn q8_bound(w: &[f32], a: &QuantizedActivation, abs: f64) -> f64 {
    let mut bound = 0f64;
    for (b, wc) in w.chunks(32).enumerate() {
        let wsum: f64 = wc.iter().map(|v| v.abs() as f64).sum();
        bound += a.d[b] as f64 / 2.0 * wsum;
    }
    bound * 1.001 + 1e-5 * abs + 1e-30
}

#[test]
fn dot_row_q8_is_within_activation_rounding() {
    let mut rng = Rng(3);
    for ty in GgmlType::ALL {
        for n in lengths(ty) {
            for round in 0..3 {
                let row = random_row(&mut rng, ty, n, |k| SCALES[(k + round) % SCALES.len()]);
                let w = dequant_with(Level::Portable, ty, &row, n);
                let mut x = rng.normals(n);
                if round == 1 {
                    x.iter_mut().step_by(7).for_each(|v| *v *= 1e3); // outliers
                }
                let a = quantize_activation_q8(&x);
                let (want, abs) = dot64(&w, &x);
                let bound = q8_bound(&w, &a, abs);
                let mut results = Vec::new();
                for level in available_levels() {
                    let got = q8::dot(level, ty, &row, &a) as f64;
                    assert!(
                        (got - want).abs() <= bound,
                        "{ty} n={n} {level:?}: {got} vs {want} (±{bound})"
                    );
                    results.push(got);
                }
                // Levels differ only in f32 summation order (float rows use x itself).
                let xq = if ty.block_size() == 1 {
                    x.clone()
                } else {
                    a.dequantized()
                };
                let (exact, abs_hat) = dot64(&w, &xq);
                for r in &results {
                    assert!(
                        (r - exact).abs() <= 1e-5 * abs_hat + 1e-30,
                        "{ty} n={n}: {r} vs {exact}"
                    );
                }
            }
        }
    }
}

#[test]
fn matvec_matches_rows() {
    let mut rng = Rng(4);
    for ty in GgmlType::ALL {
        let n = 2 * ty.block_size().max(32);
        let rows = 5;
        let m: Vec<u8> = (0..rows)
            .flat_map(|r| random_row(&mut rng, ty, n, |k| SCALES[(k + r) % 8]))
            .collect();
        let a = quantize_activation_q8(&rng.normals(n));
        let mut out = vec![0f32; rows];
        matvec_q8(ty, &m, &a, &mut out).unwrap();
        for (r, o) in m.chunks_exact(ty.row_bytes(n).unwrap()).zip(&out) {
            assert_eq!(o.to_bits(), dot_row_q8(ty, r, &a).to_bits());
        }
    }
}

#[test]
fn activation_quantization() {
    let mut rng = Rng(5);
    let mut a = QuantizedActivation::new();
    assert!(a.is_empty());
    for n in [40, 576, 1, 0, 96] {
        let mut x = rng.normals(n);
        if n > 3 {
            x[3] = 0.0;
            x[..32.min(n)].iter_mut().for_each(|v| *v *= 1e-30);
        }
        a.quantize(&x);
        assert_eq!((a.len(), a.values()), (n, &x[..]));
        assert_eq!(a.qs.len(), n.div_ceil(32));
        let xh = a.dequantized();
        for (i, (&v, &h)) in x.iter().zip(&xh).enumerate() {
            assert!(
                (v - h).abs() <= a.d[i / 32] * 0.5001,
                "n={n} i={i}: {v} vs {h}"
            );
        }
        for b in 0..a.qs.len() {
            let sum: i32 = a.qs[b].iter().map(|&q| q as i32).sum();
            assert_eq!(a.s[b], a.d[b] * sum as f32);
            assert!(a.qs[b].iter().all(|&q| q != -128));
        }
        // Padding is zero.
        assert!(a.qs.iter().flatten().skip(n).all(|&q| q == 0));
    }
    for bad in [f32::NAN, f32::INFINITY] {
        let mut x = vec![0.5f32; 64];
        x[40] = bad;
        let a = quantize_activation_q8(&x);
        let row = vec![0x11u8; GgmlType::Q8_0.row_bytes(64).unwrap()];
        assert!(dot_row_q8(GgmlType::Q8_0, &row, &a).is_nan(), "{bad}");
        assert!(dot_row(GgmlType::Q8_0, &row, &x).is_nan() || bad.is_infinite());
    }
    let z = quantize_activation_q8(&[0.0; 64]);
    assert!(z.d.iter().all(|&d| d == 0.0) && z.qs.iter().flatten().all(|&q| q == 0));
    // Every level quantizes identically: random blocks, then an evenly
    // spaced block, a block of ties (k + ½ steps), zeros, signed zeros, a
    // NaN, an infinity, values near the smallest normal, and a partial last
    // block.
    let mut x = rng.normals(288);
    x.extend((0..32).map(|k| (k as f32 - 15.5) * 0.25));
    x.extend((0..32).map(|k| if k == 31 { 127.0 } else { k as f32 + 0.5 }));
    x.extend([0.0; 32]);
    x.extend((0..32).map(|k| if k % 2 == 0 { -0.0 } else { 0.0 }));
    x.extend((0..32).map(|k| if k == 7 { f32::NAN } else { k as f32 }));
    x.extend((0..32).map(|k| if k == 9 { f32::NEG_INFINITY } else { k as f32 }));
    x.extend((0..32).map(|k| (k as f32 - 16.0) * 1e-38));
    x.extend(rng.normals(12));
    let nb = x.len().div_ceil(32);
    let mut b = QuantizedActivation::new();
    b.len = x.len();
    b.qs.resize(nb, [0; 32]);
    b.d.resize(nb, 0.0);
    b.s.resize(nb, 0.0);
    b.x = x.clone();
    q8::quantize_portable(&mut b);
    let a = quantize_activation_q8(&x);
    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(a.qs, b.qs);
    assert_eq!((bits(&a.d), bits(&a.s)), (bits(&b.d), bits(&b.s)));
    assert!(a.d[13].is_nan() && a.d[14].is_nan() && a.d[11] == 0.0 && a.d[12] == 0.0);
    // Ties round to even, as the portable rounding does: 0.5 → 0, 1.5 → 2.
    assert_eq!(a.d[10], 1.0);
    assert_eq!(&a.qs[10][..4], &[0, 2, 2, 4]);
}

/// Quantize then dequantize `x`, returning the decoded values.
fn round_trip(ty: GgmlType, x: &[f32]) -> Vec<f32> {
    let mut q = vec![0u8; ty.row_bytes(x.len()).unwrap()];
    quantize_row(ty, x, &mut q).unwrap();
    let mut y = vec![0f32; x.len()];
    dequantize_row(ty, &q, &mut y).unwrap();
    y
}

#[test]
fn float_round_trips() {
    let mut rng = Rng(6);
    let mut x = rng.normals(300);
    x.extend([0.0, -0.0, 1e-3, -65504.0, 3.0e-8, 1e30]);
    assert!(
        round_trip(GgmlType::F32, &x)
            .iter()
            .zip(&x)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    for (ty, rel) in [(GgmlType::F16, 1.0 / 2048.0), (GgmlType::BF16, 1.0 / 256.0)] {
        let y = round_trip(ty, &x[..x.len() - 1]);
        for (&a, &b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= rel * a.abs() + 6e-8, "{ty}: {a} → {b}");
        }
    }
    assert!(round_trip(GgmlType::BF16, &[f32::NAN])[0].is_nan());
    assert_eq!(round_trip(GgmlType::F16, &[1e30])[0], f32::INFINITY);
}

#[test]
fn quantized_round_trips_are_within_a_step() {
    use GgmlType as T;
    let mut rng = Rng(8);
    for ty in [
        T::Q4_0,
        T::Q4_1,
        T::Q5_0,
        T::Q5_1,
        T::Q8_0,
        T::Q4_K,
        T::Q5_K,
        T::Q6_K,
    ] {
        let bs = ty.block_size();
        for case in 0..4 {
            let mut x: Vec<f32> = rng.normals(4 * bs);
            match case {
                1 => x.iter_mut().for_each(|v| *v = v.abs() * 1e-3 + 2.0), // offset, positive
                2 => x.iter_mut().step_by(11).for_each(|v| *v *= 30.0),    // outliers
                3 => x[..bs].fill(0.0),
                _ => {}
            }
            let y = round_trip(ty, &x);
            // One quantization step of each block (of each 32 for k-quants,
            // with the k-quants' scales quantized against the largest step).
            let sub = if bs == 256 { bs } else { 32 };
            for (xc, yc) in x.chunks(sub).zip(y.chunks(sub)) {
                let (lo, hi) = xc
                    .iter()
                    .fold((0f32, 0f32), |(l, h), &v| (l.min(v), h.max(v)));
                let amax = hi.max(-lo);
                let (lo, hi) = xc
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
                let step = match ty {
                    T::Q4_0 => amax / 8.0,
                    T::Q5_0 => amax / 16.0,
                    T::Q8_0 => amax / 127.0,
                    T::Q4_1 => (hi - lo) / 15.0 * 0.55,
                    T::Q5_1 => (hi - lo) / 31.0 * 0.55,
                    T::Q4_K => (hi - lo.min(0.0)) / 15.0,
                    T::Q5_K => (hi - lo.min(0.0)) / 31.0 * 1.1,
                    T::Q6_K => amax / 32.0,
                    _ => unreachable!(),
                };
                let tol = step * 1.02 + hi.abs().max(lo.abs()) * 2e-3;
                for (&a, &b) in xc.iter().zip(yc) {
                    assert!(
                        (a - b).abs() <= tol,
                        "{ty} case {case}: {a} → {b} (step {step})"
                    );
                }
            }
            if case == 0 {
                let rms =
                    |v: &[f32]| (v.iter().map(|v| v * v).sum::<f32>() / v.len() as f32).sqrt();
                let err: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a - b).collect();
                let rel = rms(&err) / rms(&x);
                let limit = match ty {
                    T::Q8_0 => 0.01,
                    T::Q6_K => 0.03,
                    T::Q5_0 | T::Q5_1 | T::Q5_K => 0.06,
                    _ => 0.12,
                };
                assert!(rel < limit, "{ty}: relative rms error {rel}");
            }
            if case == 3 {
                assert!(y[..bs].iter().all(|&v| v == 0.0), "{ty}: zero block");
            }
        }
    }
}

#[test]
fn q4_0_quantizer_matches_ggml_rounding() {
    // max = −4 → d = 0.5, id = 2: values map to trunc(2x + 8.5).
    let mut x = [0f32; 32];
    x[0] = -4.0;
    x[1] = 3.75; // 16.0 → clamped to 15
    x[2] = 0.24; // 8.98 → 8
    x[3] = 0.25; // 9.0 → 9
    let mut q = [0u8; 18];
    quantize_row(GgmlType::Q4_0, &x, &mut q).unwrap();
    assert_eq!(half::f16::from_le_bytes([q[0], q[1]]).to_f32(), 0.5);
    assert_eq!(q[2] & 0xF, 0);
    assert_eq!(q[3] & 0xF, 15);
    assert_eq!(q[4] & 0xF, 8);
    assert_eq!(q[5] & 0xF, 9);
    assert_eq!(q[2] >> 4, 8);
}
