//! Whole training steps of tiny llama and gemma3 models with LoRA on every
//! target (dropout, B not zero) against the CPU executor: the loss, and
//! every parameter gradient, with the full plan, with every layer
//! recomputed, and with the frozen weights split over small bindings; and
//! resident steps (optimizer on the device) against the host trainer's
//! arithmetic (CPU gradients, `global_norm`, `clip_scale`, `AdamWState`).
//! Each prints its worst errors (`--nocapture`); skipped where no GPU opens.

use super::GpuStep;
use crate::backend::cpu::train::{CpuStep, case_step};
use crate::backend::gpu::train::GpuOptim;
use crate::backend::gpu::{GpuContext, testing};
use crate::graph::testing::{LoraCase, TinyBatch, inputs, lora_case, small_lora, tiny_batch};
use crate::graph::{Graph, MemoryPlan, StepInputs, plan};
use crate::model::tiny::Cfg;
use crate::quant::GgmlType;
use crate::train::optim::{AdamWConfig, AdamWState, clip_scale, global_norm};
use std::collections::BTreeSet;
use std::sync::Arc;

/// Runs `graph` on the GPU and checks it against the CPU's loss (relative
/// 1e-4) and gradients (1e-3 of each tensor's largest |grad|). Returns the
/// step (for more runs) and the worst (loss, gradient) errors.
fn check_gpu(
    ctx: &Arc<GpuContext>,
    s: &LoraCase,
    graph: Graph,
    scale: f32,
    want: &((f64, usize), Vec<Vec<f32>>),
    what: &str,
) -> (GpuStep, f64, f32) {
    let plan = MemoryPlan::new(&graph);
    let mut step = GpuStep::new(ctx.clone(), &s.model, graph, plan).unwrap();
    let (sum, count) = step.run(&inputs(&s.batch, scale), &s.params).unwrap();
    let ((want_sum, want_count), want_grads) = want;
    assert_eq!(count, *want_count, "{what}: target count");
    let loss_err = (sum - want_sum).abs() / want_sum.abs();
    assert!(loss_err < 1e-4, "{what}: loss {sum} vs cpu {want_sum}");
    let mut worst = (0.0f32, String::new());
    for (i, want) in want_grads.iter().enumerate() {
        let name = &s.graph.params[i].name;
        let got = step.grad(i).unwrap();
        let range = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(range > 0.0, "{what}: {name}: the cpu gradient is zero");
        for (j, (g, w)) in got.iter().zip(want).enumerate() {
            let e = (g - w).abs() / range;
            assert!(
                e <= 1e-3,
                "{what}: {name}[{j}]: gpu {g} vs cpu {w} (error {e:.2e} of the largest {range})"
            );
            if e > worst.0 {
                worst = (e, name.clone());
            }
        }
    }
    eprintln!(
        "{what}: {} dispatches, loss error {loss_err:.2e}, worst gradient error {:.2e} ({})",
        step.dispatches(),
        worst.0,
        worst.1
    );
    (step, loss_err, worst.0)
}

/// The full plan, then every layer recomputed, on `ctx`.
fn check_model(ctx: &Arc<GpuContext>, cfg: &Cfg, dropout: f32, recompute: bool) -> GpuStep {
    let s = lora_case(cfg, small_lora(dropout));
    let count = s.batch.targets.iter().filter(|&&t| t != u32::MAX).count();
    let scale = 1.0 / count as f32;
    let want = case_step(&s, &s.graph, scale, false);
    let what = format!("{} {}", cfg.arch, cfg.ty);
    let (step, _, _) = check_gpu(ctx, &s, s.graph.clone(), scale, &want, &what);
    if recompute {
        let all: BTreeSet<usize> = (0..s.model.spec().layers.len()).collect();
        let rg = plan::recompute_layers(&s.graph, &all);
        check_gpu(ctx, &s, rg, scale, &want, &format!("{what} recomputed"));
    }
    step
}

fn gemma3_cfg() -> Cfg {
    // A window of 3 over rows of 8 bites in both layers.
    let mut cfg = Cfg::gemma3(GgmlType::Q4_0, 3);
    cfg.n_layer = 2;
    cfg
}

#[test]
fn tiny_llama_step_matches_cpu_full_and_recomputed() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut step = check_model(&ctx, &Cfg::llama(GgmlType::Q8_0, 2), 0.1, true);
    // Inputs are checked before anything is written.
    let b = tiny_batch(50);
    let s = lora_case(&Cfg::llama(GgmlType::Q8_0, 2), small_lora(0.1));
    let mut bad = |f: &dyn Fn(&mut TinyBatch), params: &[Vec<f32>], msg: &str| {
        let mut b2 = TinyBatch {
            tokens: b.tokens.clone(),
            targets: b.targets.clone(),
            positions: b.positions.clone(),
            seg_start: b.seg_start.clone(),
        };
        f(&mut b2);
        let e = step.run(&inputs(&b2, 1.0), params).unwrap_err().to_string();
        assert!(e.contains(msg), "{e:?} does not say {msg:?}");
    };
    bad(
        &|b| {
            b.tokens.pop();
        },
        &s.params,
        "tokens has 15",
    );
    bad(&|b| b.tokens[3] = 50, &s.params, "outside the vocabulary");
    bad(&|b| b.positions[9] = 8, &s.params, "position 8");
    bad(&|b| b.seg_start[2] = 3, &s.params, "segment start 3");
    bad(&|_| (), &s.params[1..], "parameter tensors given");
    let mut short = s.params.clone();
    short[0].pop();
    bad(&|_| (), &short, "values, expected");
}

#[test]
fn tiny_gemma3_step_matches_cpu_with_dropout_and_window_full_and_recomputed() {
    let Some(ctx) = testing::context() else {
        return;
    };
    check_model(&ctx, &gemma3_cfg(), 0.1, true);
}

#[test]
fn steps_match_cpu_with_frozen_weights_split_over_small_bindings() {
    let Some(ctx) = testing::context_small_bindings() else {
        return;
    };
    for cfg in [Cfg::llama(GgmlType::Q8_0, 2), gemma3_cfg()] {
        // The feed-forward matrices are split in two parts or more.
        let bytes = cfg.n_ff * cfg.ty.row_bytes(cfg.n_embd).unwrap();
        assert!(
            bytes as u64 > ctx.max_binding(),
            "{bytes} bytes fit one binding"
        );
        check_model(&ctx, &cfg, 0.1, false);
    }
}

/// The largest |a − b| over a tensor, relative to the largest |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let range = b
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs() / range))
}

/// The worst [`rel_err`] over tensors, and which.
fn worst(got: &[Vec<f32>], want: &[Vec<f32>], s: &LoraCase) -> (f32, String) {
    got.iter()
        .zip(want)
        .enumerate()
        .map(|(i, (g, w))| (rel_err(g, w), s.graph.params[i].name.clone()))
        .fold((0.0, String::new()), |a, b| if b.0 > a.0 { b } else { a })
}

/// One step of the host trainer's optimizer (`src/train/run.rs`): the
/// global norm of `grads`, clipping to `max_norm`, AdamW. Returns the norm.
fn host_step(
    adam: &mut AdamWState,
    cfg: &AdamWConfig,
    params: &mut [Vec<f32>],
    mut grads: Vec<Vec<f32>>,
    lrs: &[f32],
    max_norm: f32,
) -> f64 {
    let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
    let norm = global_norm(&refs);
    let c = clip_scale(norm, max_norm);
    assert!(c < 0.9, "clipping does not bite: norm {norm}");
    grads.iter_mut().flatten().for_each(|g| *g *= c);
    let mut ps: Vec<&mut [f32]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
    let gs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
    adam.step(cfg, &mut ps, &gs, lrs);
    norm
}

/// Three resident steps against the host trainer's arithmetic twice: on the
/// CPU's gradients (the whole path; where a clipped gradient is near ε the
/// update `m̂/(√v̂ + ε)` passes on the gradients' own GPU-vs-CPU error, so
/// the bound is 1e-5 of each tensor at learning rates ≤ 1e-3), and on the
/// device's own gradients through [`GpuStep::run`] (the optimizer alone:
/// 1e-6). Then a skipped step, a checkpoint restored, and `run` after.
#[test]
fn resident_steps_match_host_adamw_with_clipping_skip_and_restore() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let s = lora_case(&Cfg::llama(GgmlType::Q8_0, 2), small_lora(0.1));
    let count = s.batch.targets.iter().filter(|&&t| t != u32::MAX).count();
    let scale = 1.0 / count as f32;
    let cfg = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    // LoRA+-like: B faster than A.
    let lrs: Vec<f32> = s
        .graph
        .params
        .iter()
        .map(|p| {
            if p.name.ends_with("lora_b") {
                1e-3
            } else {
                2.5e-4
            }
        })
        .collect();
    let max_norm = 0.05;
    let opt = |t: u64| GpuOptim {
        cfg,
        lrs: lrs.clone(),
        max_grad_norm: max_norm,
        t,
    };
    let n = s.graph.params.len();
    let sizes: Vec<usize> = s.params.iter().map(Vec::len).collect();
    let mut cpu = CpuStep::new(&s.model, s.graph.clone(), MemoryPlan::new(&s.graph), 2).unwrap();
    let mut host = s.params.clone();
    let mut adam = AdamWState::new(&sizes);
    let mut by_run = GpuStep::new(
        ctx.clone(),
        &s.model,
        s.graph.clone(),
        MemoryPlan::new(&s.graph),
    )
    .unwrap();
    let mut host2 = s.params.clone();
    let mut adam2 = AdamWState::new(&sizes);
    let mut gpu = GpuStep::new(
        ctx.clone(),
        &s.model,
        s.graph.clone(),
        MemoryPlan::new(&s.graph),
    )
    .unwrap();
    assert!(
        gpu.train_step(&inputs(&s.batch, scale), &opt(1)).is_err(),
        "not loaded"
    );
    gpu.load_params(&s.params).unwrap();
    assert_eq!(gpu.params().unwrap(), s.params);
    let (mut worst_p, mut worst_mv, mut worst_norm) = ((0.0f32, String::new()), 0.0f32, 0.0f64);
    let (mut worst_p2, mut worst_norm2) = (0.0f32, 0.0f64);
    for k in 0..3u64 {
        let inp = StepInputs {
            seed: 5 + k,
            ..inputs(&s.batch, scale)
        };
        // The host trainer's step.
        let (nll, cnt) = cpu.run(&inp, &host).unwrap();
        let grads: Vec<Vec<f32>> = (0..n).map(|i| cpu.grad(i).to_vec()).collect();
        let norm = host_step(&mut adam, &cfg, &mut host, grads, &lrs, max_norm);
        by_run.run(&inp, &host2).unwrap();
        let grads: Vec<Vec<f32>> = (0..n).map(|i| by_run.grad(i).unwrap()).collect();
        let norm2 = host_step(&mut adam2, &cfg, &mut host2, grads, &lrs, max_norm);
        // The device's.
        let before = gpu.submissions();
        let r = gpu.train_step(&inp, &opt(k + 1)).unwrap();
        assert_eq!(gpu.submissions() - before, 1, "submissions per step");
        let what = format!("step {}", k + 1);
        assert!(!r.skipped, "{what} skipped");
        assert_eq!(r.count, cnt, "{what}: targets");
        let nll_err = (r.nll_sum - nll).abs() / nll.abs();
        assert!(nll_err < 1e-4, "{what}: nll {} vs cpu {nll}", r.nll_sum);
        let norm_err = (f64::from(r.grad_norm) - norm).abs() / norm;
        assert!(
            norm_err < 1e-3,
            "{what}: norm {} vs cpu {norm}",
            r.grad_norm
        );
        worst_norm = worst_norm.max(norm_err);
        let got = gpu.params().unwrap();
        let e2 = worst(&got, &host2, &s).0;
        let n2 = (f64::from(r.grad_norm) - norm2).abs() / norm2;
        assert!(
            e2 <= 1e-6 && n2 < 1e-5,
            "{what}: vs the device's gradients: {e2:.2e} {n2:.2e}"
        );
        worst_p2 = worst_p2.max(e2);
        worst_norm2 = worst_norm2.max(n2);
        let (e, name) = worst(&got, &host, &s);
        assert!(e <= 1e-5, "{what}: {name}: parameter error {e:.2e}");
        if e > worst_p.0 {
            worst_p = (e, name);
        }
        let (m, v) = gpu.moments().unwrap();
        let e = worst(&m, &adam.m, &s).0.max(worst(&v, &adam.v, &s).0);
        assert!(e <= 1e-3, "{what}: moment error {e:.2e}");
        worst_mv = worst_mv.max(e);
    }
    eprintln!(
        "resident steps: {} + {} dispatches in 1 submission; worst parameter error {:.2e} ({}), \
         moments {worst_mv:.2e}, grad norm {worst_norm:.2e}; on the device's gradients: \
         parameters {worst_p2:.2e}, grad norm {worst_norm2:.2e}",
        gpu.dispatches(),
        gpu.optimizer_dispatches(),
        worst_p.0,
        worst_p.1
    );

    // A step with non-finite gradients is skipped, leaving everything as is.
    let (p3, (m3, v3)) = (gpu.params().unwrap(), gpu.moments().unwrap());
    let inf = StepInputs {
        loss_scale: f32::INFINITY,
        ..inputs(&s.batch, scale)
    };
    let r = gpu.train_step(&inf, &opt(4)).unwrap();
    assert!(r.skipped && !r.grad_norm.is_finite(), "{r:?}");
    assert!(r.nll_sum.is_finite() && r.count == count, "{r:?}");
    assert_eq!(gpu.params().unwrap(), p3, "params after a skipped step");
    assert_eq!(
        gpu.moments().unwrap(),
        (m3.clone(), v3.clone()),
        "moments after a skipped step"
    );

    // A checkpoint's params and moments restored into a fresh step continue
    // exactly as the original (the norm's order is fixed: same bits).
    let mut restored = GpuStep::new(
        ctx.clone(),
        &s.model,
        s.graph.clone(),
        MemoryPlan::new(&s.graph),
    )
    .unwrap();
    restored.load_params(&p3).unwrap();
    restored.set_moments(&m3, &v3).unwrap();
    let inp = StepInputs {
        seed: 9,
        ..inputs(&s.batch, scale)
    };
    let a = gpu.train_step(&inp, &opt(4)).unwrap();
    let b = restored.train_step(&inp, &opt(4)).unwrap();
    assert!(!a.skipped && a == b, "{a:?} vs {b:?}");
    assert_eq!(gpu.params().unwrap(), restored.params().unwrap());
    assert_eq!(gpu.moments().unwrap(), restored.moments().unwrap());
    // run() still takes the host's parameters (evaluation, accumulation).
    let (l, _) = gpu.run(&inp, &s.params).unwrap();
    let (want, _) = cpu.run(&inp, &s.params).unwrap();
    assert!(
        (l - want).abs() / want < 1e-4,
        "run after resident steps: {l} vs {want}"
    );
}
