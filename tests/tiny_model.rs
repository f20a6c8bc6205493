//! Tiny llama and gemma3 models written with edgetune's own GGUF writer,
//! run by the CPU backend and checked against a naive f64 forward pass
//! written here from the formulas, and batched against incremental decoding.

use edgetune::backend::cpu::{CpuDecoder, CpuOptions, Logits, MatvecMode};
use edgetune::backend::gpu::{GpuContext, GpuDecoder, GpuOptions};
use edgetune::backend::{Decoder, Pick, Session, argmax};
use edgetune::gguf::{GgufWriter, Value};
use edgetune::model::Model;
use edgetune::model::tiny::{Cfg, write_model};
use edgetune::quant::GgmlType;

fn rms(x: &[f64], w: &[f32]) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + 1e-6).sqrt();
    x.iter().zip(w).map(|(v, &g)| v * inv * g as f64).collect()
}

/// y = W x with W stored `[rows, cols]` row-major.
fn lin(w: &[f32], x: &[f64]) -> Vec<f64> {
    w.chunks(x.len())
        .map(|r| r.iter().zip(x).map(|(&a, b)| a as f64 * b).sum())
        .collect()
}

/// Naive forward of one whole sequence: logits at every position.
fn naive(
    c: &Cfg,
    t: &std::collections::HashMap<String, Vec<f32>>,
    tokens: &[u32],
) -> Vec<Vec<f64>> {
    let gemma = c.arch == "gemma3";
    let (e, d) = (c.n_embd, c.head_dim);
    let emb = &t["token_embd.weight"];
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&id| {
            let s = if gemma { (e as f64).sqrt() } else { 1.0 };
            emb[id as usize * e..(id as usize + 1) * e]
                .iter()
                .map(|&v| v as f64 * s)
                .collect()
        })
        .collect();
    for l in 0..c.n_layer {
        let g = |s: &str| &t[&format!("blk.{l}.{s}.weight")];
        let global = !gemma || l % 6 == 5;
        let base: f64 = if gemma {
            if global { 1e6 } else { 1e4 }
        } else {
            1e4
        };
        let rope = |v: &mut [f64], pos: usize| {
            for h in v.chunks_mut(d) {
                for i in 0..d / 2 {
                    let ang = pos as f64 * base.powf(-2.0 * i as f64 / d as f64);
                    let (a, b) = if gemma {
                        (i, i + d / 2)
                    } else {
                        (2 * i, 2 * i + 1)
                    };
                    let (x0, x1) = (h[a], h[b]);
                    h[a] = x0 * ang.cos() - x1 * ang.sin();
                    h[b] = x0 * ang.sin() + x1 * ang.cos();
                }
            }
        };
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let h = rms(x, g("attn_norm"));
            let mut q = lin(g("attn_q"), &h);
            let mut k = lin(g("attn_k"), &h);
            if gemma {
                q = q
                    .chunks(d)
                    .flat_map(|hq| rms(hq, g("attn_q_norm")))
                    .collect();
                k = k
                    .chunks(d)
                    .flat_map(|hk| rms(hk, g("attn_k_norm")))
                    .collect();
            }
            rope(&mut q, pos);
            rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(lin(g("attn_v"), &h));
        }
        for (i, x) in xs.iter_mut().enumerate() {
            let mut att = vec![0.0; c.n_head * d];
            for hh in 0..c.n_head {
                let kvh = hh / (c.n_head / c.n_kv);
                let visible: Vec<usize> = (0..=i).filter(|&j| global || i - j < c.window).collect();
                let sc: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        (0..d)
                            .map(|z| qs[i][hh * d + z] * ks[j][kvh * d + z])
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|s| (s - m).exp()).sum();
                for (&j, s) in visible.iter().zip(&sc) {
                    let p = (s - m).exp() / z;
                    for zz in 0..d {
                        att[hh * d + zz] += p * vs[j][kvh * d + zz];
                    }
                }
            }
            let mut o = lin(g("attn_output"), &att);
            if gemma {
                o = rms(&o, g("post_attention_norm"));
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = rms(x, g("ffn_norm"));
            let gate = lin(g("ffn_gate"), &h);
            let up = lin(g("ffn_up"), &h);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(&a, &u)| {
                    let f = if gemma {
                        0.5 * a
                            * (1.0
                                + ((2.0 / std::f64::consts::PI).sqrt()
                                    * (a + 0.044715 * a * a * a))
                                    .tanh())
                    } else {
                        a / (1.0 + (-a).exp())
                    };
                    f * u
                })
                .collect();
            let mut dn = lin(g("ffn_down"), &act);
            if gemma {
                dn = rms(&dn, g("post_ffw_norm"));
            }
            x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
        }
    }
    xs.iter()
        .map(|x| lin(emb, &rms(x, &t["output_norm.weight"])))
        .collect()
}

fn check(c: Cfg) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let tensors = write_model(&c, &path);
    let model = Model::open(&path).unwrap();
    let dec = CpuDecoder::new(&model).unwrap();
    let tokens: Vec<u32> = (0..11).map(|i| (i * 7 + 3) % c.n_vocab as u32).collect();
    let want = naive(&c, &tensors, &tokens);

    // Logits of position `p` (rows of `got`, starting at position `p0`) close to naive.
    let close = |what: &str, got: &[f32], p0: usize| {
        for (row, p) in got.chunks(c.n_vocab).zip(p0..) {
            for (v, (&g, &n)) in row.iter().zip(&want[p]).enumerate() {
                let g = g as f64;
                assert!(
                    (g - n).abs() < 2e-3 * (1.0 + n.abs()),
                    "{} {:?} {what} pos {p} vocab {v}: {g} vs naive {n}",
                    c.arch,
                    c.ty
                );
            }
        }
    };
    // Batched: all positions in one pass (the GEMM path).
    let mut cache = dec.new_cache(16);
    close(
        "batched",
        &dec.forward(&tokens, &mut cache, Logits::All).unwrap(),
        0,
    );
    // Two batches: 5 tokens, then 6 more after them (the GEMM path with a
    // non-empty cache).
    let mut cache = dec.new_cache(16);
    dec.forward(&tokens[..5], &mut cache, Logits::All).unwrap();
    close(
        "second batch",
        &dec.forward(&tokens[5..], &mut cache, Logits::All).unwrap(),
        5,
    );
    // Incremental: one token at a time through the cache (the dot-product path).
    let mut cache = dec.new_cache(16);
    for (p, &tok) in tokens.iter().enumerate() {
        close(
            "incremental",
            &dec.forward(&[tok], &mut cache, Logits::Last).unwrap(),
            p,
        );
    }
}

#[test]
fn tiny_llama_matches_naive_forward() {
    for ty in [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q4_1] {
        check(Cfg::llama(ty, 2));
    }
}

#[test]
fn tiny_gemma3_matches_naive_forward_with_sliding_window() {
    // Six layers: five sliding (window 4 < 11 tokens) and one global.
    for ty in [GgmlType::F32, GgmlType::Q8_0] {
        check(Cfg::gemma3(ty, 4));
    }
}

#[test]
fn bad_token_and_full_context_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let c = Cfg::llama(GgmlType::F32, 1);
    write_model(&c, &path);
    let model = Model::open(&path).unwrap();
    let dec = CpuDecoder::new(&model).unwrap();
    let mut cache = dec.new_cache(4);
    let e = dec.forward(&[50], &mut cache, Logits::Last).unwrap_err();
    assert!(e.to_string().contains("token id 50"), "{e}");
    let e = dec
        .forward(&[1, 2, 3, 4, 5], &mut cache, Logits::Last)
        .unwrap_err();
    assert!(e.to_string().contains("do not fit"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", Value::String("llama".into()));
    for (k, v) in [
        ("embedding_length", 64),
        ("block_count", 1),
        ("attention.head_count", 4),
        ("feed_forward_length", 96),
    ] {
        w.add_metadata(format!("llama.{k}"), Value::U32(v));
    }
    w.add_f32_tensor(
        "token_embd.weight",
        &[64, 10],
        GgmlType::F32,
        &vec![0.0; 640],
    )
    .unwrap();
    w.write_file(&path).unwrap();
    let e = Model::open(&path)
        .err()
        .expect("a model without layers must not open");
    assert!(e.to_string().contains("output_norm.weight"), "{e}");
}

#[test]
fn fast_matvec_stays_close_to_exact_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let c = Cfg::llama(GgmlType::Q4_1, 2);
    write_model(&c, &path);
    let model = Model::open(&path).unwrap();
    let exact = CpuDecoder::with_options(
        &model,
        CpuOptions {
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let fast = CpuDecoder::with_options(
        &model,
        CpuOptions {
            matvec: MatvecMode::Q8,
            ..Default::default()
        },
    )
    .unwrap();
    let (mut c1, mut c2) = (exact.new_cache(8), fast.new_cache(8));
    let mut differs = false;
    // One step: later steps compound the rounding through the cache, and a
    // random untrained model amplifies it (the real model is checked against
    // the reference greedy ids in reference_models.rs).
    for tok in [3u32] {
        let a = exact.forward(&[tok], &mut c1, Logits::Last).unwrap();
        let b = fast.forward(&[tok], &mut c2, Logits::Last).unwrap();
        let range = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(&b) {
            // 8-bit activations in a random (untrained) model: a few % of the range.
            assert!((x - y).abs() < 0.05 * range, "{x} vs {y} (range {range})");
            differs |= x != y;
        }
    }
    assert!(differs, "Q8 mode must take the 8-bit path");
}

/// The GPU backend (any adapter, software included) with storage bindings
/// capped at `max_binding` bytes, or `None` (skipped) without one unless
/// `EDGETUNE_REQUIRE_GPU` is set.
fn gpu(max_binding: Option<u64>) -> Option<std::sync::Arc<GpuContext>> {
    match GpuContext::new(&GpuOptions {
        allow_software: true,
        max_binding,
        ..Default::default()
    }) {
        Ok(c) => Some(c),
        Err(e) if std::env::var_os("EDGETUNE_REQUIRE_GPU").is_some() => {
            panic!("EDGETUNE_REQUIRE_GPU is set but no GPU opens: {e}")
        }
        Err(e) => {
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

/// The whole decoder on the GPU against the CPU backend on a tiny model:
/// every position's logits (in one pass, and as two passes over the cache),
/// greedy picks one token at a time, and per-token losses.
fn gpu_matches_cpu(c: Cfg, max_binding: Option<u64>, n_tok: usize) -> usize {
    let Some(ctx) = gpu(max_binding) else {
        return 0;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_model(&c, &path);
    let model = Model::open(&path).unwrap();
    let cpu = CpuDecoder::new(&model).unwrap();
    let gpu = GpuDecoder::new(&model, ctx).unwrap();
    let tokens: Vec<u32> = (0..n_tok as u32)
        .map(|i| (i * 7 + 3) % c.n_vocab as u32)
        .collect();
    let what = format!("{} {:?} ({n_tok} tokens)", c.arch, c.ty);
    let close = |got: &[f32], want: &[f32], how: &str| {
        assert_eq!(got.len(), want.len(), "{what} {how}");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what} {how} [{i}]: gpu {g} vs cpu {w}"
            );
        }
    };
    let want = cpu
        .session(n_tok)
        .unwrap()
        .forward(&tokens, Logits::All)
        .unwrap();
    let mut s = gpu.session(n_tok).unwrap();
    close(&s.forward(&tokens, Logits::All).unwrap(), &want, "one pass");
    s.clear();
    let half = n_tok / 2;
    let mut two = s.forward(&tokens[..half], Logits::All).unwrap();
    two.extend(s.forward(&tokens[half..], Logits::All).unwrap());
    close(&two, &want, "two passes");
    // Greedy, one token at a time after a 3-token prompt, where the CPU's
    // top two logits are not within rounding of each other.
    let mut s = gpu.session(n_tok).unwrap();
    let mut cs = cpu.session(n_tok).unwrap();
    let mut feed = tokens[..3].to_vec();
    for _ in 0..4 {
        let l = cs.forward(&feed, Logits::Last).unwrap();
        let mut sorted = l.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let got = s.forward_pick(&feed, &Pick::Greedy).unwrap();
        if sorted[0] - sorted[1] > 1e-3 {
            assert_eq!(got, argmax(&l), "{what} greedy");
        }
        feed = vec![argmax(&l)];
    }
    // Losses of each next token.
    let (inp, tgt) = (&tokens[..n_tok - 1], &tokens[1..]);
    let want = cpu.session(n_tok).unwrap().forward_nll(inp, tgt).unwrap();
    let got = gpu.session(n_tok).unwrap().forward_nll(inp, tgt).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() < 1e-4 * (1.0 + w.abs()),
            "{what} nll {g} vs {w}"
        );
    }
    // A profile of one step times every dispatch of it, by kernel.
    let mut s = gpu.new_session(n_tok).unwrap();
    let prof = s.profile(1).unwrap();
    let launches: usize = prof.iter().map(|(_, n, _)| n).sum();
    assert_eq!(launches, s.dispatches_per_token(), "{what} profile");
    assert!(
        prof.iter().any(|(k, _, _)| k.contains("attention")),
        "{prof:?}"
    );
    assert!(s.is_empty(), "profiling leaves the session empty");
    gpu.split_weights().len()
}

#[test]
fn tiny_models_on_the_gpu_match_the_cpu_with_split_tensors() {
    // 8 KiB bindings: the 12.8 KB f32 token table is split in two.
    let split = gpu_matches_cpu(Cfg::llama(GgmlType::F32, 2), Some(8192), 11);
    if gpu(None).is_some() {
        assert!(split > 0, "the f32 token embedding must be split");
    }
    gpu_matches_cpu(Cfg::llama(GgmlType::Q4_1, 2), Some(8192), 11);
    gpu_matches_cpu(Cfg::gemma3(GgmlType::Q8_0, 4), Some(8192), 11);
}

#[test]
fn a_long_prompt_on_the_gpu_runs_as_several_passes() {
    // More than one pass of 512 tokens, and a sliding window far behind.
    gpu_matches_cpu(Cfg::gemma3(GgmlType::Q4_0, 16), None, 600);
}
