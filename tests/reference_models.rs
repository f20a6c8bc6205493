//! The real models against reference outputs computed by an independent
//! implementation (Hugging Face transformers, f32; see tests/reference/README.md):
//! input ids, top-10 logits, greedy continuation, and perplexity.
//!
//! Each model is skipped with a message when its file is absent; `.ci/run`
//! fetches both (`models/fetch all`), so CI runs everything.

mod common;

use edgetune::backend::cpu::{CpuDecoder, CpuOptions, Logits, MatvecMode};
use edgetune::infer::{GenerateOptions, StopReason, argmax, generate, perplexity};
use edgetune::model::Model;
use edgetune::tokenizer::Tokenizer;
use serde_json::Value;
use std::ops::ControlFlow;

use common::{encode_prompt, ids, open, reference, root};

fn check_prompts(model: &Model, refs: &Value) {
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let dec = CpuDecoder::new(model).unwrap();
    for p in refs["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let input = encode_prompt(model, &tok, p);
        assert_eq!(input, ids(&p["input_ids"]), "{name}: input ids");

        let mut cache = dec.new_cache(input.len() + 20);
        let logits = dec.forward(&input, &mut cache, Logits::Last).unwrap();
        let top = ids(&p["top10_ids"]);
        let mut worst = 0.0f64;
        for (id, want) in top.iter().zip(p["top10_logits"].as_array().unwrap()) {
            let (got, want) = (logits[*id as usize] as f64, want.as_f64().unwrap());
            worst = worst.max((got - want).abs());
            assert!(
                (got - want).abs() < 0.02,
                "{name}: logit of token {id}: {got} vs reference {want}"
            );
        }
        let mean = logits.iter().map(|&v| v as f64).sum::<f64>() / logits.len() as f64;
        assert!(
            (mean - p["logits_mean"].as_f64().unwrap()).abs() < 0.01,
            "{name}: logits mean {mean}"
        );
        eprintln!(
            "{name}: {} input ids equal, top-10 logits within {worst:.1e}",
            input.len()
        );

        // Greedy with the KV cache, compared up to the first near-tie.
        let stable = p["greedy_stable_len"].as_u64().unwrap() as usize;
        let want = ids(&p["greedy_ids"]);
        let mut got = vec![argmax(&logits)];
        while got.len() < stable {
            let l = dec
                .forward(&[*got.last().unwrap()], &mut cache, Logits::Last)
                .unwrap();
            got.push(argmax(&l));
        }
        assert_eq!(got[..stable], want[..stable], "{name}: greedy continuation");
    }
}

fn check_perplexity(model: &Model, refs: &Value) {
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let dec = CpuDecoder::new(model).unwrap();
    for r in refs["perplexity"].as_array().unwrap() {
        let file = root()
            .join("tests/reference/texts")
            .join(r["file"].as_str().unwrap());
        let text = std::fs::read_to_string(file).unwrap();
        let context = r["context"].as_u64().unwrap() as usize;
        let s = perplexity(&dec, &tok, &text, context, &mut |_, _| {
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(s.text_tokens as u64, r["text_tokens"].as_u64().unwrap());
        assert_eq!(
            s.predicted_tokens as u64,
            r["predicted_tokens"].as_u64().unwrap()
        );
        assert_eq!(s.bos_prefixed, r["bos_prefixed"].as_bool().unwrap());
        let want = r["perplexity"].as_f64().unwrap();
        let rel = (s.perplexity - want).abs() / want;
        eprintln!(
            "perplexity {:.4} vs reference {want:.4} ({:.3}%)",
            s.perplexity,
            rel * 100.0
        );
        assert!(
            rel < 0.005,
            "perplexity {} vs reference {want}",
            s.perplexity
        );
    }
}

#[test]
fn smollm2_prompts_match_reference() {
    if let Some(m) = open("SmolLM2-135M-Instruct.Q4_1.gguf") {
        check_prompts(&m, &reference("SmolLM2-135M-Instruct.json"));
    }
}

#[test]
fn smollm2_perplexity_matches_reference() {
    if let Some(m) = open("SmolLM2-135M-Instruct.Q4_1.gguf") {
        check_perplexity(&m, &reference("SmolLM2-135M-Instruct.json"));
    }
}

#[test]
fn gemma3_prompts_match_reference() {
    if let Some(m) = open("gemma-3-270m-Q4_K_M.gguf") {
        check_prompts(&m, &reference("gemma-3-270m.json"));
    }
}

#[test]
fn gemma3_perplexity_matches_reference() {
    if let Some(m) = open("gemma-3-270m-Q4_K_M.gguf") {
        check_perplexity(&m, &reference("gemma-3-270m.json"));
    }
}

#[test]
fn smollm2_fast_generation_keeps_the_reference_greedy_ids() {
    let Some(m) = open("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let refs = reference("SmolLM2-135M-Instruct.json");
    let tok = Tokenizer::from_gguf(m.file()).unwrap();
    let dec = CpuDecoder::with_options(
        &m,
        CpuOptions {
            matvec: MatvecMode::Q8,
            ..Default::default()
        },
    )
    .unwrap();
    for p in refs["prompts"].as_array().unwrap() {
        let input = encode_prompt(&m, &tok, p);
        let stable = p["greedy_stable_len"].as_u64().unwrap() as usize;
        let mut cache = dec.new_cache(input.len() + stable);
        let mut got = vec![argmax(
            &dec.forward(&input, &mut cache, Logits::Last).unwrap(),
        )];
        while got.len() < stable {
            let l = dec
                .forward(&[*got.last().unwrap()], &mut cache, Logits::Last)
                .unwrap();
            got.push(argmax(&l));
        }
        assert_eq!(
            got[..],
            ids(&p["greedy_ids"])[..stable],
            "{}: --fast greedy",
            p["name"]
        );
    }
}

#[test]
fn scoring_is_cancelled_by_its_progress_callback() {
    let Some(m) = open("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let tok = Tokenizer::from_gguf(m.file()).unwrap();
    let dec = CpuDecoder::new(&m).unwrap();
    let text =
        std::fs::read_to_string(root().join("tests/reference/texts/mpl-2.0-head.txt")).unwrap();
    let mut calls = 0;
    let r = perplexity(&dec, &tok, &text, 64, &mut |done, total| {
        calls += 1;
        assert!(done <= total && total > 1);
        ControlFlow::Break(())
    });
    assert!(
        matches!(r, Err(edgetune::Error::Cancelled)),
        "{:?}",
        r.map(|s| s.nll)
    );
    assert_eq!(calls, 1, "stops after the first window");
}

#[test]
fn generation_streams_and_stops_from_its_callback() {
    let Some(m) = open("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let tok = Tokenizer::from_gguf(m.file()).unwrap();
    let dec = CpuDecoder::new(&m).unwrap();
    let prompt = tok.encode("The capital of France is", true).unwrap();
    let opts = GenerateOptions {
        max_tokens: 20,
        ..Default::default()
    };
    // Streamed pieces concatenate to the returned text, which decodes the ids.
    let mut streamed = String::new();
    let g = generate(&dec, &tok, &prompt, &opts, &mut |piece| {
        streamed.push_str(piece);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(g.stop, StopReason::MaxTokens);
    assert_eq!(g.tokens.len(), 20);
    assert_eq!(streamed, g.text);
    assert_eq!(g.text, tok.decode(&g.tokens));
    // Stopping after the third call: three tokens, no more.
    let mut calls = 0;
    let g = generate(&dec, &tok, &prompt, &opts, &mut |_| {
        calls += 1;
        if calls == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!((g.stop, g.tokens.len(), calls), (StopReason::Stopped, 3, 3));
}

#[test]
fn long_prompts_run_in_chunks_with_the_same_result() {
    let Some(m) = open("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let tok = Tokenizer::from_gguf(m.file()).unwrap();
    let dec = CpuDecoder::new(&m).unwrap();
    let text =
        std::fs::read_to_string(root().join("tests/reference/texts/mpl-2.0-head.txt")).unwrap();
    let prompt = tok.encode(&text, false).unwrap()[..600].to_vec();
    // One pass over all 600 tokens.
    let mut cache = dec.new_cache(601);
    let want = argmax(&dec.forward(&prompt, &mut cache, Logits::Last).unwrap());
    // generate() runs them as 512 + 88 and calls back once between chunks.
    let mut calls = 0;
    let opts = GenerateOptions {
        max_tokens: 1,
        ..Default::default()
    };
    let g = generate(&dec, &tok, &prompt, &opts, &mut |_| {
        calls += 1;
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(g.tokens, vec![want]);
    assert_eq!(
        calls, 2,
        "one call after the first chunk, one for the token"
    );
    // Cancelling between chunks.
    let r = generate(&dec, &tok, &prompt, &opts, &mut |_| ControlFlow::Break(()));
    assert!(matches!(r, Err(edgetune::Error::Cancelled)));
}
