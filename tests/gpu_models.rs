//! The real models on the GPU backend against the CPU backend (the oracle):
//! full logits on the reference prompts, greedy generation, perplexity.
//!
//! The GPU here is whatever wgpu finds, software Vulkan included (CI installs
//! Mesa's lavapipe, which runs the real WGSL on the CPU, slowly: these tests
//! keep their inputs short and share one device). Without any adapter the
//! tests skip, unless `EDGETUNE_REQUIRE_GPU` is set (as in `.ci/run`).

mod common;

use common::{encode_prompt, open, reference, root};
use edgetune::backend::cpu::CpuDecoder;
use edgetune::backend::gpu::{GpuContext, GpuDecoder, GpuOptions, KvFormat};
use edgetune::backend::{Decoder, Logits, Pick, argmax};
use edgetune::infer::perplexity;
use edgetune::model::Model;
use edgetune::tokenizer::Tokenizer;
use serde_json::Value;
use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GEMMA3: &str = "gemma-3-270m-Q4_K_M.gguf";

fn gpu() -> Option<Arc<GpuContext>> {
    static CTX: OnceLock<Option<Arc<GpuContext>>> = OnceLock::new();
    CTX.get_or_init(|| {
        match GpuContext::new(&GpuOptions {
            allow_software: true,
            ..Default::default()
        }) {
            Ok(c) => Some(c),
            Err(e) if std::env::var_os("EDGETUNE_REQUIRE_GPU").is_some() => {
                panic!("EDGETUNE_REQUIRE_GPU is set but no GPU opens: {e}")
            }
            Err(e) => {
                eprintln!("skipping GPU tests: {e}");
                None
            }
        }
    })
    .clone()
}

/// Both backends on `file`, or `None` (skipped) without the model or a GPU.
fn both(file: &str) -> Option<(Model, Arc<GpuContext>)> {
    let model = open(file)?;
    Some((model, gpu()?))
}

/// Every position's logits on the GPU within 1e-3 of the CPU's, relative to
/// the range of that position's CPU logits.
fn check_logits(model: &Model, ctx: Arc<GpuContext>, refs: &Value) {
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let cpu = CpuDecoder::new(model).unwrap();
    let gpu = GpuDecoder::new(model, ctx).unwrap();
    for p in refs["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let input = encode_prompt(model, &tok, p);
        let want = cpu
            .session(input.len())
            .unwrap()
            .forward(&input, Logits::All)
            .unwrap();
        let got = gpu
            .session(input.len())
            .unwrap()
            .forward(&input, Logits::All)
            .unwrap();
        assert_eq!(got.len(), want.len(), "{name}: logits length");
        let n_vocab = model.spec().n_vocab;
        let mut worst = 0.0f32;
        for (pos, (g, w)) in got.chunks(n_vocab).zip(want.chunks(n_vocab)).enumerate() {
            let (lo, hi) = w
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let err = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max)
                / (hi - lo);
            assert!(
                err <= 1e-3,
                "{name}: position {pos}: logit error {err:.2e} of the range"
            );
            worst = worst.max(err);
        }
        eprintln!(
            "{name}: {} positions, worst logit error {worst:.2e} of the range ({})",
            input.len(),
            gpu.device_name()
        );
    }
}

/// Greedy tokens on the GPU (only the token read back) equal the CPU's up
/// to the first step whose top-2 logits are closer than 0.02.
fn check_greedy(model: &Model, ctx: Arc<GpuContext>, refs: &Value, steps: usize) {
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let cpu = CpuDecoder::new(model).unwrap();
    let gpu = GpuDecoder::new(model, ctx).unwrap();
    for p in refs["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let input = encode_prompt(model, &tok, p);
        let mut cs = cpu.session(input.len() + steps).unwrap();
        let mut gs = gpu.session(input.len() + steps).unwrap();
        let mut feed = input.clone();
        let mut compared = 0;
        for _ in 0..steps {
            let l = cs.forward(&feed, Logits::Last).unwrap();
            let want = argmax(&l);
            let mut sorted = l.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let got = gs.forward_pick(&feed, &Pick::Greedy).unwrap();
            if sorted[0] - sorted[1] < 0.02 {
                break;
            }
            assert_eq!(got, want, "{name}: greedy token {compared}");
            compared += 1;
            feed = vec![want];
        }
        eprintln!("{name}: {compared} greedy tokens equal");
        assert!(compared > 0, "{name}: no token compared before a near-tie");
    }
}

/// Perplexity of a short text on the GPU within 0.1% of the CPU's.
fn check_perplexity(model: &Model, ctx: Arc<GpuContext>, chars: usize) {
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let text =
        std::fs::read_to_string(root().join("tests/reference/texts/mpl-2.0-head.txt")).unwrap();
    let text: String = text.chars().take(chars).collect();
    let go = &mut |_, _| ControlFlow::Continue(());
    let cpu = CpuDecoder::new(model).unwrap();
    let want = perplexity(&cpu, &tok, &text, 48, go).unwrap();
    let gpu = GpuDecoder::new(model, ctx).unwrap();
    let got = perplexity(&gpu, &tok, &text, 48, go).unwrap();
    assert_eq!(got.predicted_tokens, want.predicted_tokens);
    assert!(want.windows > 1, "the text must span several windows");
    let rel = (got.perplexity - want.perplexity).abs() / want.perplexity;
    eprintln!(
        "perplexity gpu {:.5} cpu {:.5} ({:.4}%) over {} tokens",
        got.perplexity,
        want.perplexity,
        rel * 100.0,
        got.predicted_tokens
    );
    assert!(
        rel < 1e-3,
        "perplexity {} vs {}",
        got.perplexity,
        want.perplexity
    );
}

/// With the KV cache in f16 (where the GPU has shader-f16): perplexity
/// within 0.1% of the CPU's, logits within 5e-3 of the range (measured
/// 1.2e-3 on lavapipe: just above the f32 cache's bound, hence opt-in).
#[test]
fn smollm2_f16_kv_cache_stays_close_to_the_cpu() {
    let Some(model) = open(SMOLLM2) else {
        return;
    };
    let Some(ctx) = gpu() else {
        return;
    };
    if !ctx.has_f16() {
        eprintln!("skipping: {} has no shader-f16", ctx.adapter().name);
        return;
    }
    let ctx = GpuContext::new(&GpuOptions {
        allow_software: true,
        kv_f16: true,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(ctx.kv_format(), KvFormat::F16);
    check_perplexity(&model, ctx.clone(), 360);
    let refs = reference("SmolLM2-135M-Instruct.json");
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let p = &refs["prompts"].as_array().unwrap()[2];
    let input = encode_prompt(&model, &tok, p);
    let cpu = CpuDecoder::new(&model).unwrap();
    let gpu = GpuDecoder::new(&model, ctx).unwrap();
    let want = cpu
        .session(input.len())
        .unwrap()
        .forward(&input, Logits::All)
        .unwrap();
    let got = gpu
        .session(input.len())
        .unwrap()
        .forward(&input, Logits::All)
        .unwrap();
    let n_vocab = model.spec().n_vocab;
    let mut worst = 0.0f32;
    for (g, w) in got.chunks(n_vocab).zip(want.chunks(n_vocab)) {
        let (lo, hi) = w
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let err = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
            / (hi - lo);
        worst = worst.max(err);
    }
    eprintln!(
        "f16 KV cache: worst logit error {worst:.2e} of the range over {} positions",
        input.len()
    );
    assert!(
        worst < 5e-3,
        "f16 KV cache: logit error {worst:.2e} of the range"
    );
}

#[test]
fn smollm2_gpu_logits_match_cpu() {
    if let Some((m, ctx)) = both(SMOLLM2) {
        check_logits(&m, ctx, &reference("SmolLM2-135M-Instruct.json"));
    }
}

#[test]
fn gemma3_gpu_logits_match_cpu() {
    if let Some((m, ctx)) = both(GEMMA3) {
        let gpu = GpuDecoder::new(&m, ctx.clone()).unwrap();
        // 178 MB of token embeddings: more than software Vulkan's 128 MiB binding.
        let split = gpu.split_weights();
        eprintln!("split across bindings: {split:?}");
        if ctx.max_binding() < 178_000_000 {
            assert!(
                split
                    .iter()
                    .any(|(n, parts)| n == "token_embd.weight" && *parts > 1),
                "the token embedding must be split: {split:?}"
            );
        }
        drop(gpu);
        check_logits(&m, ctx, &reference("gemma-3-270m.json"));
    }
}

#[test]
fn smollm2_gpu_greedy_matches_cpu() {
    if let Some((m, ctx)) = both(SMOLLM2) {
        check_greedy(&m, ctx, &reference("SmolLM2-135M-Instruct.json"), 6);
    }
}

#[test]
fn gemma3_gpu_greedy_matches_cpu() {
    if let Some((m, ctx)) = both(GEMMA3) {
        check_greedy(&m, ctx, &reference("gemma-3-270m.json"), 4);
    }
}

#[test]
fn smollm2_gpu_perplexity_matches_cpu() {
    if let Some((m, ctx)) = both(SMOLLM2) {
        check_perplexity(&m, ctx, 360);
    }
}

#[test]
fn gemma3_gpu_perplexity_matches_cpu() {
    if let Some((m, ctx)) = both(GEMMA3) {
        check_perplexity(&m, ctx, 240);
    }
}
