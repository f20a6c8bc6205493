//! The training kernels against the CPU training kernels
//! (`backend::cpu::train`) on random inputs: sizes that are not multiples of
//! the tiles, operands at unaligned offsets of one shared buffer (as in the
//! arena), every frozen-weight format the models use, weights split over
//! several bindings, GQA, windows and packed segments. Each test prints its
//! worst error relative to the largest expected value (`--nocapture`).
//! Skipped where no GPU opens; sizes stay small (software Vulkan is slow).

use super::train::*;
use super::{Dispatch, GpuContext, GpuWeight, testing};
use crate::backend::cpu::matmul::{QMatrix, matmul as cpu_matmul};
use crate::backend::cpu::train::{attention as cpu_attn, loss as cpu_loss, ops as cpu};
use crate::graph::AttnGeom;
use crate::model::{Activation, Rope, RopeKind};
use crate::quant::{GgmlType, quantize_row};
use crate::train::optim::{AdamWConfig, AdamWState};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use wgpu::Buffer;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn random(r: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(lo..hi)).collect()
}

fn upload(ctx: &GpuContext, v: &[f32]) -> Buffer {
    ctx.upload(bytemuck::cast_slice(v), "test f32")
}

fn upload_u32(ctx: &GpuContext, v: &[u32]) -> Buffer {
    ctx.upload(bytemuck::cast_slice(v), "test u32")
}

fn run(ctx: &GpuContext, dispatches: &[Dispatch]) {
    let mut enc = ctx.encoder();
    GpuContext::record(&mut enc, dispatches);
    ctx.submit_and_wait(enc).unwrap();
}

fn read(ctx: &GpuContext, v: View, n: usize) -> Vec<f32> {
    ctx.read_f32(v.buffer, v.offset, n).unwrap()
}

/// Largest `|got − want|` over the largest `|want|` (at least 1e-6); panics
/// past `tol`. Returns it.
#[track_caller]
fn check(got: &[f32], want: &[f32], tol: f32, what: &str) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let range = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let mut worst = (0.0f32, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (g - w).abs() / range;
        if e > worst.0 || e.is_nan() {
            worst = (if e.is_nan() { f32::INFINITY } else { e }, i);
        }
    }
    eprintln!("{what}: worst relative error {:.2e}", worst.0);
    assert!(
        worst.0 <= tol,
        "{what}: element {}: gpu {} vs cpu {} (relative error {:.2e} > {tol:.0e})",
        worst.1,
        got[worst.1],
        want[worst.1],
        worst.0
    );
    worst.0
}

/// One buffer holding several tensors at unaligned element offsets, as the
/// arena does: tensor i at `offsets[i]`, with NaN gaps between them.
struct Arena {
    buffer: Buffer,
    offsets: Vec<usize>,
}

impl Arena {
    /// Tensors of the given contents (an empty slice: an output of that
    /// length, NaN until a kernel writes it), with NaN between them.
    fn new(ctx: &GpuContext, tensors: &[(&[f32], usize)]) -> Arena {
        let mut data = vec![f32::NAN; 7];
        let mut offsets = Vec::new();
        for (vals, len) in tensors {
            offsets.push(data.len());
            if vals.is_empty() {
                data.extend(std::iter::repeat_n(f32::NAN, *len));
            } else {
                assert_eq!(vals.len(), *len);
                data.extend_from_slice(vals);
            }
            // A gap that leaves the next offset unaligned.
            data.extend(std::iter::repeat_n(f32::NAN, 13));
        }
        Arena {
            buffer: upload(ctx, &data),
            offsets,
        }
    }

    fn view(&self, i: usize) -> View<'_> {
        View::at(&self.buffer, self.offsets[i])
    }
}

/// A quantized matrix uploaded as the executor uploads it: split by rows
/// over `ctx.max_binding()`.
fn upload_quant(
    ctx: &GpuContext,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: &[u8],
) -> GpuWeight {
    GpuWeight::upload(ctx, "test weight", ty, rows, cols, data).unwrap()
}

/// `rows × cols` random weights quantized to `ty`.
fn quantized(r: &mut ChaCha8Rng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let rb = ty.row_bytes(cols).unwrap();
    let mut data = vec![0u8; rows * rb];
    for row in data.chunks_exact_mut(rb) {
        quantize_row(ty, &random(r, cols, -1.0, 1.0), row).unwrap();
    }
    data
}

/// The CPU's decoding of every row of a quantized matrix.
fn decoded(m: &QMatrix) -> Vec<f32> {
    let mut w = vec![0.0; m.rows * m.cols];
    for (r, row) in w.chunks_exact_mut(m.cols).enumerate() {
        m.dequantize_row(r, row);
    }
    w
}

const FORMATS: [GgmlType; 6] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::F16,
];

fn cols_for(ty: GgmlType) -> usize {
    match ty.block_size() {
        256 => 256,
        32 => 96,
        _ => 75,
    }
}

#[test]
fn linear_and_linear_back_x_match_cpu_for_every_format_and_split_weights() {
    for (ctx, split) in [
        (testing::context(), false),
        (testing::context_small_bindings(), true),
    ] {
        let Some(ctx) = ctx else {
            return;
        };
        for ty in FORMATS {
            let mut r = rng(10 + ty as u64);
            let (rows, cols, n) = (130, cols_for(ty), 67);
            let data = quantized(&mut r, ty, rows, cols);
            let qm = QMatrix::new(ty, rows, cols, &data).unwrap();
            let q = upload_quant(&ctx, ty, rows, cols, &data);
            assert_eq!(q.parts() > 1, split, "{ty}: parts {}", q.parts());
            let x = random(&mut r, n * cols, -1.0, 1.0);
            let dy = random(&mut r, n * rows, -1.0, 1.0);
            let arena = Arena::new(
                &ctx,
                &[
                    (&x, n * cols),
                    (&[], n * rows),
                    (&dy, n * rows),
                    (&[], n * cols),
                ],
            );
            let mut d = linear(&ctx, &q.quant_matrix(), arena.view(0), arena.view(1), n).unwrap();
            d.extend(
                linear_back_x(&ctx, &q.quant_matrix(), arena.view(2), arena.view(3), n).unwrap(),
            );
            run(&ctx, &d);

            let mut want = vec![0.0; n * rows];
            cpu_matmul(&x, &qm, &mut want);
            let what = format!("linear {ty} split {split}");
            check(&read(&ctx, arena.view(1), n * rows), &want, 1e-5, &what);

            // The CPU executor's LinearBackX: dy · (decoded W), here in f64.
            let w = decoded(&qm);
            let mut want = vec![0.0; n * cols];
            for t in 0..n {
                for c in 0..cols {
                    want[t * cols + c] = (0..rows)
                        .map(|o| dy[t * rows + o] as f64 * w[o * cols + c] as f64)
                        .sum::<f64>() as f32;
                }
            }
            let what = format!("linear_back_x {ty} split {split}");
            check(&read(&ctx, arena.view(3), n * cols), &want, 1e-5, &what);
        }
    }
}

#[test]
fn the_forward_products_take_1024_tokens() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(3);
    let (ty, rows, cols, n) = (GgmlType::Q8_0, 40, 64, 1030);
    let data = quantized(&mut r, ty, rows, cols);
    let qm = QMatrix::new(ty, rows, cols, &data).unwrap();
    let x = random(&mut r, n * cols, -1.0, 1.0);
    let mut want = vec![0.0; n * rows];
    cpu_matmul(&x, &qm, &mut want);
    let xb = upload(&ctx, &x);

    // This module's linear, and matmul.rs's tiled kernel (inference).
    let q = upload_quant(&ctx, ty, rows, cols, &data);
    let yb = ctx.storage((n * rows * 4) as u64, "y");
    run(
        &ctx,
        &linear(
            &ctx,
            &q.quant_matrix(),
            View::whole(&xb),
            View::whole(&yb),
            n,
        )
        .unwrap(),
    );
    check(
        &read(&ctx, View::whole(&yb), n * rows),
        &want,
        1e-5,
        "linear 1030 tokens",
    );

    use super::matmul::{MatmulKernel, MatmulShape, matmul};
    let gw = super::GpuWeight::upload(&ctx, "w", ty, rows, cols, &data).unwrap();
    let yb = ctx.storage((n * rows * 4) as u64, "y");
    let s = MatmulShape::packed(n, cols, rows);
    run(
        &ctx,
        &matmul(&ctx, &gw, &xb, &yb, s, MatmulKernel::Tiled).unwrap(),
    );
    check(
        &read(&ctx, View::whole(&yb), n * rows),
        &want,
        1e-5,
        "matmul.rs tiled 1030 tokens",
    );
}

/// `a (m, k) · b (k, n)` in f64 through index functions.
fn product(
    m: usize,
    n: usize,
    k: usize,
    a: impl Fn(usize, usize) -> f32,
    b: impl Fn(usize, usize) -> f32,
) -> Vec<f32> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k)
                .map(|kk| a(i, kk) as f64 * b(kk, j) as f64)
                .sum::<f64>() as f32;
        }
    }
    c
}

#[test]
fn lora_products_match_cpu() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(4);
    // (tokens, r, features): r at both ends of its range, a long reduction.
    for (n, m, k) in [(67, 8, 130), (1030, 3, 75), (5, 64, 9), (33, 1, 200)] {
        let x = random(&mut r, n * k, -1.0, 1.0);
        let p = random(&mut r, m * k, -1.0, 1.0);
        let dy = random(&mut r, n * m, -1.0, 1.0);
        let a = Arena::new(
            &ctx,
            &[
                (&x, n * k),
                (&p, m * k),
                (&dy, n * m),
                (&[], n * m),
                (&[], n * k),
                (&[], m * k),
                (&[], n * m),
            ],
        );
        run(
            &ctx,
            &[
                matmul_t(&ctx, a.view(0), a.view(1), a.view(3), n, m, k).unwrap(),
                matmul_nn(&ctx, a.view(2), a.view(1), a.view(4), n, m, k).unwrap(),
                matmul_tn(&ctx, a.view(2), a.view(0), a.view(5), n, m, k).unwrap(),
                // dy stands for the frozen product y.
                matmul_t_add(&ctx, a.view(2), a.view(0), a.view(1), a.view(6), n, m, k).unwrap(),
            ],
        );
        let t = product(n, m, k, |i, kk| x[i * k + kk], |kk, j| p[j * k + kk]);
        let nn = product(n, k, m, |i, kk| dy[i * m + kk], |kk, j| p[kk * k + j]);
        let tn = product(m, k, n, |i, kk| dy[kk * m + i], |kk, j| x[kk * k + j]);
        let what = format!("(N {n}, r {m}, k {k})");
        check(
            &read(&ctx, a.view(3), n * m),
            &t,
            1e-5,
            &format!("matmul_t {what}"),
        );
        check(
            &read(&ctx, a.view(4), n * k),
            &nn,
            1e-5,
            &format!("matmul_nn {what}"),
        );
        check(
            &read(&ctx, a.view(5), m * k),
            &tn,
            1e-5,
            &format!("matmul_tn {what}"),
        );
        let t_add: Vec<f32> = t.iter().zip(&dy).map(|(a, b)| a + b).collect();
        let what = format!("matmul_t_add {what}");
        check(&read(&ctx, a.view(6), n * m), &t_add, 1e-5, &what);
    }
}

#[test]
fn elementwise_ops_match_cpu() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(5);
    let n = 1000;
    let a = random(&mut r, n, -6.0, 6.0);
    let b = random(&mut r, n, -2.0, 2.0);
    let c = random(&mut r, n, -2.0, 2.0);
    let ar = Arena::new(
        &ctx,
        &[
            (&a, n),
            (&b, n),
            (&c, n),
            (&[], n),
            (&[], n),
            (&[], n),
            (&[], n),
        ],
    );
    let v = |i| ar.view(i);
    run(&ctx, &[add(&ctx, v(0), v(1), v(3), n).unwrap()]);
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_eq!(read(&ctx, v(3), n), want, "add");
    run(
        &ctx,
        &[add_scaled(&ctx, v(0), v(1), -0.37, v(3), n).unwrap()],
    );
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + -0.37 * y).collect();
    check(&read(&ctx, v(3), n), &want, 1e-6, "add_scaled");
    run(&ctx, &[scale(&ctx, v(0), 1.7, v(3), n).unwrap()]);
    let want: Vec<f32> = a.iter().map(|x| 1.7 * x).collect();
    assert_eq!(read(&ctx, v(3), n), want, "scale");

    for act in [Activation::Silu, Activation::GeluTanh] {
        run(
            &ctx,
            &[
                gated(&ctx, v(0), v(1), v(3), n, act).unwrap(),
                gated_back(&ctx, v(0), v(1), v(2), v(4), v(5), n, act).unwrap(),
            ],
        );
        let mut h = vec![0.0; n];
        cpu::gated_forward(&a, &b, act, &mut h);
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        cpu::gated_backward(&a, &b, &c, act, &mut dg, &mut du);
        check(&read(&ctx, v(3), n), &h, 2e-6, &format!("gated {act:?}"));
        check(
            &read(&ctx, v(4), n),
            &dg,
            2e-6,
            &format!("gated_back dg {act:?}"),
        );
        check(
            &read(&ctx, v(5), n),
            &du,
            2e-6,
            &format!("gated_back du {act:?}"),
        );
    }
}

#[test]
fn dropout_mask_is_the_cpu_mask_bit_for_bit() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(6);
    let n = 5003;
    let x = random(&mut r, n, -2.0, 2.0);
    let ar = Arena::new(&ctx, &[(&x, n), (&[], n)]);
    let step = ctx.uniform(&TrainStepParams::default(), "step");
    let d = dropout(&ctx, ar.view(0), ar.view(1), n, 0.3, 5, &step).unwrap();
    // One recording, replayed with new seeds (high bits set, as real seeds are).
    for seed in [0u64, 0xDEAD_BEEF_0123_4567, u64::MAX] {
        let sp = TrainStepParams::new(seed, 1.0);
        ctx.queue.write_buffer(&step, 0, bytemuck::bytes_of(&sp));
        run(&ctx, std::slice::from_ref(&d));
        let mut want = vec![0.0; n];
        cpu::dropout(&x, 0.3, seed, 5, &mut want);
        let got = read(&ctx, ar.view(1), n);
        let same = got
            .iter()
            .zip(&want)
            .all(|(g, w)| g.to_bits() == w.to_bits());
        assert!(same, "dropout seed {seed:#x}: masks differ");
        let dropped = got.iter().filter(|&&v| v == 0.0).count();
        eprintln!("dropout seed {seed:#x}: bit-identical, {dropped} of {n} dropped");
    }
}

#[test]
fn rms_norm_forward_and_backward_match_cpu_per_row_and_per_head() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(7);
    // (groups, n): whole rows, and per-head groups (5 tokens × 3 heads of 64).
    for (g, n) in [(7, 200), (15, 64), (2, 576)] {
        let x = random(&mut r, g * n, -2.0, 2.0);
        let dy = random(&mut r, g * n, -1.0, 1.0);
        let w = random(&mut r, n, 0.5, 1.5);
        let wb = upload(&ctx, &w);
        let ar = Arena::new(
            &ctx,
            &[(&x, g * n), (&dy, g * n), (&[], g * n), (&[], g * n)],
        );
        run(
            &ctx,
            &[
                rms_norm(&ctx, ar.view(0), &wb, ar.view(2), (g, n), 1e-6).unwrap(),
                rms_norm_back(&ctx, ar.view(0), ar.view(1), &wb, ar.view(3), (g, n), 1e-6).unwrap(),
            ],
        );
        let mut y = vec![0.0; g * n];
        cpu::rms_norm_forward(&x, &w, 1e-6, &mut y);
        let mut dx = vec![0.0; g * n];
        cpu::rms_norm_backward(&x, &dy, &w, 1e-6, &mut dx);
        check(
            &read(&ctx, ar.view(2), g * n),
            &y,
            1e-5,
            &format!("rms_norm ({g}, {n})"),
        );
        check(
            &read(&ctx, ar.view(3), g * n),
            &dx,
            1e-5,
            &format!("rms_norm_back ({g}, {n})"),
        );
    }
}

#[test]
fn rope_forward_and_backward_match_cpu_for_both_kinds_and_partial_dims() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(8);
    let (seq, heads, head_dim) = (20, 3, 64);
    let n_tok = 2 * seq;
    // Two packed rows: positions restart at each segment.
    let positions: Vec<u32> = (0..n_tok)
        .map(|i| {
            let t = i % seq;
            if i < seq || t < 7 {
                t as u32
            } else {
                (t - 7) as u32
            }
        })
        .collect();
    let pb = upload_u32(&ctx, &positions);
    for kind in [RopeKind::Adjacent, RopeKind::Halves] {
        for dims in [64, 32] {
            let rp = Rope {
                kind,
                base: 10000.0,
                dims,
            };
            let tb = upload(&ctx, &rope_table(&rp, seq));
            let cpu_table = cpu::rope_table(&rp, seq);
            let len = n_tok * heads * head_dim;
            let x = random(&mut r, len, -1.0, 1.0);
            let ar = Arena::new(&ctx, &[(&x, len), (&[], len), (&[], len)]);
            let shape = (n_tok, heads, head_dim);
            run(
                &ctx,
                &[
                    rope(&ctx, ar.view(0), ar.view(1), &pb, &tb, shape, &rp, 1.0).unwrap(),
                    rope(&ctx, ar.view(0), ar.view(2), &pb, &tb, shape, &rp, -1.0).unwrap(),
                ],
            );
            for (sign, out) in [(1.0, 1), (-1.0, 2)] {
                let mut want = vec![0.0; len];
                cpu::rope_apply(&x, &positions, head_dim, &rp, &cpu_table, sign, &mut want);
                let what = format!("rope {kind:?} dims {dims} sign {sign}");
                check(&read(&ctx, ar.view(out), len), &want, 1e-6, &what);
            }
        }
    }
}

/// One attention case: the forward and the backward against the CPU.
fn check_attention(
    ctx: &GpuContext,
    batch: usize,
    seq: usize,
    seg_start: &[u32],
    geom: AttnGeom,
    seed: u64,
) {
    let mut r = rng(seed);
    let n = batch * seq;
    let (qd, kvd) = (geom.n_head * geom.head_dim, geom.n_kv_head * geom.head_dim);
    let q = random(&mut r, n * qd, -1.5, 1.5);
    let k = random(&mut r, n * kvd, -1.5, 1.5);
    let v = random(&mut r, n * kvd, -1.0, 1.0);
    let d_o = random(&mut r, n * qd, -1.0, 1.0);
    let nh = n * geom.n_head;
    let ar = Arena::new(
        ctx,
        &[
            (&q, n * qd),
            (&k, n * kvd),
            (&v, n * kvd),
            (&[], n * qd),
            (&[], nh),
            (&d_o, n * qd),
            (&[], n * qd),
            (&[], n * kvd),
            (&[], n * kvd),
        ],
    );
    let sb = upload_u32(ctx, seg_start);
    let rows = PackedRows {
        batch,
        seq,
        seg_start: &sb,
    };
    let saved = AttnSavedViews {
        q: ar.view(0),
        k: ar.view(1),
        v: ar.view(2),
        o: ar.view(3),
        lse: ar.view(4),
    };
    let mut d = vec![
        attention_forward(
            ctx, saved.q, saved.k, saved.v, saved.o, saved.lse, &rows, &geom,
        )
        .unwrap(),
    ];
    d.extend(
        attention_backward(
            ctx,
            &saved,
            ar.view(5),
            ar.view(6),
            ar.view(7),
            ar.view(8),
            &rows,
            &geom,
        )
        .unwrap(),
    );
    run(ctx, &d);

    let cpu_rows = cpu_attn::Rows {
        batch,
        seq,
        seg_start,
    };
    let (mut o, mut lse) = (vec![0.0; n * qd], vec![0.0; nh]);
    cpu_attn::attention_forward(&q, &k, &v, &cpu_rows, &geom, &mut o, &mut lse);
    let (mut dq, mut dk, mut dv) = (vec![0.0; n * qd], vec![0.0; n * kvd], vec![0.0; n * kvd]);
    let cs = cpu_attn::AttnSaved {
        q: &q,
        k: &k,
        v: &v,
        o: &o,
        lse: &lse,
    };
    cpu_attn::attention_backward(&cs, &d_o, &cpu_rows, &geom, &mut dq, &mut dk, &mut dv);
    let what = format!(
        "batch {batch} seq {seq} heads {}/{} d {} window {:?}",
        geom.n_head, geom.n_kv_head, geom.head_dim, geom.window
    );
    check(
        &read(ctx, ar.view(3), n * qd),
        &o,
        1e-5,
        &format!("attention o {what}"),
    );
    check(
        &read(ctx, ar.view(4), nh),
        &lse,
        1e-5,
        &format!("attention lse {what}"),
    );
    check(
        &read(ctx, ar.view(6), n * qd),
        &dq,
        1e-4,
        &format!("attention dq {what}"),
    );
    check(
        &read(ctx, ar.view(7), n * kvd),
        &dk,
        1e-4,
        &format!("attention dk {what}"),
    );
    check(
        &read(ctx, ar.view(8), n * kvd),
        &dv,
        1e-4,
        &format!("attention dv {what}"),
    );
}

#[test]
fn attention_matches_cpu_with_gqa_windows_and_packed_segments() {
    let Some(ctx) = testing::context() else {
        return;
    };
    // Row 0 packs two examples (the second from index 30), row 1 one.
    let seq = 75;
    let seg: Vec<u32> = (0..2 * seq)
        .map(|i| {
            let t = i % seq;
            if i < seq && t >= 30 { 30 } else { 0 }
        })
        .collect();
    let geom = |n_head, n_kv_head, head_dim: usize, window| AttnGeom {
        n_head,
        n_kv_head,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
        window,
        sink: 0,
    };
    check_attention(&ctx, 2, seq, &seg, geom(4, 2, 16, None), 20);
    check_attention(&ctx, 2, seq, &seg, geom(3, 1, 8, Some(20)), 21);
    // A head wider than the 64 invocations, one row, no packing.
    check_attention(&ctx, 1, seq, &seg[seq..], geom(2, 2, 80, Some(100)), 22);
}

#[test]
fn loss_head_matches_cpu_in_chunks_with_a_split_output_matrix() {
    for ctx in [testing::context(), testing::context_small_bindings()] {
        let Some(ctx) = ctx else {
            return;
        };
        let mut r = rng(9);
        let (ty, vocab, c, n, chunk) = (GgmlType::Q8_0, 300, 64, 37, 16);
        let data = quantized(&mut r, ty, vocab, c);
        let qm = QMatrix::new(ty, vocab, c, &data).unwrap();
        let q = upload_quant(&ctx, ty, vocab, c, &data);
        let h = random(&mut r, n * c, -2.0, 2.0);
        // Tokens 16..32 (the second chunk) have no targets, nor do a few others.
        let targets: Vec<u32> = (0..n)
            .map(|i| {
                if (16..32).contains(&i) || i % 5 == 3 {
                    u32::MAX
                } else {
                    r.random_range(0..vocab as u32)
                }
            })
            .collect();
        let tb = upload_u32(&ctx, &targets);
        let scale = 0.37;
        let step = ctx.uniform(&TrainStepParams::new(0, scale), "step");
        let scratch = ctx.storage((loss_scratch_len(n, chunk, vocab) * 4) as u64, "scratch");
        let ar = Arena::new(&ctx, &[(&h, n * c), (&[], n * c), (&[], 2)]);
        let d = loss_head(
            &ctx,
            ar.view(0),
            &q.quant_matrix(),
            &tb,
            &step,
            ar.view(1),
            ar.view(2),
            &scratch,
            n,
            chunk,
        )
        .unwrap();
        run(&ctx, &d);

        let mut logits = vec![0.0; chunk * vocab];
        let mut wblock = vec![0.0; cpu_loss::BLOCK.min(vocab) * c];
        let mut dx = vec![0.0; n * c];
        let (sum, count) = cpu_loss::loss_head(
            &h,
            &qm,
            &targets,
            scale,
            chunk,
            &mut logits,
            &mut wblock,
            &mut dx,
            1,
        );
        let what = format!("loss_head parts {}", q.parts());
        let got = read(&ctx, ar.view(1), n * c);
        check(&got, &dx, 1e-5, &format!("{what} dx"));
        // As on the CPU, a row without a target gets exactly no gradient.
        for (i, _) in targets.iter().enumerate().filter(|(_, t)| **t == u32::MAX) {
            assert!(
                got[i * c..(i + 1) * c].iter().all(|&v| v == 0.0),
                "{what}: row {i} has no target but a gradient"
            );
        }
        let loss = read(&ctx, ar.view(2), 2);
        assert_eq!(loss[1], count as f32, "{what}: target count");
        check(&loss[..1], &[sum as f32], 1e-5, &format!("{what} Σ NLL"));
    }
}

#[test]
fn adamw_matches_the_cpu_optimizer_over_two_steps() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(12);
    let n = 1000;
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let p0 = random(&mut r, n, -1.0, 1.0);
    let grads = [random(&mut r, n, -1.0, 1.0), random(&mut r, n, -0.1, 0.1)];
    let zeros = vec![0.0; n];
    let ar = Arena::new(&ctx, &[(&p0, n), (&grads[0], n), (&zeros, n), (&zeros, n)]);
    let hyper = ctx.uniform(&AdamWHyper::default(), "hyper");
    let d = adamw(
        &ctx,
        ar.view(0),
        ar.view(1),
        ar.view(2),
        ar.view(3),
        n,
        &hyper,
    )
    .unwrap();
    let mut state = AdamWState::new(&[n]);
    let mut p = p0.clone();
    for (t, g) in grads.iter().enumerate() {
        let lr = 0.01;
        ctx.queue.write_buffer(
            &ar.buffer,
            ar.offsets[1] as u64 * 4,
            bytemuck::cast_slice(g),
        );
        let hp = AdamWHyper::new(&cfg, lr, t as u64 + 1);
        ctx.queue.write_buffer(&hyper, 0, bytemuck::bytes_of(&hp));
        run(&ctx, std::slice::from_ref(&d));
        state.step(&cfg, &mut [&mut p], &[g], &[lr]);
        let what = format!("adamw step {}", t + 1);
        check(
            &read(&ctx, ar.view(0), n),
            &p,
            1e-6,
            &format!("{what} param"),
        );
        check(
            &read(&ctx, ar.view(2), n),
            &state.m[0],
            1e-6,
            &format!("{what} m"),
        );
        check(
            &read(&ctx, ar.view(3), n),
            &state.v[0],
            1e-6,
            &format!("{what} v"),
        );
    }
}
