//! The frozen-weight products of one training step per Q4_1 matrix shape of
//! SmolLM2-135M, for 1024 tokens (the benchmark's 4 × 256) on one thread:
//! the forward `x·Wᵀ` and the backward `dY·W`, each in f32 (rows decoded,
//! then the `gemm` crate: the exact path) and in 8-bit integers (`--fast`:
//! `q4_gemm::gemm`, with `Wᵀ` rounded to 5 bits for `dY·W`; repacking and
//! rounding included), then what repacking, rounding and decoding take.
//!
//! Needs `harness = false`: `cargo bench --bench train_products`. Prints
//! milliseconds per product (the best of repeated runs), multiply-adds per
//! second, and the integer path's speed-up.

use edgetune::backend::cpu::gemm::{Operand, matmul_into};
use edgetune::quant::q4_gemm::{PackedQ4, Q8Rows, gemm};
use edgetune::quant::{GgmlType, cpu_features, dequantize_row, quantize_row};
use std::hint::black_box;
use std::time::Duration;

mod common;
use common::{data, time};

const TOKENS: usize = 1024;

fn main() {
    let budget = Duration::from_millis(1500);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    println!(
        "Q4_1 training products, {TOKENS} tokens, one thread, {}",
        cpu_features()
    );
    println!(
        "{:<16} | {:>9} {:>7} | {:>9} {:>7} | {:>6}",
        "rows × cols", "f32 ms", "GMAC/s", "int8 ms", "GMAC/s", "ratio"
    );
    let ty = GgmlType::Q4_1;
    // q and o, k and v, gate and up (576 × 1536 stored as 1536 rows), down.
    for (rows, cols) in [(576, 576), (192, 576), (1536, 576), (576, 1536)] {
        let rb = ty.row_bytes(cols).unwrap();
        let mut m = vec![0u8; rb * rows];
        for (src, dst) in data(rows * cols, 0x9e37_79b9)
            .chunks_exact(cols)
            .zip(m.chunks_exact_mut(rb))
        {
            quantize_row(ty, src, dst).unwrap();
        }
        let x = data(TOKENS * cols, 0x1234_5678);
        let mut wf = vec![0f32; rows * cols];
        let decode = |wf: &mut [f32]| {
            for (src, dst) in m.chunks_exact(rb).zip(wf.chunks_exact_mut(cols)) {
                dequantize_row(ty, src, dst).unwrap();
            }
        };
        let macs = (TOKENS * rows * cols) as f64;
        let mut y = vec![0f32; TOKENS * rows];
        let (mut pw, mut xq) = (PackedQ4::new(), Q8Rows::new());
        let f32_fwd = pool.install(|| {
            time(budget, || {
                decode(&mut wf);
                let (a, b) = (Operand::new(&x, cols), Operand::new(&wf, cols).t());
                matmul_into(TOKENS, rows, cols, a, b, &mut y, rows, false, 1);
                black_box(&mut y);
            })
        });
        let int_fwd = pool.install(|| {
            time(budget, || {
                xq.quantize(black_box(&x), cols);
                pw.pack(ty, rows, cols, &m);
                gemm(&pw, &xq, &mut y);
                black_box(&mut y);
            })
        });
        let dy = data(TOKENS * rows, 0x0bad_cafe);
        let mut dx = vec![0f32; TOKENS * cols];
        let f32_back = pool.install(|| {
            time(budget, || {
                decode(&mut wf);
                let (a, b) = (Operand::new(&dy, rows), Operand::new(&wf, cols));
                matmul_into(TOKENS, cols, rows, a, b, &mut dx, cols, false, 1);
                black_box(&mut dx);
            })
        });
        let int_back = pool.install(|| {
            time(budget, || {
                decode(&mut wf);
                xq.quantize(black_box(&dy), rows);
                pw.pack_transposed(&wf, rows, cols);
                gemm(&pw, &xq, &mut dx);
                black_box(&mut dx);
            })
        });
        let pack_back = pool.install(|| {
            time(budget, || {
                pw.pack_transposed(black_box(&wf), rows, cols);
            })
        });
        for (name, f, i) in [("x·Wᵀ", f32_fwd, int_fwd), ("dY·W", f32_back, int_back)] {
            println!(
                "{:<16} | {:>9.3} {:>7.1} | {:>9.3} {:>7.1} | {:>5.2}×",
                format!("{name} {rows} × {cols}"),
                f * 1e3,
                macs / f / 1e9,
                i * 1e3,
                macs / i / 1e9,
                f / i
            );
        }
        let pack_fwd = pool.install(|| time(budget, || pw.pack(ty, rows, cols, black_box(&m))));
        let quant_x = pool.install(|| time(budget, || xq.quantize(black_box(&x), cols)));
        let decode_w = pool.install(|| time(budget, || decode(black_box(&mut wf))));
        println!(
            "{:<16} |   of which: W repacked {:.3} ms, x rounded {:.3} ms; W decoded {:.3} ms, Wᵀ rounded {:.3} ms",
            "",
            pack_fwd * 1e3,
            quant_x * 1e3,
            decode_w * 1e3,
            pack_back * 1e3
        );
    }
}
