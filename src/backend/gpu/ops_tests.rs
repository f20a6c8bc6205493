//! The GPU kernels against the CPU ops on random inputs, with sizes that are
//! not multiples of the workgroup sizes. Skipped where no GPU opens.

use super::*;
use crate::backend::cpu::{attention as cpu_attention, ops as cpu};
use crate::backend::gpu::testing;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn random(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn upload(ctx: &GpuContext, v: &[f32]) -> Buffer {
    ctx.upload(bytemuck::cast_slice(v), "test input")
}

fn upload_u32(ctx: &GpuContext, v: &[u32]) -> Buffer {
    ctx.upload(bytemuck::cast_slice(v), "test input")
}

fn run(ctx: &GpuContext, dispatches: &[Dispatch]) {
    let mut enc = ctx.encoder();
    GpuContext::record(&mut enc, dispatches);
    ctx.submit_and_wait(enc).unwrap();
}

fn read_u32(ctx: &GpuContext, buf: &Buffer, n: usize) -> Vec<u32> {
    let bytes = ctx
        .submit_and_read(ctx.encoder(), buf, 0, n as u64 * 4)
        .unwrap();
    bytemuck::pod_collect_to_vec(&bytes)
}

fn step_uniform(ctx: &GpuContext, pos0: usize, n_tok: usize) -> Buffer {
    ctx.uniform(
        &StepParams {
            pos0: pos0 as u32,
            n_tok: n_tok as u32,
            _pad: [0; 2],
        },
        "step",
    )
}

fn write_step(ctx: &GpuContext, step: &Buffer, pos0: usize, n_tok: usize) {
    let p = StepParams {
        pos0: pos0 as u32,
        n_tok: n_tok as u32,
        _pad: [0; 2],
    };
    ctx.queue.write_buffer(step, 0, bytemuck::bytes_of(&p));
}

/// `|got − want| ≤ tol · max(1, |want|)` element-wise.
#[track_caller]
fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}: element {i}: gpu {g} vs cpu {w}"
        );
    }
}

#[test]
fn rms_norm_matches_cpu() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(1);
    for (rows, n) in [(5, 576), (7, 64), (1, 1000)] {
        let x = random(&mut r, rows * n, -2.0, 2.0);
        let w = random(&mut r, n, 0.5, 1.5);
        let mut want = x.clone();
        cpu::rms_norm(&mut want, &w, 1e-6);
        let (xb, wb) = (upload(&ctx, &x), upload(&ctx, &w));
        let yb = ctx.storage((rows * n * 4) as u64, "y");
        let d = rms_norm(&ctx, &xb, &wb, &yb, rows, n, 1e-6).unwrap();
        run(&ctx, &[d]);
        assert_close(
            &ctx.read_f32(&yb, 0, rows * n).unwrap(),
            &want,
            1e-5,
            "rms_norm",
        );
        // The input is untouched; in place gives the same.
        assert_eq!(ctx.read_f32(&xb, 0, rows * n).unwrap(), x);
        let d = rms_norm_inplace(&ctx, &xb, &wb, rows, n, 1e-6).unwrap();
        run(&ctx, &[d]);
        assert_close(
            &ctx.read_f32(&xb, 0, rows * n).unwrap(),
            &want,
            1e-5,
            "in place",
        );
    }
}

#[test]
fn rope_matches_cpu_for_both_kinds_partial_dims_and_reused_dispatches() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(2);
    let (n_tok, n_heads, head_dim) = (5, 3, 64);
    for kind in [RopeKind::Adjacent, RopeKind::Halves] {
        for dims in [64, 32] {
            let rope_spec = Rope {
                kind,
                base: 10000.0,
                dims,
            };
            let table = upload(&ctx, &rope_table(&rope_spec, 40));
            let step = step_uniform(&ctx, 0, n_tok);
            let xb = ctx.storage((n_tok * n_heads * head_dim * 4) as u64, "x");
            let d = rope(
                &ctx, &xb, &table, &step, n_tok, n_heads, head_dim, kind, dims,
            )
            .unwrap();
            // One recording, run at two positions, as a generation loop does.
            for pos0 in [7, 31] {
                let x = random(&mut r, n_tok * n_heads * head_dim, -1.0, 1.0);
                ctx.queue.write_buffer(&xb, 0, bytemuck::cast_slice(&x));
                write_step(&ctx, &step, pos0, n_tok);
                run(&ctx, std::slice::from_ref(&d));
                let mut want = x.clone();
                cpu::rope(&mut want, n_tok, head_dim, pos0, &rope_spec);
                let got = ctx.read_f32(&xb, 0, x.len()).unwrap();
                assert_close(
                    &got,
                    &want,
                    1e-5,
                    &format!("{kind:?} dims {dims} pos0 {pos0}"),
                );
            }
        }
    }
}

#[test]
fn rope_table_is_cos_sin_per_position() {
    let r = Rope {
        kind: RopeKind::Adjacent,
        base: 10000.0,
        dims: 4,
    };
    let t = rope_table(&r, 3);
    assert_eq!(t.len(), 3 * 2 * 2);
    assert_eq!(&t[..4], &[1.0, 0.0, 1.0, 0.0]);
    // Position 2, pair 1: angle 2 · 10000^(−1/2) = 0.02.
    assert!((t[10] - 0.02f32.cos()).abs() < 1e-7 && (t[11] - 0.02f32.sin()).abs() < 1e-7);
}

#[test]
fn add_rms_norm_is_residual_add_then_norm_with_optional_post_norm() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(11);
    for (rows, n, post) in [(3, 576, false), (4, 640, true), (1, 100, true)] {
        let x = random(&mut r, rows * n, -2.0, 2.0);
        let y = random(&mut r, rows * n, -3.0, 3.0);
        let w = random(&mut r, n, 0.5, 1.5);
        let w2 = random(&mut r, n, 0.5, 1.5);
        // The CPU decoder's order: post-norm the block output, add, norm.
        let mut branch = y.clone();
        if post {
            cpu::rms_norm(&mut branch, &w2, 1e-6);
        }
        let mut want_x = x.clone();
        cpu::add_assign(&mut want_x, &branch);
        let mut want_h = want_x.clone();
        cpu::rms_norm(&mut want_h, &w, 1e-6);
        let (xb, yb, wb, w2b) = (
            upload(&ctx, &x),
            upload(&ctx, &y),
            upload(&ctx, &w),
            upload(&ctx, &w2),
        );
        let hb = ctx.storage((rows * n * 4) as u64, "h");
        let d = add_rms_norm(
            &ctx,
            &xb,
            &yb,
            post.then_some(&w2b),
            &wb,
            &hb,
            rows,
            n,
            1e-6,
        )
        .unwrap();
        run(&ctx, &[d]);
        let what = format!("rows {rows} n {n} post {post}");
        assert_close(
            &ctx.read_f32(&xb, 0, rows * n).unwrap(),
            &want_x,
            1e-5,
            &what,
        );
        assert_close(
            &ctx.read_f32(&hb, 0, rows * n).unwrap(),
            &want_h,
            1e-5,
            &what,
        );
        // The block output is only read.
        assert_eq!(ctx.read_f32(&yb, 0, rows * n).unwrap(), y);
    }
}

#[test]
fn rope_kv_rotates_queries_and_appends_rotated_keys_and_values() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(12);
    let (n_tok, n_head, n_kv, d, cap, pos0) = (3, 6, 2, 64, 12, 4);
    for kind in [RopeKind::Adjacent, RopeKind::Halves] {
        for dims in [64, 32] {
            let spec = Rope {
                kind,
                base: 10000.0,
                dims,
            };
            let q = random(&mut r, n_tok * n_head * d, -1.0, 1.0);
            let k = random(&mut r, n_tok * n_kv * d, -1.0, 1.0);
            let v = random(&mut r, n_tok * n_kv * d, -1.0, 1.0);
            let kc = random(&mut r, cap * n_kv * d, -1.0, 1.0);
            let vc = random(&mut r, cap * n_kv * d, -1.0, 1.0);
            let (qb, kb, vb) = (upload(&ctx, &q), upload(&ctx, &k), upload(&ctx, &v));
            let (kcb, vcb) = (upload(&ctx, &kc), upload(&ctx, &vc));
            let table = upload(&ctx, &rope_table(&spec, cap));
            let step = step_uniform(&ctx, pos0, n_tok);
            let disp = rope_kv(
                &ctx,
                &qb,
                &kb,
                &vb,
                &kcb,
                &vcb,
                &table,
                &step,
                n_tok,
                (n_head, n_kv),
                d,
                kind,
                dims,
                KvFormat::F32,
            )
            .unwrap();
            run(&ctx, &[disp]);
            let what = format!("{kind:?} dims {dims}");
            let mut want_q = q.clone();
            cpu::rope(&mut want_q, n_tok, d, pos0, &spec);
            assert_close(
                &ctx.read_f32(&qb, 0, q.len()).unwrap(),
                &want_q,
                1e-5,
                &what,
            );
            let row = n_kv * d;
            let mut rk = k.clone();
            cpu::rope(&mut rk, n_tok, d, pos0, &spec);
            let mut want_kc = kc.clone();
            want_kc[pos0 * row..(pos0 + n_tok) * row].copy_from_slice(&rk);
            let mut want_vc = vc.clone();
            want_vc[pos0 * row..(pos0 + n_tok) * row].copy_from_slice(&v);
            assert_close(
                &ctx.read_f32(&kcb, 0, kc.len()).unwrap(),
                &want_kc,
                1e-5,
                &what,
            );
            assert_eq!(ctx.read_f32(&vcb, 0, vc.len()).unwrap(), want_vc, "{what}");
            // This step's keys are only read.
            assert_eq!(ctx.read_f32(&kb, 0, k.len()).unwrap(), k);
        }
    }
}

#[test]
fn f16_kv_cache_stores_rounded_keys_and_values_and_attends_over_them() {
    let Some(ctx) = testing::context() else {
        return;
    };
    if !ctx.has_f16() {
        eprintln!("skipping: {} has no shader-f16", ctx.adapter().name);
        return;
    }
    let mut r = rng(13);
    let (n_head, n_kv, d, n_tok, pos0, cap) = (4, 2, 64, 5, 30, 40);
    let spec = Rope {
        kind: RopeKind::Halves,
        base: 10000.0,
        dims: d,
    };
    let round =
        |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect() };
    let row = n_kv * d;
    // Earlier tokens already in the (f16) cache; this step's through rope_kv.
    let old_k = round(&random(&mut r, cap * row, -1.0, 1.0));
    let old_v = round(&random(&mut r, cap * row, -1.0, 1.0));
    let to16 = |v: &[f32]| -> Vec<u16> {
        v.iter()
            .map(|&x| half::f16::from_f32(x).to_bits())
            .collect()
    };
    let kcb = ctx.upload(bytemuck::cast_slice(&to16(&old_k)), "k16");
    let vcb = ctx.upload(bytemuck::cast_slice(&to16(&old_v)), "v16");
    let q = random(&mut r, n_tok * n_head * d, -1.0, 1.0);
    let k = random(&mut r, n_tok * row, -1.0, 1.0);
    let v = random(&mut r, n_tok * row, -1.0, 1.0);
    let (qb, kb, vb) = (upload(&ctx, &q), upload(&ctx, &k), upload(&ctx, &v));
    let table = upload(&ctx, &rope_table(&spec, cap));
    let step = step_uniform(&ctx, pos0, n_tok);
    let s = AttnShape {
        n_head,
        n_kv_head: n_kv,
        head_dim: d,
        scale: 0.125,
        window: Some(20),
    };
    let ob = ctx.storage((q.len() * 4) as u64, "out");
    let f16 = KvFormat::F16;
    let store = rope_kv(
        &ctx,
        &qb,
        &kb,
        &vb,
        &kcb,
        &vcb,
        &table,
        &step,
        n_tok,
        (n_head, n_kv),
        d,
        spec.kind,
        d,
        f16,
    )
    .unwrap();
    let attend = attention(&ctx, &qb, &kcb, &vcb, &ob, &step, &s, n_tok, f16).unwrap();
    run(&ctx, &[store, attend]);
    // The CPU on the same values: keys rotated, then everything rounded to f16.
    let mut rq = q.clone();
    cpu::rope(&mut rq, n_tok, d, pos0, &spec);
    let mut rk = k.clone();
    cpu::rope(&mut rk, n_tok, d, pos0, &spec);
    let (mut ck, mut cv) = (old_k.clone(), old_v.clone());
    ck[pos0 * row..(pos0 + n_tok) * row].copy_from_slice(&round(&rk));
    cv[pos0 * row..(pos0 + n_tok) * row].copy_from_slice(&round(&v));
    let stored = ctx
        .submit_and_read(ctx.encoder(), &kcb, 0, (cap * row * 2) as u64)
        .unwrap();
    let stored: Vec<f32> = bytemuck::cast_slice::<u8, u16>(&stored)
        .iter()
        .map(|&b| half::f16::from_bits(b).to_f32())
        .collect();
    // Rounding the GPU's and the CPU's f32 rotations may differ by one f16 step.
    assert_close(&stored, &ck, 1e-3, "f16 keys");
    let mut want = vec![0.0; q.len()];
    cpu_attention::attention(&rq, &ck, &cv, pos0, &s, &mut want);
    assert_close(
        &ctx.read_f32(&ob, 0, q.len()).unwrap(),
        &want,
        1e-3,
        "attention over f16 keys and values",
    );
}

/// One attention case: random q and a cache of `pos0 + n_tok` (+ spare) rows.
fn attention_case(
    ctx: &GpuContext,
    seed: u64,
    s: AttnShape,
    pos0: usize,
    n_tok: usize,
    q_scale: f32,
) {
    let mut r = rng(seed);
    let d = s.head_dim;
    let cap = pos0 + n_tok + 3;
    let q = random(&mut r, n_tok * s.n_head * d, -q_scale, q_scale);
    let k = random(&mut r, cap * s.n_kv_head * d, -1.0, 1.0);
    let v = random(&mut r, cap * s.n_kv_head * d, -1.0, 1.0);
    let mut want = vec![0.0; q.len()];
    cpu_attention::attention(&q, &k, &v, pos0, &s, &mut want);
    let (qb, kb, vb) = (upload(ctx, &q), upload(ctx, &k), upload(ctx, &v));
    let ob = ctx.storage((q.len() * 4) as u64, "out");
    let step = step_uniform(ctx, pos0, n_tok);
    let disp = attention(ctx, &qb, &kb, &vb, &ob, &step, &s, n_tok, KvFormat::F32).unwrap();
    run(ctx, &[disp]);
    let got = ctx.read_f32(&ob, 0, q.len()).unwrap();
    assert_close(
        &got,
        &want,
        2e-5,
        &format!("{s:?} pos0 {pos0} n_tok {n_tok}"),
    );
}

#[test]
fn attention_matches_cpu_with_gqa_windows_and_offsets() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let llama = |window| AttnShape {
        n_head: 6,
        n_kv_head: 2,
        head_dim: 64,
        scale: 1.0 / 8.0,
        window,
    };
    let gemma = |window| AttnShape {
        n_head: 4,
        n_kv_head: 1,
        head_dim: 256,
        scale: 1.0 / 16.0,
        window,
    };
    // Generation: one query over a cache holding earlier tokens.
    attention_case(&ctx, 10, llama(None), 70, 1, 4.0);
    attention_case(&ctx, 11, llama(Some(16)), 70, 1, 4.0);
    // Prefill of a chunk after earlier tokens, with and without a window.
    attention_case(&ctx, 12, llama(None), 29, 37, 4.0);
    attention_case(&ctx, 13, llama(Some(16)), 5, 37, 4.0);
    attention_case(&ctx, 14, gemma(None), 0, 5, 6.0);
    attention_case(&ctx, 15, gemma(Some(8)), 20, 3, 6.0);
    // An odd head size and a window wider than the context.
    let odd = AttnShape {
        n_head: 3,
        n_kv_head: 3,
        head_dim: 40,
        scale: 0.2,
        window: Some(1000),
    };
    attention_case(&ctx, 16, odd, 3, 9, 3.0);
}

#[test]
fn attention_over_more_than_a_thousand_keys() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let s = |window| AttnShape {
        n_head: 2,
        n_kv_head: 1,
        head_dim: 64,
        scale: 1.0 / 8.0,
        window,
    };
    attention_case(&ctx, 20, s(None), 1100, 2, 4.0);
    attention_case(&ctx, 21, s(Some(700)), 1200, 1, 4.0);
}

#[test]
fn attention_refuses_shapes_it_cannot_run() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let b = ctx.storage(1 << 16, "b");
    let step = step_uniform(&ctx, 0, 1);
    let s = AttnShape {
        n_head: 2,
        n_kv_head: 1,
        head_dim: 512,
        scale: 1.0,
        window: None,
    };
    assert!(attention(&ctx, &b, &b, &b, &b, &step, &s, 1, KvFormat::F32).is_err());
    let s = AttnShape {
        n_head: 3,
        n_kv_head: 2,
        head_dim: 64,
        ..s
    };
    assert!(attention(&ctx, &b, &b, &b, &b, &step, &s, 1, KvFormat::F32).is_err());
}

#[test]
fn gated_activations_and_add_match_cpu() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(4);
    let n = 1000;
    for act in [Activation::Silu, Activation::GeluTanh] {
        let mut gate = random(&mut r, n, -6.0, 6.0);
        // Large arguments must not give NaN.
        gate[0] = 60.0;
        gate[1] = -60.0;
        let up = random(&mut r, n, -2.0, 2.0);
        let (gb, ub) = (upload(&ctx, &gate), upload(&ctx, &up));
        let d = gated_activation(&ctx, &gb, &ub, n, act).unwrap();
        run(&ctx, &[d]);
        let mut want = gate.clone();
        cpu::gated_activation(&mut want, &up, act);
        assert_close(
            &ctx.read_f32(&gb, 0, n).unwrap(),
            &want,
            1e-5,
            &format!("{act:?}"),
        );
    }
    let x = random(&mut r, n, -1.0, 1.0);
    let y = random(&mut r, n, -1.0, 1.0);
    let (xb, yb) = (upload(&ctx, &x), upload(&ctx, &y));
    run(&ctx, &[add(&ctx, &xb, &yb, n).unwrap()]);
    let mut want = x.clone();
    cpu::add_assign(&mut want, &y);
    assert_eq!(ctx.read_f32(&xb, 0, n).unwrap(), want);
}

#[test]
fn add_covers_more_than_65535_workgroups() {
    let Some(ctx) = testing::context() else {
        return;
    };
    // 65 535 · 256 + 1000 elements: the grid needs a second dimension.
    let n = 65_535 * 256 + 1000;
    let y: Vec<f32> = (0..n).map(|i| (i % 1009) as f32).collect();
    let yb = upload(&ctx, &y);
    let xb = ctx.storage((n * 4) as u64, "x");
    ctx.queue
        .write_buffer(&xb, ((n - 1) * 4) as u64, bytemuck::bytes_of(&1.0f32));
    run(&ctx, &[add(&ctx, &xb, &yb, n).unwrap()]);
    let head = ctx.read_f32(&xb, 0, 300).unwrap();
    assert_eq!(head, y[..300]);
    let tail_start = n - 3000;
    let mut want = y[tail_start..].to_vec();
    *want.last_mut().unwrap() += 1.0;
    assert_eq!(ctx.read_f32(&xb, tail_start, 3000).unwrap(), want);
}

#[test]
fn softmax_and_nll_match_cpu() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(5);
    let (rows, n) = (3, 1000);
    let x = random(&mut r, rows * n, -8.0, 8.0);
    let xb = upload(&ctx, &x);
    run(&ctx, &[softmax(&ctx, &xb, rows, n).unwrap()]);
    let want: Vec<f32> = x
        .chunks(n)
        .flat_map(|row| {
            let lse = cpu::log_sum_exp(row);
            row.iter().map(move |&v| (v as f64 - lse).exp() as f32)
        })
        .collect();
    let got = ctx.read_f32(&xb, 0, rows * n).unwrap();
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * w + 1e-9, "softmax {i}: {g} vs {w}");
    }

    let (rows, n_vocab, out_off) = (4, 5000, 2);
    let logits = random(&mut r, rows * n_vocab, -10.0, 10.0);
    // Targets are indexed like `out`: the first `out_off` belong to rows of
    // an earlier chunk (deliberately invalid ids here: they must not be read).
    let targets: Vec<u32> = (0..rows)
        .map(|_| r.random_range(0..n_vocab as u32))
        .collect();
    let padded: Vec<u32> = [u32::MAX; 2]
        .into_iter()
        .chain(targets.iter().copied())
        .collect();
    let (lb, tb) = (upload(&ctx, &logits), upload_u32(&ctx, &padded));
    let ob = ctx.storage(64, "nll");
    let d = nll(&ctx, &lb, &tb, &ob, out_off, rows, n_vocab).unwrap();
    run(&ctx, &[d]);
    let got = ctx.read_f32(&ob, 0, out_off + rows + 1).unwrap();
    assert_eq!(&got[..out_off], &[0.0; 2]);
    assert_eq!(got[out_off + rows], 0.0);
    for (row, (&t, &g)) in logits
        .chunks(n_vocab)
        .zip(targets.iter().zip(&got[out_off..]))
    {
        let want = (cpu::log_sum_exp(row) - row[t as usize] as f64) as f32;
        assert!(
            (g - want).abs() <= 1e-5 * want.abs().max(1.0),
            "nll {g} vs {want}"
        );
    }
}

#[test]
fn argmax_takes_the_first_of_ties_at_any_offset() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(6);
    let n = 3001;
    let mut logits = random(&mut r, 2 * n, -5.0, 5.0);
    // Row 1 has its maximum three times.
    for i in [n + 2900, n + 700, n + 1500] {
        logits[i] = 9.0;
    }
    logits[123] = 7.0;
    let lb = upload(&ctx, &logits);
    let ob = ctx.storage(16, "token");
    for (off, len, want) in [
        (0, n, 123),
        (n, n, 700),
        (n + 701, 5, crate::infer::argmax(&logits[n + 701..n + 706])),
        (n + 2000, 1001, 900),
        (7, 1, 0),
    ] {
        run(&ctx, &[argmax(&ctx, &lb, off, len, &ob).unwrap()]);
        assert_eq!(read_u32(&ctx, &ob, 1)[0], want, "off {off} n {len}");
    }
    // All equal: the first.
    let flat = upload(&ctx, &[2.5; 700]);
    run(&ctx, &[argmax(&ctx, &flat, 0, 700, &ob).unwrap()]);
    assert_eq!(read_u32(&ctx, &ob, 1)[0], 0);
}

/// Draws of the GPU sampler for each `(off, n, params)` of one logits buffer,
/// in one submission.
fn gpu_samples(
    ctx: &GpuContext,
    logits: &Buffer,
    cases: &[(usize, usize, SampleParams)],
) -> Vec<u32> {
    let outs: Vec<Buffer> = cases.iter().map(|_| ctx.storage(16, "token")).collect();
    let dispatches: Vec<Dispatch> = cases
        .iter()
        .zip(&outs)
        .map(|(&(off, n, p), out)| {
            let params = ctx.uniform(&p, "sample params");
            sample(ctx, logits, off, n, &params, out).unwrap()
        })
        .collect();
    let all = ctx.storage((cases.len() * 4) as u64, "tokens");
    let mut enc = ctx.encoder();
    GpuContext::record(&mut enc, &dispatches);
    for (i, out) in outs.iter().enumerate() {
        enc.copy_buffer_to_buffer(out, 0, &all, (i * 4) as u64, 4);
    }
    let bytes = ctx
        .submit_and_read(enc, &all, 0, (cases.len() * 4) as u64)
        .unwrap();
    bytemuck::pod_collect_to_vec(&bytes)
}

/// Whether the reference draw stays the same when `u` and `top_p` move a
/// little: f32 sums on the GPU may then decide either way.
fn far_from_boundaries(logits: &[f32], p: &SampleParams) -> bool {
    let t = sample_reference(logits, p);
    let d = 2e-4;
    [(-d, 0.0), (d, 0.0), (0.0, -d), (0.0, d)]
        .iter()
        .all(|&(du, dp)| {
            let q = SampleParams {
                u: (p.u + du).clamp(0.0, 0.999_999),
                top_p: if p.top_p < 1.0 { p.top_p + dp } else { p.top_p },
                ..*p
            };
            sample_reference(logits, &q) == t
        })
}

#[test]
fn sample_reference_follows_its_definition() {
    // Weights at temperature 1: e^0, e^-1, e^-2, e^-3 ∝ 0.64, 0.24, 0.09, 0.03.
    let logits = [1.0, 3.0, 0.0, 2.0];
    let p = |top_k, top_p, u| SampleParams {
        temperature: 1.0,
        top_k,
        top_p,
        u,
    };
    // top_p 0.8 keeps {3.0, 2.0}: in index order token 1 (0.73) then token 3.
    assert_eq!(sample_reference(&logits, &p(0, 0.8, 0.5)), 1);
    assert_eq!(sample_reference(&logits, &p(0, 0.8, 0.9)), 3);
    // top_k 3 keeps {3, 2, 1}; index order 0 (0.09), 1 (0.67), 3 (0.24).
    assert_eq!(sample_reference(&logits, &p(3, 1.0, 0.05)), 0);
    assert_eq!(sample_reference(&logits, &p(3, 1.0, 0.5)), 1);
    assert_eq!(sample_reference(&logits, &p(3, 1.0, 0.99)), 3);
    // Everything kept: u = 0 takes the first token; top_k 1 only the largest.
    assert_eq!(sample_reference(&logits, &p(0, 1.0, 0.0)), 0);
    assert_eq!(sample_reference(&logits, &p(1, 1.0, 0.99)), 1);
    // Ties at the top-k boundary are all kept.
    let tied = [5.0, 1.0, 5.0, 5.0];
    assert_eq!(sample_reference(&tied, &p(1, 1.0, 0.99)), 3);
}

#[test]
fn sample_top_k_one_and_tiny_top_p_are_argmax() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(7);
    let n = 5000;
    let logits = random(&mut r, 2 * n, -4.0, 4.0);
    let lb = upload(&ctx, &logits);
    let mut cases = Vec::new();
    let mut want = Vec::new();
    for i in 0..16 {
        let off = (i % 2) * n;
        let temperature = [0.1, 1.0, 3.0, 10.0][i % 4];
        let u = r.random_range(0.0..1.0);
        let p = if i < 8 {
            SampleParams {
                temperature,
                top_k: 1,
                top_p: 1.0,
                u,
            }
        } else {
            SampleParams {
                temperature,
                top_k: 0,
                top_p: 1e-6,
                u,
            }
        };
        cases.push((off, n, p));
        want.push(crate::infer::argmax(&logits[off..off + n]));
    }
    assert_eq!(gpu_samples(&ctx, &lb, &cases), want);
}

#[test]
fn sample_matches_the_reference() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(8);
    let mut logits = Vec::new();
    let mut cases = Vec::new();
    while cases.len() < 120 {
        let n = match cases.len() % 4 {
            0 => r.random_range(1..40),
            1 => r.random_range(40..300),
            _ => r.random_range(300..3000),
        };
        let spread = [1.0, 4.0, 12.0][cases.len() % 3];
        let mut row = random(&mut r, n, -spread, spread);
        if cases.len() % 5 == 0 {
            // Quantised values: many ties.
            row.iter_mut().for_each(|x| *x = x.round());
        }
        let p = SampleParams {
            temperature: [0.3, 0.7, 1.0, 1.8][cases.len() % 4],
            top_k: [0, 1, 5, 40, 200, 5000][r.random_range(0..6)],
            top_p: [1.0, 0.95, 0.5, 0.9, 0.2][r.random_range(0..5)],
            u: r.random_range(0.0..1.0),
        };
        if !far_from_boundaries(&row, &p) {
            continue;
        }
        cases.push((logits.len(), n, p));
        logits.extend_from_slice(&row);
    }
    let lb = upload(&ctx, &logits);
    let got = gpu_samples(&ctx, &lb, &cases);
    for (&(off, n, p), &g) in cases.iter().zip(&got) {
        let want = sample_reference(&logits[off..off + n], &p);
        assert_eq!(g, want, "n {n} {p:?}");
    }
}

#[test]
fn sample_top_k_matches_the_reference_on_both_sides_of_the_candidate_cap() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(11);
    let mut logits = Vec::new();
    let mut cases = Vec::new();
    // Odd values: ±0, subnormals, huge magnitudes, many ties.
    let odd = [-1e30, -3.5, -0.0, 0.0, 1e-40, -1e-40, 2.0, 7.25, 7.25];
    while cases.len() < 48 {
        let n = [4000, 1500, 30_000][r.random_range(0..3)];
        let row: Vec<f32> = match cases.len() % 4 {
            0 => random(&mut r, n, -8.0, 8.0),
            // Ties at the top-k boundary: about n / 9 tokens per value.
            1 => random(&mut r, n, -4.0, 4.0)
                .iter()
                .map(|x| x.round())
                .collect(),
            // (Fewer tokens: with thousands of equal weights every draw is
            // near a boundary.)
            2 => (0..n.min(4000))
                .map(|_| odd[r.random_range(0..odd.len())])
                .collect(),
            _ => random(&mut r, n, -30.0, 30.0),
        };
        // Around the candidate cap (1024) and far from it.
        let top_k = [1, 2, 40, 1023, 1024, 1025, 1400, 3][r.random_range(0..8)];
        let p = SampleParams {
            temperature: [0.5, 0.7, 1.3][r.random_range(0..3)],
            top_k,
            top_p: [1.0, 0.95, 0.6][r.random_range(0..3)],
            u: r.random_range(0.0..1.0),
        };
        if !far_from_boundaries(&row, &p) {
            continue;
        }
        cases.push((logits.len(), row.len(), p));
        logits.extend_from_slice(&row);
    }
    let lb = upload(&ctx, &logits);
    let got = gpu_samples(&ctx, &lb, &cases);
    for (&(off, n, p), &g) in cases.iter().zip(&got) {
        let want = sample_reference(&logits[off..off + n], &p);
        assert_eq!(g, want, "n {n} {p:?}");
    }
}

/// Whether the GPU's draw `g` is the reference's up to f32 rounding: `g` is
/// in the reference's kept set, and `u` lies within `du` of `g`'s interval of
/// the reference's index-order CDF (with hundreds of thousands of kept
/// tokens the intervals are narrower than the GPU's rounding of the sums).
fn draw_is_close(logits: &[f32], p: &SampleParams, g: u32, du: f64) -> bool {
    let (t, weight) = reference_threshold(logits, p);
    let kept = |x: f32| x.total_cmp(&t).is_ge();
    let g = g as usize;
    if g >= logits.len() || !kept(logits[g]) {
        return false;
    }
    let w: Vec<f64> = logits
        .iter()
        .map(|&x| if kept(x) { weight(x) } else { 0.0 })
        .collect();
    let total: f64 = w.iter().sum();
    let before: f64 = w[..g].iter().sum::<f64>() / total;
    let after = before + w[g] / total;
    let u = p.u as f64;
    before - du <= u && u <= after + du
}

/// Whether the reference's kept set stays the same when `top_p` moves a little.
fn threshold_is_stable(logits: &[f32], p: &SampleParams) -> bool {
    if p.top_p >= 1.0 {
        return true;
    }
    let t = reference_threshold(logits, p).0;
    [-1e-4, 1e-4].iter().all(|&d| {
        let q = SampleParams {
            top_p: p.top_p + d,
            ..*p
        };
        reference_threshold(logits, &q).0.to_bits() == t.to_bits()
    })
}

#[test]
fn sample_runs_over_a_large_vocabulary() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(9);
    let n = 262_144;
    let smooth = random(&mut r, n, -15.0, 15.0);
    // Quarter steps: 121 distinct values, so top-p thresholds fall between
    // large groups of tied tokens and do not hinge on rounding.
    let stepped: Vec<f32> = smooth.iter().map(|x| (x * 4.0).round() / 4.0).collect();
    let mut logits = smooth.clone();
    logits.extend_from_slice(&stepped);
    let lb = upload(&ctx, &logits);
    let mut cases = Vec::new();
    // Top-k keeps 40 tokens: the draw must be exactly the reference's.
    let p = loop {
        let p = SampleParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            u: r.random_range(0.0..1.0),
        };
        if far_from_boundaries(&smooth, &p) {
            break p;
        }
    };
    cases.push((0, n, p));
    // Large kept sets, ties at the top-k boundary.
    for (top_k, top_p) in [(0, 1.0), (0, 0.95), (5000, 0.8), (0, 0.3)] {
        let p = SampleParams {
            temperature: 0.8,
            top_k,
            top_p,
            u: r.random_range(0.0..1.0),
        };
        assert!(threshold_is_stable(&stepped, &p), "{p:?}");
        cases.push((n, n, p));
    }
    let got = gpu_samples(&ctx, &lb, &cases);
    assert_eq!(got[0], sample_reference(&smooth, &cases[0].2));
    for (&(_, _, p), &g) in cases.iter().zip(&got).skip(1) {
        assert!(
            draw_is_close(&stepped, &p, g, 1e-5),
            "{p:?}: gpu {g}, reference {}",
            sample_reference(&stepped, &p)
        );
    }
}

/// Timing of [`sample`] (not a check): `cargo test --lib sample_timing --
/// --ignored --nocapture`. Prints ms per dispatch, 20 dispatches per
/// submission, three submissions per case after a warm-up.
#[test]
#[ignore]
fn sample_timing() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut r = rng(10);
    for n in [49_152, 262_144] {
        let logits = random(&mut r, n, -15.0, 15.0);
        let lb = upload(&ctx, &logits);
        let out = ctx.storage(16, "token");
        for (top_k, top_p) in [(40, 0.95), (1000, 0.95), (0, 0.95)] {
            let p = SampleParams {
                temperature: 0.7,
                top_k,
                top_p,
                u: 0.37,
            };
            let params = ctx.uniform(&p, "sample params");
            let reps = 20;
            let ds: Vec<Dispatch> = (0..reps)
                .map(|_| sample(&ctx, &lb, 0, n, &params, &out).unwrap())
                .collect();
            run(&ctx, &ds[..1]);
            let times: Vec<String> = (0..3)
                .map(|_| {
                    let t = std::time::Instant::now();
                    run(&ctx, &ds);
                    format!("{:.3}", t.elapsed().as_secs_f64() * 1e3 / reps as f64)
                })
                .collect();
            println!(
                "sample n {n} top_k {top_k} top_p {top_p}: ms/dispatch {}",
                times.join(" ")
            );
        }
    }
}
