//! Many adapters served at once on the real SmolLM2: requests with
//! different adapters decoded in one batch get exactly the tokens they get
//! alone, whatever else is in the batch and whenever they joined it.

mod common;

use common::{open, root};
use edgetune::backend::cpu::{CpuDecoder, CpuOptions, SeqPass};
use edgetune::export::load_adapter;
use edgetune::infer::{
    Batch, BatchEvent, BatchOptions, GenerateOptions, SamplingParams, random_adapter,
};
use edgetune::model::Model;
use edgetune::peft::AdapterWeights;
use edgetune::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::sync::Arc;

struct Request {
    prompt: Vec<u32>,
    adapters: Vec<Arc<AdapterWeights>>,
    opts: GenerateOptions,
}

fn requests(model: &Model, decoder: &CpuDecoder, tok: &Tokenizer) -> Vec<Request> {
    let peft = load_adapter(&root().join("tests/fixtures/peft/smollm2-lora"), model).unwrap();
    // The fixture adapter (layers 0 and 29 only) at full and double strength,
    // and a random adapter on every target of every layer.
    let fixture = Arc::new(AdapterWeights::new(&peft, 1.0));
    let strong = Arc::new(AdapterWeights::new(&peft, 2.0));
    let random = Arc::new(random_adapter(decoder, 8, 10.0, 11));
    // Not stopping at end tokens, so that every request decodes its whole length.
    let greedy = |max_tokens| GenerateOptions {
        max_tokens,
        stop_at_end: false,
        ..GenerateOptions::default()
    };
    let sampled = GenerateOptions {
        max_tokens: 10,
        sampling: SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            seed: 7,
        },
        stop_at_end: false,
    };
    let p = |text: &str| tok.encode(text, true).unwrap();
    vec![
        Request {
            prompt: p("The capital of France is"),
            adapters: vec![],
            opts: greedy(10),
        },
        Request {
            prompt: p("The capital of France is"),
            adapters: vec![random.clone()],
            opts: greedy(10),
        },
        Request {
            prompt: p("My favourite recipe for a quick dinner"),
            adapters: vec![fixture.clone()],
            opts: greedy(8),
        },
        Request {
            prompt: p("Once upon a time"),
            adapters: vec![strong, random.clone()],
            opts: greedy(12),
        },
        Request {
            prompt: p("Once upon a time"),
            adapters: vec![random, fixture],
            opts: sampled,
        },
    ]
}

/// Run `reqs` through one batch, adding request `i` before step `join[i]`;
/// the tokens each produced.
fn serve(
    decoder: &CpuDecoder,
    tok: &Tokenizer,
    reqs: &[&Request],
    join: &[usize],
) -> Vec<Vec<u32>> {
    let mut batch = Batch::new(decoder, tok, BatchOptions::default());
    let mut ids = HashMap::new();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); reqs.len()];
    let mut done = 0;
    for step in 0.. {
        for (i, r) in reqs.iter().enumerate() {
            if join[i] == step {
                let id = batch
                    .add(&r.prompt, r.adapters.clone(), r.opts.clone())
                    .unwrap();
                ids.insert(id, i);
            }
        }
        batch
            .step(&mut |e| {
                if let BatchEvent::Done { id, generation, .. } = e {
                    out[ids[&id]] = generation.tokens;
                    done += 1;
                }
            })
            .unwrap();
        if done == reqs.len() {
            break;
        }
    }
    out
}

fn setup() -> Option<Model> {
    open("SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn a_mixed_batch_gives_each_request_its_tokens_alone() {
    let Some(model) = setup() else {
        return;
    };
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let decoder = CpuDecoder::with_options(
        &model,
        CpuOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let reqs = requests(&model, &decoder, &tok);
    let alone: Vec<Vec<u32>> = reqs
        .iter()
        .map(|r| serve(&decoder, &tok, &[r], &[0]).remove(0))
        .collect();
    for (r, t) in reqs.iter().zip(&alone) {
        assert_eq!(t.len(), r.opts.max_tokens);
    }
    // The adapters change what is generated (else this test proves nothing).
    assert_ne!(alone[0], alone[1], "the random adapter changes the answer");
    assert_ne!(alone[3], alone[4]);

    let all: Vec<&Request> = reqs.iter().collect();
    let together = serve(&decoder, &tok, &all, &[0; 5]);
    assert_eq!(together, alone, "all five in one batch from the start");
    // Joining mid-way (continuous batching), and in another order.
    let staggered = serve(&decoder, &tok, &all, &[3, 0, 5, 1, 0]);
    assert_eq!(staggered, alone, "requests joining at different steps");
    let reversed: Vec<&Request> = reqs.iter().rev().collect();
    let mut back = serve(&decoder, &tok, &reversed, &[0, 2, 0, 4, 1]);
    back.reverse();
    assert_eq!(back, alone, "requests in the opposite order");
}

#[test]
fn batch_invariant_passes_give_the_same_bits_and_match_the_standard_path() {
    let Some(model) = setup() else {
        return;
    };
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let decoder = CpuDecoder::new(&model).unwrap();
    let reqs = requests(&model, &decoder, &tok);
    // Each request's prompt in its own cache, then one token for all of them.
    let mut caches: Vec<_> = reqs
        .iter()
        .map(|r| {
            let mut c = decoder.new_cache(r.prompt.len() + 1);
            let mut s = [SeqPass {
                tokens: &r.prompt,
                cache: &mut c,
                adapters: &r.adapters,
            }];
            decoder.forward_batch(&mut s, false).unwrap();
            c
        })
        .collect();
    let next = [[42u32], [1337], [7], [42], [9000]];
    let step =
        |caches: &mut [edgetune::backend::cpu::KvCache], which: &[usize], invariant: bool| {
            let mut seqs: Vec<SeqPass> = caches
                .iter_mut()
                .zip(which)
                .map(|(c, &i)| SeqPass {
                    tokens: &next[i],
                    cache: c,
                    adapters: &reqs[i].adapters,
                })
                .collect();
            let hidden = decoder.forward_batch(&mut seqs, invariant).unwrap();
            let adapters: Vec<&[Arc<AdapterWeights>]> =
                which.iter().map(|&i| reqs[i].adapters.as_slice()).collect();
            for c in caches.iter_mut() {
                let n = c.len();
                c.truncate(n - 1);
            }
            decoder.logits_batch(&hidden, &adapters, invariant).unwrap()
        };
    let all = [0, 1, 2, 3, 4];
    let batched = step(&mut caches, &all, true);
    let n_vocab = model.spec().n_vocab;
    for i in all {
        let alone = step(&mut caches[i..i + 1], &[i], true);
        let row = &batched[i * n_vocab..(i + 1) * n_vocab];
        assert!(
            alone
                .iter()
                .zip(row)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "request {i}: the batched logits are not the bits of the lone pass"
        );
        // The standard single-token path (as `generate`) differs only in rounding.
        let standard = step(&mut caches[i..i + 1], &[i], false);
        let diff = standard
            .iter()
            .zip(&alone)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            diff < 2e-3,
            "request {i}: invariant and standard logits differ by {diff}"
        );
    }
}
