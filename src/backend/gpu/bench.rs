//! Timing one quantized product on the device, for `edgetune bench`.

use super::GpuContext;
use super::matmul::{GpuWeight, MatmulKernel, MatmulShape, matmul};
use crate::Result;
use crate::quant::GgmlType;
use std::time::Instant;

/// Seconds per product `y = x·Wᵀ` (`n_tok` tokens, `W` `rows × cols` of `ty`):
/// the median over `reps` submissions of one product each, after a warm-up,
/// from submission to completion as the host sees it.
pub fn time_matmul(
    ctx: &GpuContext,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: &[u8],
    n_tok: usize,
    reps: usize,
) -> Result<f64> {
    let w = GpuWeight::upload(ctx, "bench", ty, rows, cols, data)?;
    let x: Vec<f32> = (0..n_tok * cols)
        .map(|i| ((i % 97) as f32 - 48.0) / 64.0)
        .collect();
    let xb = ctx.upload(bytemuck::cast_slice(&x), "bench-x");
    let yb = ctx.storage((n_tok * rows * 4) as u64, "bench-y");
    let shape = MatmulShape {
        n_tok,
        x_off: 0,
        x_stride: cols,
        y_off: 0,
        y_stride: rows,
    };
    let d = matmul(ctx, &w, &xb, &yb, shape, MatmulKernel::Auto)?;
    let run = || -> Result<f64> {
        let mut enc = ctx.encoder();
        GpuContext::record(&mut enc, &d);
        let t = Instant::now();
        ctx.submit_and_wait(enc)?;
        Ok(t.elapsed().as_secs_f64())
    };
    run()?;
    let mut times = (0..reps.max(1))
        .map(|_| run())
        .collect::<Result<Vec<_>>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
