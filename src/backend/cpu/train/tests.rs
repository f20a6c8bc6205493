//! Finite-difference checks of every backward rule, and of the LoRA
//! gradients of whole tiny models.

use super::attention::{AttnSaved, Rows, attention_backward, attention_forward};
use super::loss::loss_head;
use super::ops::*;
use super::{CpuStep, case_step};
use crate::backend::cpu::matmul::QMatrix;
use crate::graph::testing::{LoraCase, inputs, lora_case, small_lora};
use crate::graph::{AttnGeom, DecoderGraph, Graph, MemoryPlan, StepInputs, autodiff, plan};
use crate::model::tiny::{Cfg, values, write_model};
use crate::model::{Activation, Model, Rope, RopeKind};
use crate::peft::Method;
use crate::peft::lora::{Lora, LoraConfig};
use crate::quant::GgmlType;
use std::collections::BTreeSet;

/// Check `analytic` against central differences of the scalar `f` at `x`,
/// on every element (or every `stride`-th).
fn check_grad(
    name: &str,
    x: &[f32],
    analytic: &[f32],
    stride: usize,
    f: &mut dyn FnMut(&[f32]) -> f64,
) {
    let eps = 1e-2f32;
    let mut worst = 0.0f64;
    for i in (0..x.len()).step_by(stride) {
        let mut xp = x.to_vec();
        xp[i] += eps;
        let lp = f(&xp);
        xp[i] -= 2.0 * eps;
        let lm = f(&xp);
        let num = (lp - lm) / (2.0 * eps as f64);
        let err =
            (num - analytic[i] as f64).abs() / (num.abs().max(analytic[i].abs() as f64) + 1e-2);
        worst = worst.max(err);
        assert!(
            err < 2e-2,
            "{name}[{i}]: analytic {} vs numeric {num}",
            analytic[i]
        );
    }
    assert!(worst.is_finite(), "{name}: no elements checked");
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

#[test]
fn rms_norm_backward_matches_finite_differences() {
    let (rows, n) = (3, 8);
    let x = values(1, rows * n, 1.0);
    let w = values(2, n, 1.0);
    let r = values(3, rows * n, 1.0);
    let mut dx = vec![0.0; x.len()];
    rms_norm_backward(&x, &r, &w, 1e-6, &mut dx);
    check_grad("rms_norm", &x, &dx, 1, &mut |x| {
        let mut y = vec![0.0; x.len()];
        rms_norm_forward(x, &w, 1e-6, &mut y);
        dot(&y, &r)
    });
}

#[test]
fn rope_backward_matches_finite_differences() {
    for kind in [RopeKind::Adjacent, RopeKind::Halves] {
        let rope = Rope {
            kind,
            base: 10000.0,
            dims: 8,
        };
        let (n, head_dim) = (4, 8);
        let table = rope_table(&rope, 16);
        let pos = [0u32, 5, 3, 15];
        let x = values(4, n * 2 * head_dim, 1.0);
        let r = values(5, x.len(), 1.0);
        let mut dx = vec![0.0; x.len()];
        rope_apply(&r, &pos, head_dim, &rope, &table, -1.0, &mut dx);
        check_grad("rope", &x, &dx, 1, &mut |x| {
            let mut y = vec![0.0; x.len()];
            rope_apply(x, &pos, head_dim, &rope, &table, 1.0, &mut y);
            dot(&y, &r)
        });
    }
}

#[test]
fn gated_backward_matches_finite_differences() {
    for act in [Activation::Silu, Activation::GeluTanh] {
        let g = values(6, 40, 3.0);
        let u = values(7, 40, 1.0);
        let r = values(8, 40, 1.0);
        let (mut dg, mut du) = (vec![0.0; 40], vec![0.0; 40]);
        gated_backward(&g, &u, &r, act, &mut dg, &mut du);
        let f = |g: &[f32], u: &[f32]| {
            let mut h = vec![0.0; 40];
            gated_forward(g, u, act, &mut h);
            dot(&h, &r)
        };
        check_grad("gated.g", &g, &dg, 1, &mut |x| f(x, &u));
        check_grad("gated.u", &u, &du, 1, &mut |x| f(&g, x));
    }
}

#[test]
fn dropout_is_its_own_backward() {
    let x = values(9, 64, 1.0);
    let r = values(10, 64, 1.0);
    let mut dx = vec![0.0; 64];
    dropout(&r, 0.3, 11, 2, &mut dx);
    check_grad("dropout", &x, &dx, 1, &mut |x| {
        let mut y = vec![0.0; 64];
        dropout(x, 0.3, 11, 2, &mut y);
        dot(&y, &r)
    });
}

/// Check attention's dq, dk, dv against finite differences of `Σ r ⊙ o`
/// (every `stride`-th element), with random inputs from `seed`; returns
/// the inputs and the forward output.
fn check_attention(rows: &Rows, geom: &AttnGeom, seed: u64, stride: usize) -> (Vec<f32>, Vec<f32>) {
    let n = rows.batch * rows.seq;
    let (qd, kvd) = (geom.n_head * geom.head_dim, geom.n_kv_head * geom.head_dim);
    let q = values(seed, n * qd, 1.0);
    let k = values(seed + 1, n * kvd, 1.0);
    let v = values(seed + 2, n * kvd, 1.0);
    let r = values(seed + 3, n * qd, 1.0);
    let forward = |q: &[f32], k: &[f32], v: &[f32]| {
        let mut o = vec![0.0; n * qd];
        let mut lse = vec![0.0; n * geom.n_head];
        attention_forward(q, k, v, rows, geom, &mut o, &mut lse);
        (o, lse)
    };
    let (o, lse) = forward(&q, &k, &v);
    let saved = AttnSaved {
        q: &q,
        k: &k,
        v: &v,
        o: &o,
        lse: &lse,
    };
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    attention_backward(&saved, &r, rows, geom, &mut dq, &mut dk, &mut dv);
    let f = |q: &[f32], k: &[f32], v: &[f32]| dot(&forward(q, k, v).0, &r);
    check_grad("attention.q", &q, &dq, stride, &mut |x| f(x, &k, &v));
    check_grad("attention.k", &k, &dk, stride, &mut |x| f(&q, x, &v));
    check_grad("attention.v", &v, &dv, stride, &mut |x| f(&q, &k, x));
    (v, o)
}

#[test]
fn attention_backward_matches_finite_differences() {
    // Two sequences of 6; the second packs two examples (starting at 0 and 2).
    let seg: Vec<u32> = [0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2].to_vec();
    let rows = Rows {
        batch: 2,
        seq: 6,
        seg_start: &seg,
    };
    for window in [None, Some(3)] {
        let geom = AttnGeom {
            n_head: 4,
            n_kv_head: 2,
            head_dim: 4,
            scale: 0.5,
            window,
            sink: 0,
        };
        let (v, o) = check_attention(&rows, &geom, 12, 1);
        // The masks hold: token 2 of sequence 1 starts a new example and
        // sees only itself, so its output is its own value rows.
        let t = 6 + 2;
        for h in 0..4 {
            let kvh = h / 2;
            assert_eq!(
                &o[t * 16 + h * 4..t * 16 + h * 4 + 4],
                &v[t * 8 + kvh * 4..t * 8 + kvh * 4 + 4]
            );
        }
    }
}

#[test]
fn loss_head_gradient_matches_finite_differences() {
    let (n, c, vocab) = (5, 8, 11);
    let w = values(16, vocab * c, 1.0);
    let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let m = QMatrix::new(GgmlType::F32, vocab, c, &bytes).unwrap();
    let h = values(17, n * c, 1.0);
    let targets = [3u32, u32::MAX, 10, 0, 7];
    let mut logits = vec![0.0; 2 * vocab];
    let mut dx = vec![0.0; n * c];
    let mut wb = vec![0.0; super::loss::BLOCK * c];
    let (sum, count) = loss_head(&h, &m, &targets, 0.25, 2, &mut logits, &mut wb, &mut dx, 2);
    assert_eq!(count, 4);
    assert!(sum > 0.0);
    // Row 1 has no target: no gradient.
    assert!(dx[c..2 * c].iter().all(|&v| v == 0.0));
    check_grad("loss_head", &h, &dx, 1, &mut |x| {
        let mut lg = vec![0.0; 2 * vocab];
        let mut d = vec![0.0; n * c];
        0.25 * loss_head(x, &m, &targets, 0.25, 2, &mut lg, &mut wb, &mut d, 1).0
    });
}

/// The whole model's LoRA gradients against finite differences of its loss.
fn check_model(cfg: Cfg, dropout: f32) {
    let LoraCase {
        model,
        graph: g,
        params,
        batch,
        ..
    } = lora_case(&cfg, small_lora(dropout));
    let spec = model.spec();
    let plan = MemoryPlan::new(&g);
    let mut step = CpuStep::new(&model, g.clone(), plan, 2).unwrap();
    let (_, count) = step.run(&inputs(&batch, 1.0), &params).unwrap();
    let scale = 1.0 / count as f32;
    step.run(&inputs(&batch, scale), &params).unwrap();
    let grads: Vec<Vec<f32>> = (0..g.params.len()).map(|i| step.grad(i).to_vec()).collect();
    assert!(grads.iter().flatten().any(|&v| v != 0.0));
    // Check a sample of parameters: the first and last layer's A and B of
    // several targets, every 3rd element.
    let mut fwd = CpuStep::new(&model, g.clone(), MemoryPlan::new(&g), 2).unwrap();
    let n = g.params.len();
    for pi in [0, 1, 4, 7, 12, n - 3, n - 2, n - 1] {
        let name = g.params[pi].name.clone();
        let mut ps = params.clone();
        check_grad(&name, &params[pi], &grads[pi], 3, &mut |x| {
            ps[pi].copy_from_slice(x);
            let (sum, _) = fwd.run(&inputs(&batch, scale), &ps).unwrap();
            sum * scale as f64
        });
    }
    // Recomputing every layer gives the same gradients with a smaller arena.
    let all: BTreeSet<usize> = (0..spec.layers.len()).collect();
    let rg = plan::recompute_layers(&g, &all);
    let rplan = MemoryPlan::new(&rg);
    let full = MemoryPlan::new(&g);
    assert!(
        rplan.arena_len < full.arena_len,
        "{} vs {}",
        rplan.arena_len,
        full.arena_len
    );
    let mut rstep = CpuStep::new(&model, rg, rplan, 2).unwrap();
    rstep.run(&inputs(&batch, scale), &params).unwrap();
    for (i, gr) in grads.iter().enumerate() {
        assert_eq!(rstep.grad(i), gr.as_slice(), "{}", g.params[i].name);
    }
}

#[test]
fn tiny_llama_lora_gradients_match_finite_differences() {
    check_model(Cfg::llama(GgmlType::F32, 2), 0.0);
}

#[test]
fn tiny_gemma3_lora_gradients_match_finite_differences_with_dropout() {
    let mut cfg = Cfg::gemma3(GgmlType::F32, 3);
    cfg.n_layer = 2;
    check_model(cfg, 0.1);
}

#[test]
fn graph_loss_equals_the_inference_path() {
    // With B = 0 the adapted model is the base: the training graph's loss
    // must equal the NLL of the (reference-checked) inference path.
    use crate::backend::{Decoder, cpu::CpuDecoder};
    for cfg in [
        Cfg::llama(GgmlType::Q8_0, 2),
        Cfg::gemma3(GgmlType::Q4_0, 3),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_model(&cfg, &path);
        let model = Model::open(&path).unwrap();
        let lora = Lora::new(LoraConfig::default(), model.spec().layers.len()).unwrap();
        let mut g = DecoderGraph::build(model.spec(), 1, 8, &lora);
        autodiff::differentiate(&mut g).unwrap();
        let params = lora.init(&g, 1);
        let tokens: Vec<u32> = (0..8).map(|i| (i * 5 + 1) % cfg.n_vocab as u32).collect();
        let mut targets: Vec<u32> = tokens[1..].to_vec();
        targets.push(u32::MAX);
        let positions: Vec<u32> = (0..8).collect();
        let seg = vec![0u32; 8];
        let inp = StepInputs {
            tokens: &tokens,
            targets: &targets,
            positions: &positions,
            seg_start: &seg,
            loss_scale: 1.0,
            seed: 0,
        };
        let mut step = CpuStep::new(&model, g.clone(), MemoryPlan::new(&g), 2).unwrap();
        let (sum, count) = step.run(&inp, &params).unwrap();
        assert_eq!(count, 7);
        let dec = CpuDecoder::new(&model).unwrap();
        let mut s = dec.session(8).unwrap();
        let nll = s.forward_nll(&tokens[..7], &targets[..7]).unwrap();
        let want: f64 = nll.iter().sum();
        assert!(
            (sum - want).abs() < 1e-3 * want.abs(),
            "{sum} vs {want} ({})",
            cfg.arch
        );
    }
}

#[test]
fn attention_over_several_query_blocks_matches_finite_differences() {
    // 150 tokens: three blocks of queries, a segment starting mid-block.
    let seq = 150;
    let seg: Vec<u32> = (0..seq as u32)
        .map(|t| if t < 70 { 0 } else { 70 })
        .collect();
    let rows = Rows {
        batch: 1,
        seq,
        seg_start: &seg,
    };
    for window in [None, Some(40)] {
        let geom = AttnGeom {
            n_head: 2,
            n_kv_head: 1,
            head_dim: 4,
            scale: 0.5,
            window,
            sink: 0,
        };
        check_attention(&rows, &geom, 20, 5);
    }
}

#[test]
fn fast_forward_stays_close_to_f32_and_recomputed_layers_reproduce_it() {
    let c = lora_case(&Cfg::llama(GgmlType::Q4_1, 2), LoraConfig::default());
    let g = &c.graph;
    let ((exact, _), exact_grads) = case_step(&c, g, 0.1, false);
    let ((fast, _), fast_grads) = case_step(&c, g, 0.1, true);
    // The 8-bit products are taken (the loss moves) and stay close.
    assert_ne!(fast, exact);
    assert!(
        (fast - exact).abs() < 1e-2 * exact.abs(),
        "{fast} vs {exact}"
    );
    for (i, (f, e)) in fast_grads.iter().zip(&exact_grads).enumerate() {
        let diff: f64 = f.iter().zip(e).map(|(a, b)| f64::from(a - b).powi(2)).sum();
        let norm: f64 = e.iter().map(|&b| f64::from(b).powi(2)).sum();
        // Straight-through: the backward is taken at activations that moved
        // by the 8-bit rounding, and its products `dY·W` through `Wᵀ`
        // rounded to 5 bits. On this random tiny model that moves the
        // gradients by 4–24% (q and k most, through the softmax).
        assert!(
            diff.sqrt() <= 0.3 * norm.sqrt(),
            "{}: {} of {}",
            g.params[i].name,
            diff.sqrt(),
            norm.sqrt()
        );
    }
    // Recomputed layers run the same products: the same bits.
    let all: BTreeSet<usize> = (0..c.model.spec().layers.len()).collect();
    let ((rfast, _), rgrads) = case_step(&c, &plan::recompute_layers(g, &all), 0.1, true);
    assert_eq!(rfast, fast);
    assert_eq!(rgrads, fast_grads);
}

#[test]
fn fused_thin_products_give_the_unfused_gradients_with_fewer_nodes() {
    let c = lora_case(&Cfg::llama(GgmlType::Q8_0, 2), LoraConfig::default());
    let g = &c.graph;
    let fused = plan::fuse_thin_products(g);
    let count = |g: &Graph, name: &str| g.nodes.iter().filter(|n| n.op.name() == name).count();
    // Every LoRA A's input gradient joins the frozen one: one fused node
    // each, one MatmulNN and one Add fewer. 7 targets × 2 layers, less layer
    // 0's q, k and v, whose input (the embeddings) needs no gradient.
    let n = count(&fused, "matmul_nn_add");
    assert_eq!(n, 11);
    assert_eq!(count(&fused, "matmul_nn") + n, count(g, "matmul_nn"));
    assert_eq!(count(&fused, "add") + n, count(g, "add"));
    let ((l0, _), g0) = case_step(&c, g, 0.1, false);
    let ((l1, _), g1) = case_step(&c, &fused, 0.1, false);
    assert_eq!(l0, l1);
    for (a, b) in g0.iter().flatten().zip(g1.iter().flatten()) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
    }
}
