//! Throughput of the `quant` kernels on one core, per type, for a 576-row ×
//! 1536-column matrix (SmolLM2's `ffn_down` shape):
//! `dequantize_row` (into a 64-row panel, as the GEMM path does), the exact
//! `dot_row`, and the integer `matvec_q8` (including quantizing the activation).
//!
//! Needs `harness = false`: `cargo bench --bench quant`. Prints, per kernel,
//! giga-elements per second and gigabytes of quantized data read per second,
//! and an estimate of SmolLM2-135M's matrix-vector time per token.

use edgetune::quant::{
    GgmlType, QuantizedActivation, cpu_features, dequantize_row, dot_row, matvec_q8, quantize_row,
};
use std::hint::black_box;
use std::time::Duration;

mod common;
use common::{data, time};

const ROWS: usize = 576;
const COLS: usize = 1536;

fn main() {
    let budget = Duration::from_millis(300);
    println!(
        "quant kernels, {ROWS}×{COLS}, one thread, {}",
        cpu_features()
    );
    println!(
        "{:<5} {:>9} | {:>17} | {:>17} | {:>17}",
        "type", "MB", "dequantize_row", "dot_row (f32)", "matvec_q8"
    );
    println!(
        "{:<5} {:>9} | {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8}",
        "", "", "Gelem/s", "GB/s", "Gelem/s", "GB/s", "Gelem/s", "GB/s"
    );
    let w = data(ROWS * COLS, 0x9e37_79b9);
    let x = data(COLS, 0x1234_5678);
    let elems = (ROWS * COLS) as f64;
    let mut q8_rate = Vec::new();
    for ty in GgmlType::ALL {
        let rb = ty.row_bytes(COLS).unwrap();
        let mut m = vec![0u8; rb * ROWS];
        for (src, dst) in w.chunks_exact(COLS).zip(m.chunks_exact_mut(rb)) {
            quantize_row(ty, src, dst).unwrap();
        }
        let bytes = m.len() as f64;
        let mut panel = vec![0f32; 64 * COLS];
        let t_deq = time(budget, || {
            for rows in m.chunks(64 * rb) {
                for (src, dst) in rows.chunks_exact(rb).zip(panel.chunks_exact_mut(COLS)) {
                    dequantize_row(ty, src, dst).unwrap();
                }
                black_box(&mut panel);
            }
        });
        let mut out = vec![0f32; ROWS];
        let t_dot = time(budget, || {
            for (o, src) in out.iter_mut().zip(m.chunks_exact(rb)) {
                *o = dot_row(ty, src, black_box(&x));
            }
            black_box(&mut out);
        });
        let mut a = QuantizedActivation::new();
        let t_q8 = time(budget, || {
            a.quantize(black_box(&x));
            matvec_q8(ty, &m, &a, &mut out).unwrap();
            black_box(&mut out);
        });
        q8_rate.push((ty, elems / t_q8));
        let r = |t: f64| (elems / t / 1e9, bytes / t / 1e9);
        let ((a1, b1), (a2, b2), (a3, b3)) = (r(t_deq), r(t_dot), r(t_q8));
        println!(
            "{:<5} {:>9.2} | {a1:>8.2} {b1:>8.2} | {a2:>8.2} {b2:>8.2} | {a3:>8.2} {b3:>8.2}",
            ty.name(),
            bytes / 1e6
        );
    }
    // SmolLM2-135M: 30 layers of Q4_1 projections (q, o 576×576; k, v 576×192;
    // gate, up, down 576×1536) and the tied Q8_0 output head 49152×576.
    let rate = |t: GgmlType| q8_rate.iter().find(|(ty, _)| *ty == t).unwrap().1;
    let layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536;
    let secs = 30.0 * layer as f64 / rate(GgmlType::Q4_1) + 49152.0 * 576.0 / rate(GgmlType::Q8_0);
    println!(
        "SmolLM2-135M matvec estimate: {:.1} ms/token on one thread ({:.0} tokens/s before attention and threads)",
        secs * 1e3,
        1.0 / secs
    );
}
