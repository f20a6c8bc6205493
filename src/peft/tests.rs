//! Every method on tiny models: its gradients against finite differences
//! (CPU, and the GPU where one opens), training lowers the loss, and the
//! effects it leaves for inference reproduce the training graph's loss.

use super::lora::LoraConfig;
use super::{AdapterWeights, Method, MethodKind, MethodSpec, ParamMap, build};
use crate::backend::Decoder;
use crate::backend::cpu::CpuDecoder;
use crate::backend::cpu::train::CpuStep;
use crate::data::Batch;
use crate::graph::testing::tiny_batch;
use crate::graph::{DecoderGraph, Graph, MemoryPlan, autodiff};
use crate::model::Model;
use crate::model::tiny::{Cfg, values, write_model};
use crate::quant::GgmlType;
use crate::train::optim::{AdamWConfig, AdamWState};

/// A tiny model on disk.
pub(crate) fn tiny(cfg: &Cfg) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_model(cfg, &path);
    let model = Model::open(&path).unwrap();
    (dir, model)
}

/// The tests' settings of `kinds`: rank 2, alpha 4, every target; 3
/// virtual tokens; adapters of width 4.
fn settings(kinds: &[MethodKind]) -> (MethodSpec, LoraConfig) {
    let spec = MethodSpec {
        kinds: kinds.to_vec(),
        virtual_tokens: 3,
        adapter_size: 4,
        ..MethodSpec::default()
    };
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        ..LoraConfig::default()
    };
    (spec, lora)
}

/// `kinds` with the tests' [`settings`].
pub(crate) fn method(kinds: &[MethodKind], model: &Model) -> Box<dyn Method> {
    let (spec, lora) = settings(kinds);
    build(&spec, &lora, model).unwrap()
}

/// Write method `m` (built from `spec` and `lora`) with the parameters
/// `params` of its graph `g` to `path`, as `train` writes its adapter.
fn save(
    path: &std::path::Path,
    model: &Model,
    m: &dyn Method,
    (spec, lora): (MethodSpec, LoraConfig),
    g: &Graph,
    params: &[Vec<f32>],
) {
    use crate::train::TrainConfig;
    use crate::train::adapter::{AdapterMeta, write_adapter};
    let names: Vec<String> = g.params.iter().map(|p| p.name.clone()).collect();
    let config = TrainConfig {
        method: spec,
        lora,
        ..TrainConfig::default()
    };
    let meta = AdapterMeta {
        config: &config,
        steps: 1,
        base: model.file().path(),
    };
    write_adapter(path, model, m, &names, params, &meta).unwrap();
}

/// The method's graph for `batch` rows of 8 tokens (after its virtual
/// tokens), differentiated; `None` where its virtual tokens would leave a
/// sliding window (the trainer refuses those).
fn graph(m: &dyn Method, model: &Model, batch: usize) -> Option<Graph> {
    let rows = crate::train::graph_seq(model.spec(), m, 8).ok()?;
    let mut g = DecoderGraph::build(model.spec(), batch, rows, m);
    autodiff::differentiate(&mut g).unwrap();
    Some(g)
}

/// The tiny batch (two rows of 8) with the method's virtual tokens.
fn batch_for(m: &dyn Method, vocab: usize) -> Batch {
    let t = tiny_batch(vocab as u32);
    let b = Batch {
        batch: 2,
        seq: 8,
        tokens: t.tokens,
        targets: t.targets,
        positions: t.positions,
        seg_start: t.seg_start,
    };
    b.with_virtual(m.virtual_tokens())
}

/// Initial values moved off the start (where B = 0 or a scale = 1 would
/// give other parameters no gradient) by up to `amount`, deterministically.
/// PiSSA starts with every factor non-zero (the weights' principal
/// directions), and moving its factors as far makes the loss curve enough
/// within finite-difference steps to miss by 2%: it moves a tenth as far.
pub(crate) fn moved(m: &dyn Method, g: &Graph, amount: f32) -> Vec<Vec<f32>> {
    let amount = if m.name() == "pissa" {
        amount / 10.0
    } else {
        amount
    };
    let mut ps = m.init(g, 3);
    for (p, v) in g.params.iter().zip(ps.iter_mut()) {
        let d = values(p.tensor as u64 + 11, v.len(), amount);
        v.iter_mut().zip(d).for_each(|(v, d)| *v += d);
    }
    ps
}

const ALL_CASES: &[&[MethodKind]] = &[
    &[MethodKind::Lora],
    &[MethodKind::Dora],
    &[MethodKind::Vera],
    &[MethodKind::Pissa],
    &[MethodKind::Loha],
    &[MethodKind::Lokr],
    &[MethodKind::Ia3],
    &[MethodKind::Norm],
    &[MethodKind::Prompt],
    &[MethodKind::Prefix],
    &[MethodKind::Adapter],
    &[MethodKind::ParallelAdapter],
    &[MethodKind::Dora, MethodKind::Ia3, MethodKind::Norm],
    &[MethodKind::Lora, MethodKind::Prompt],
];

fn label(kinds: &[MethodKind]) -> String {
    kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join("+")
}

/// Every `every`-th parameter tensor of `g`, `per` elements each, against
/// central differences of `loss` (the mean NLL at `params`), extrapolated
/// (Richardson) from steps of 1e-2 and 5e-3 so that the loss's curvature
/// cancels: within 2% of the larger, or 2e-3 (f32 noise of the loss over a
/// step).
#[allow(clippy::too_many_arguments)]
fn check_all(
    what: &str,
    g: &Graph,
    params: &[Vec<f32>],
    grads: &[Vec<f32>],
    (every, per): (usize, usize),
    loss: &mut dyn FnMut(&[Vec<f32>]) -> f64,
) {
    assert!(
        grads.iter().all(|g| g.iter().any(|&v| v != 0.0)),
        "{what}: a zero gradient"
    );
    for (pi, p) in g.params.iter().enumerate().step_by(every) {
        let stride = (params[pi].len() / per).max(1);
        let mut ps = params.to_vec();
        for i in (0..params[pi].len()).step_by(stride) {
            let mut diff = |h: f32| {
                ps[pi][i] = params[pi][i] + h;
                let up = loss(&ps);
                ps[pi][i] = params[pi][i] - h;
                let down = loss(&ps);
                ps[pi][i] = params[pi][i];
                (up - down) / (2.0 * f64::from(h))
            };
            let (coarse, fine) = (diff(1e-2), diff(5e-3));
            let num = (4.0 * fine - coarse) / 3.0;
            let a = f64::from(grads[pi][i]);
            let err = (num - a).abs();
            assert!(
                err < 2e-2 * num.abs().max(a.abs()) + 2e-3,
                "{what}: {}[{i}]: analytic {a} vs numeric {num} (steps: {coarse}, {fine})",
                p.name
            );
        }
    }
}

fn cfgs() -> [Cfg; 2] {
    let mut gemma = Cfg::gemma3(GgmlType::Q8_0, 3);
    gemma.n_layer = 2;
    [Cfg::llama(GgmlType::Q8_0, 2), gemma]
}

#[test]
fn every_method_s_gradients_match_finite_differences_on_the_cpu() {
    for cfg in cfgs() {
        let (_dir, model) = tiny(&cfg);
        for kinds in ALL_CASES {
            let what = format!("{} {}", cfg.arch, label(kinds));
            let m = method(kinds, &model);
            let Some(g) = graph(&*m, &model, 2) else {
                continue;
            };
            let batch = batch_for(&*m, cfg.n_vocab);
            let params = moved(&*m, &g, 0.2);
            let mut step = CpuStep::new(&model, g.clone(), MemoryPlan::new(&g), 2).unwrap();
            let (_, count) = step.run(&batch.step_inputs(1.0, 5), &params).unwrap();
            let scale = 1.0 / count as f32;
            step.run(&batch.step_inputs(scale, 5), &params).unwrap();
            let grads: Vec<Vec<f32>> = (0..g.params.len()).map(|i| step.grad(i).to_vec()).collect();
            let mut fwd = CpuStep::new(&model, g.clone(), MemoryPlan::new(&g), 2).unwrap();
            check_all(&what, &g, &params, &grads, (1, 4), &mut |ps| {
                fwd.run(&batch.step_inputs(scale, 5), ps).unwrap().0 * f64::from(scale)
            });
        }
    }
}

#[test]
fn every_method_s_gradients_match_finite_differences_on_the_gpu() {
    use crate::backend::gpu::GpuStep;
    use crate::backend::gpu::testing;
    let Some(ctx) = testing::context() else {
        eprintln!("no GPU adapter: skipped");
        return;
    };
    let cfg = Cfg::llama(GgmlType::Q8_0, 2);
    let (_dir, model) = tiny(&cfg);
    for kinds in ALL_CASES {
        let what = format!("gpu {}", label(kinds));
        let m = method(kinds, &model);
        let g = graph(&*m, &model, 2).unwrap();
        let batch = batch_for(&*m, cfg.n_vocab);
        let params = moved(&*m, &g, 0.2);
        let mut cpu = CpuStep::new(&model, g.clone(), MemoryPlan::new(&g), 2).unwrap();
        let (_, count) = cpu.run(&batch.step_inputs(1.0, 5), &params).unwrap();
        let scale = 1.0 / count as f32;
        let (cpu_sum, _) = cpu.run(&batch.step_inputs(scale, 5), &params).unwrap();
        let mut gpu = GpuStep::new(ctx.clone(), &model, g.clone(), MemoryPlan::new(&g)).unwrap();
        let (sum, _) = gpu.run(&batch.step_inputs(scale, 5), &params).unwrap();
        assert!(
            (sum - cpu_sum).abs() < 1e-4 * cpu_sum,
            "{what}: loss {sum} vs cpu {cpu_sum}"
        );
        let grads: Vec<Vec<f32>> = (0..g.params.len()).map(|i| gpu.grad(i).unwrap()).collect();
        for (i, (gg, cg)) in grads
            .iter()
            .zip((0..g.params.len()).map(|i| cpu.grad(i)))
            .enumerate()
        {
            let range = cg.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let worst = gg
                .iter()
                .zip(cg)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst <= 1e-3 * range,
                "{what}: {}: gpu vs cpu {worst} of {range}",
                g.params[i].name
            );
        }
        // The GPU's own forward passes as the finite differences (a sample:
        // a pass costs tens of milliseconds on a software driver).
        check_all(&what, &g, &params, &grads, (4, 1), &mut |ps| {
            gpu.run(&batch.step_inputs(scale, 5), ps).unwrap().0 * f64::from(scale)
        });
    }
}

#[test]
fn training_every_method_lowers_the_loss() {
    let cfg = Cfg::llama(GgmlType::Q8_0, 2);
    let (_dir, model) = tiny(&cfg);
    for kinds in ALL_CASES {
        let what = label(kinds);
        let m = method(kinds, &model);
        let g = graph(&*m, &model, 2).unwrap();
        let batch = batch_for(&*m, cfg.n_vocab);
        let mut params = m.init(&g, 1);
        let sizes: Vec<usize> = params.iter().map(Vec::len).collect();
        let mut adam = AdamWState::new(&sizes);
        let cfg = AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        };
        let mut step = CpuStep::new(&model, g.clone(), MemoryPlan::new(&g), 2).unwrap();
        let mut losses = Vec::new();
        for _ in 0..40 {
            let (_, count) = step.run(&batch.step_inputs(1.0, 5), &params).unwrap();
            let (sum, _) = step
                .run(&batch.step_inputs(1.0 / count as f32, 5), &params)
                .unwrap();
            losses.push(sum / count as f64);
            let grads: Vec<Vec<f32>> = (0..g.params.len()).map(|i| step.grad(i).to_vec()).collect();
            let gs: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
            let mut ps: Vec<&mut [f32]> = params.iter_mut().map(Vec::as_mut_slice).collect();
            let lrs = vec![1e-2; gs.len()];
            adam.step(&cfg, &mut ps, &gs, &lrs);
        }
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(last < 0.8 * first, "{what}: loss {first} → {last}");
    }
}

/// The NLL of `tokens` (each predicting the next) by the CPU decoder with
/// the method's effects at `params`, against the training graph's.
#[test]
fn every_method_s_inference_effects_reproduce_the_graph_s_loss() {
    for cfg in cfgs() {
        let (_dir, model) = tiny(&cfg);
        let tokens: Vec<u32> = (0..8).map(|i| (i * 5 + 1) % cfg.n_vocab as u32).collect();
        let mut targets: Vec<u32> = tokens[1..].to_vec();
        targets.push(u32::MAX);
        let one = Batch {
            batch: 1,
            seq: 8,
            tokens: tokens.clone(),
            targets: targets.clone(),
            positions: (0..8).collect(),
            seg_start: vec![0; 8],
        };
        for kinds in ALL_CASES {
            let what = format!("{} {}", cfg.arch, label(kinds));
            let m = method(kinds, &model);
            let Some(g) = graph(&*m, &model, 1) else {
                continue;
            };
            let b = one.with_virtual(m.virtual_tokens());
            let params = moved(&*m, &g, 1.0);
            let mut step = CpuStep::new(&model, g.clone(), MemoryPlan::new(&g), 2).unwrap();
            let (sum, _) = step.run(&b.step_inputs(1.0, 5), &params).unwrap();
            let map: ParamMap = g
                .params
                .iter()
                .zip(&params)
                .map(|(p, v)| (p.name.clone(), v.clone()))
                .collect();
            let effects = m.effects(&map, &model).unwrap();
            let adapter = AdapterWeights::from_effects(effects, 1.0).unwrap();
            let mut dec = CpuDecoder::new(&model).unwrap();
            let base: f64 = dec
                .session(8)
                .unwrap()
                .forward_nll(&tokens[..7], &targets[..7])
                .unwrap()
                .iter()
                .sum();
            dec.add_adapter(std::sync::Arc::new(adapter));
            let nll: f64 = dec
                .session(8)
                .unwrap()
                .forward_nll(&tokens[..7], &targets[..7])
                .unwrap()
                .iter()
                .sum();
            eprintln!("{what}: graph {sum}, decoder {nll}, base {base}");
            // Within a tenth of the adapter's own effect, which is at least 0.2%.
            assert!(
                (nll - base).abs() > 2e-3 * base,
                "{what}: the adapter changes little ({nll} vs {base})"
            );
            assert!(
                (sum - nll).abs() < 0.1 * (nll - base).abs(),
                "{what}: graph {sum} vs decoder {nll}"
            );
        }
    }
}

#[test]
fn every_method_s_saved_adapter_reloads_to_identical_outputs() {
    let cfg = Cfg::llama(GgmlType::Q8_0, 2);
    let (dir, model) = tiny(&cfg);
    let tokens: Vec<u32> = (0..8).map(|i| (i * 5 + 1) % cfg.n_vocab as u32).collect();
    for kinds in ALL_CASES {
        let what = label(kinds);
        let m = method(kinds, &model);
        let g = graph(&*m, &model, 1).unwrap();
        let params = moved(&*m, &g, 1.0);
        let map: ParamMap = g
            .params
            .iter()
            .map(|p| p.name.clone())
            .zip(params.iter().cloned())
            .collect();
        let logits = |a: AdapterWeights| {
            let mut dec = CpuDecoder::new(&model).unwrap();
            dec.add_adapter(std::sync::Arc::new(a));
            let mut s = dec.session(8).unwrap();
            s.forward(&tokens, crate::backend::Logits::All).unwrap()
        };
        let want =
            logits(AdapterWeights::from_effects(m.effects(&map, &model).unwrap(), 1.0).unwrap());
        let path = dir.path().join(format!("{what}.gguf"));
        save(&path, &model, &*m, settings(kinds), &g, &params);
        let loaded = crate::export::load_adapter_weights(&path, &model, 1.0).unwrap();
        let got = logits(loaded);
        let same = got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{what}: the reloaded adapter gives other logits");
        // LoRA and PiSSA are GGUF LoRA files llama.cpp loads; the others not.
        let lora_file = crate::export::gguf_lora::read(&path).is_ok();
        let low_rank_only = matches!(kinds, [MethodKind::Lora] | [MethodKind::Pissa]);
        assert_eq!(
            lora_file, low_rank_only,
            "{what}: written as GGUF LoRA: {lora_file}"
        );
    }
}

#[test]
fn weight_changing_methods_merge_into_the_model_and_the_others_are_refused() {
    use crate::export::merge::{MergeType, logit_error_weights, merge_weights};
    let cfg = Cfg::llama(GgmlType::F32, 2);
    let (dir, model) = tiny(&cfg);
    let prompts = vec![
        (0..8)
            .map(|i| (i * 5 + 1) % cfg.n_vocab as u32)
            .collect::<Vec<u32>>(),
    ];
    for kinds in ALL_CASES {
        let what = label(kinds);
        let m = method(kinds, &model);
        let g = graph(&*m, &model, 1).unwrap();
        let params = moved(&*m, &g, 1.0);
        let map: ParamMap = g
            .params
            .iter()
            .zip(&params)
            .map(|(p, v)| (p.name.clone(), v.clone()))
            .collect();
        let w = AdapterWeights::from_effects(m.effects(&map, &model).unwrap(), 1.0).unwrap();
        let out = dir.path().join(format!("{}.gguf", what.replace('+', "_")));
        let r = merge_weights(
            &model,
            &[(what.clone(), &w)],
            MergeType::Same,
            &out,
            &mut |_, _| std::ops::ControlFlow::Continue(()),
        );
        let runtime_only = kinds.iter().any(|k| {
            matches!(
                k,
                MethodKind::Prompt
                    | MethodKind::Prefix
                    | MethodKind::Adapter
                    | MethodKind::ParallelAdapter
            )
        });
        if runtime_only {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("--adapter"), "{what}: {e}");
            assert!(
                !out.exists(),
                "{what}: a refused merge wrote {}",
                out.display()
            );
            continue;
        }
        r.unwrap();
        let merged = Model::open(&out).unwrap();
        let (worst, _) =
            logit_error_weights(&model, &[std::sync::Arc::new(w)], &merged, &prompts).unwrap();
        assert!(worst < 1e-4, "{what}: merged logits differ by {worst}");
    }
}

#[test]
fn methods_peft_has_export_to_peft_and_read_back_to_the_same_logits() {
    use crate::export::{load_adapter_weights, method_file, peft_export};
    let cfg = Cfg::llama(GgmlType::Q8_0, 2);
    let (dir, model) = tiny(&cfg);
    let tokens: Vec<u32> = (0..8).map(|i| (i * 5 + 1) % cfg.n_vocab as u32).collect();
    let logits = |a: AdapterWeights| {
        let mut dec = CpuDecoder::new(&model).unwrap();
        dec.add_adapter(std::sync::Arc::new(a));
        let mut s = dec.session(8).unwrap();
        s.forward(&tokens, crate::backend::Logits::All).unwrap()
    };
    use crate::graph::Target;
    let cases: &[(MethodKind, &[Target])] = &[
        (MethodKind::Dora, &Target::ALL),
        (
            MethodKind::Vera,
            &[Target::AttnV, Target::AttnO, Target::FfnDown],
        ),
        (MethodKind::Ia3, &Target::ALL),
        (MethodKind::Loha, &Target::ALL),
        (
            MethodKind::Lokr,
            &[Target::AttnV, Target::FfnUp, Target::FfnDown],
        ),
        (MethodKind::Prompt, &Target::ALL),
        (MethodKind::Prefix, &Target::ALL),
    ];
    for &(kind, targets) in cases {
        let what = kind.name();
        let spec = MethodSpec {
            kinds: vec![kind],
            virtual_tokens: 3,
            ..MethodSpec::default()
        };
        let lora = LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: targets.to_vec(),
            ..LoraConfig::default()
        };
        let m = build(&spec, &lora, &model).unwrap();
        let g = graph(&*m, &model, 1).unwrap();
        let params = moved(&*m, &g, 1.0);
        let file = dir.path().join(format!("{what}.gguf"));
        save(&file, &model, &*m, (spec, lora), &g, &params);
        let want = logits(load_adapter_weights(&file, &model, 1.0).unwrap());
        let out = dir.path().join(format!("{what}-peft"));
        peft_export::write(&out, &method_file::read(&file).unwrap(), &model).unwrap();
        let got = logits(load_adapter_weights(&out, &model, 1.0).unwrap());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst < 1e-4,
            "{what}: logits after a PEFT round trip differ by {worst}"
        );
    }
    // LoKr on llama's q (rows permuted by head) is refused, naming merge.
    let spec = MethodSpec {
        kinds: vec![MethodKind::Lokr],
        ..MethodSpec::default()
    };
    let lora = LoraConfig {
        rank: 2,
        ..LoraConfig::default()
    };
    let m = build(&spec, &lora, &model).unwrap();
    let g = graph(&*m, &model, 1).unwrap();
    let params = m.init(&g, 1);
    let file = dir.path().join("lokr_q.gguf");
    save(&file, &model, &*m, (spec, lora), &g, &params);
    let e = peft_export::write(
        &dir.path().join("x"),
        &method_file::read(&file).unwrap(),
        &model,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("merge"), "{e}");
}
