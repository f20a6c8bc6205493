use super::*;
use crate::quant::{dequantize_row, quantize_row};

fn rng(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

/// Rows of `ty` quantized from random values, and their exact decode.
fn matrix(ty: GgmlType, rows: usize, cols: usize, seed: &mut u64) -> (Vec<u8>, Vec<f32>) {
    let rb = ty.row_bytes(cols).unwrap();
    let mut data = vec![0u8; rows * rb];
    let mut dec = vec![0f32; rows * cols];
    for r in 0..rows {
        let v: Vec<f32> = (0..cols)
            .map(|_| rng(seed) * (1.0 + r as f32 * 0.1))
            .collect();
        quantize_row(ty, &v, &mut data[r * rb..(r + 1) * rb]).unwrap();
        dequantize_row(
            ty,
            &data[r * rb..(r + 1) * rb],
            &mut dec[r * cols..(r + 1) * cols],
        )
        .unwrap();
    }
    (data, dec)
}

#[test]
fn matches_the_f32_product_of_the_decoded_weights_and_every_level_agrees() {
    let mut seed = 7;
    // 13 rows: a padded group; 7 tokens: a partial tile; 96 columns: 3 blocks.
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1] {
        let (rows, cols, n) = (13, 96, 7);
        let (data, dec) = matrix(ty, rows, cols, &mut seed);
        let x: Vec<f32> = (0..n * cols).map(|_| rng(&mut seed) * 4.0).collect();
        let mut w = PackedQ4::new();
        w.pack(ty, rows, cols, &data);
        let mut xq = Q8Rows::new();
        xq.quantize(&x, cols);
        let mut outs = Vec::new();
        for lv in super::super::simd::available_levels() {
            let mut y = vec![f32::NAN; n * rows];
            gemm_at(lv, &w, &xq, &mut y);
            outs.push(y);
        }
        for y in &outs[1..] {
            assert_eq!(y, &outs[0], "{ty:?}: the AVX2 kernel's bits differ");
        }
        let y = &outs[0];
        // Exactly the product of the 8-bit activations and the weights.
        for t in 0..n {
            let xt: Vec<f32> = (0..cols)
                .map(|k| xq.qs[t * cols + k] as f32 * xq.d[t * cols / QK + k / QK])
                .collect();
            for r in 0..rows {
                let wr = &dec[r * cols..(r + 1) * cols];
                let want: f64 = wr.iter().zip(&xt).map(|(a, b)| f64::from(a * b)).sum();
                let l1: f64 = wr
                    .iter()
                    .zip(&xt)
                    .map(|(a, b)| f64::from((a * b).abs()))
                    .sum();
                let got = f64::from(y[t * rows + r]);
                assert!(
                    (got - want).abs() <= 1e-6 * l1,
                    "{ty:?} t{t} r{r}: {got} vs {want}"
                );
            }
        }
        for t in 0..n {
            let xt = &x[t * cols..(t + 1) * cols];
            let amax = xt.iter().fold(0f32, |m, v| m.max(v.abs()));
            for r in 0..rows {
                let wr = &dec[r * cols..(r + 1) * cols];
                let exact: f32 = wr.iter().zip(xt).map(|(a, b)| a * b).sum();
                let l1: f32 = wr.iter().map(|v| v.abs()).sum();
                // Each activation moves at most half a step, amax/254.
                let bound = l1 * amax / 254.0 + 1e-4;
                let got = y[t * rows + r];
                assert!(
                    (got - exact).abs() <= bound,
                    "{ty:?} t{t} r{r}: {got} vs {exact}"
                );
            }
        }
        // Same weights, same quants: a product that ignored the 8-bit
        // rounding would not reproduce the integer sums this gives.
        let mut y2 = vec![0f32; n * rows];
        gemm(&w, &xq, &mut y2);
        assert_eq!(&y2, y);
    }
}

#[test]
fn packed_rows_give_each_rows_own_dot_product_through_the_q8_path() {
    // The integer matrix-vector path of generation computes the same sums.
    let mut seed = 11;
    let (rows, cols) = (8, 64);
    let (data, _) = matrix(GgmlType::Q4_1, rows, cols, &mut seed);
    let x: Vec<f32> = (0..cols).map(|_| rng(&mut seed)).collect();
    let mut w = PackedQ4::new();
    w.pack(GgmlType::Q4_1, rows, cols, &data);
    let mut xq = Q8Rows::new();
    xq.quantize(&x, cols);
    let mut y = vec![0f32; rows];
    gemm(&w, &xq, &mut y);
    let a = crate::quant::quantize_activation_q8(&x);
    let rb = GgmlType::Q4_1.row_bytes(cols).unwrap();
    for r in 0..rows {
        let want = crate::quant::dot_row_q8(GgmlType::Q4_1, &data[r * rb..(r + 1) * rb], &a);
        assert!(
            (y[r] - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{} vs {want}",
            y[r]
        );
    }
}

#[test]
fn backward_product_is_dy_times_the_weights_within_the_rounding_of_dy_d() {
    let mut seed = 5;
    // 45 rows: a partial block of 13 along the contraction (and a scalar
    // tail in the AVX2 rounding); 160 columns: 5 blocks, two passes; 7
    // tokens: a partial tile.
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1] {
        let (rows, cols, n) = (45, 160, 7);
        let (data, dec) = matrix(ty, rows, cols, &mut seed);
        let dy: Vec<f32> = (0..n * rows)
            .map(|k| rng(&mut seed) * (1.0 + (k / rows) as f32))
            .collect();
        let mut w = PackedQ4T::new();
        w.pack(ty, rows, cols, &data);
        let mut outs = Vec::new();
        for lv in super::super::simd::available_levels() {
            let mut dx = vec![f32::NAN; n * cols];
            back::gemm_back_levels(&w, &dy, &mut dx, lv);
            outs.push(dx);
        }
        for dx in &outs[1..] {
            assert_eq!(dx, &outs[0], "{ty:?}: the AVX2 kernel's bits differ");
        }
        let dx = &outs[0];
        let rb = ty.row_bytes(cols).unwrap();
        // Quants and scales straight from the GGUF blocks.
        let quant = |o: usize, i: usize| -> (f64, f32) {
            let (qs, d, _) = block(ty, &data[o * rb..(o + 1) * rb], i / QK);
            let c = i % QK;
            let q = if c < 16 { qs[c] & 15 } else { qs[c - 16] >> 4 };
            (f64::from(q), d)
        };
        for t in 0..n {
            let dyt = &dy[t * rows..(t + 1) * rows];
            for i in 0..cols {
                let (mut want, mut rounded) = (0f64, 0f64);
                let (mut l1, mut bound) = (0f64, 0f64);
                for ob in 0..rows.div_ceil(QK) {
                    let os = ob * QK..rows.min(ob * QK + QK);
                    let amax = dyt[os.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
                    let dmax = os.clone().fold(0f32, |m, o| m.max(quant(o, i).1.abs()));
                    for o in os {
                        let (q, d) = quant(o, i);
                        let w = f64::from(dec[o * cols + i]);
                        let p = f64::from(dyt[o]) * w;
                        want += p;
                        l1 += p.abs();
                        // dy·d moves by at most 0.51 of a step, amax·dmax/127 ...
                        bound += f64::from(amax * dmax) / 127.0 * 0.51 * q;
                        // ... to a multiple of it, by the module's fixed-point
                        // formula.
                        let u = (dyt[o] * (32767.0 / amax)).round_ties_even() as i32;
                        let v = ((d * (127.0 / dmax)) * 256.0).round_ties_even() as i32;
                        let a = (((u * v + (1 << 14)) >> 15) * 128 + (1 << 14)) >> 15;
                        let step = f64::from(amax) * f64::from(dmax / 127.0 * (32768.0 / 32767.0));
                        let offset = w - f64::from(d) * q;
                        rounded += f64::from(a) * step * q + f64::from(dyt[o]) * offset;
                    }
                }
                let got = f64::from(dx[t * cols + i]);
                assert!(
                    (got - want).abs() <= bound * (1.0 + 1e-4) + 1e-5 * l1,
                    "{ty:?} t{t} column {i}: {got} vs {want} (bound {bound})"
                );
                assert!(
                    (got - rounded).abs() <= 1e-5 * l1,
                    "{ty:?} t{t} column {i}: {got} vs {rounded} rounded"
                );
            }
        }
        // Reused buffers: a smaller matrix packed into the same one.
        let (data2, dec2) = matrix(ty, 8, 32, &mut seed);
        w.pack(ty, 8, 32, &data2);
        let dy2 = vec![1.0f32; 8];
        let mut dx2 = vec![0f32; 32];
        gemm_back(&w, &dy2, &mut dx2);
        for (i, got) in dx2.iter().enumerate() {
            let want: f32 = (0..8).map(|o| dec2[o * 32 + i]).sum();
            assert!(
                (got - want).abs() <= 0.06 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
    }
}
