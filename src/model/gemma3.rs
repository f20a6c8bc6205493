//! `gemma3` (Gemma 3 text models), as llama.cpp interprets the GGUF:
//! embeddings scaled by √n_embd; per-head RMSNorm of queries and keys;
//! RMSNorm after attention and after the feed-forward, before each residual
//! add; GELU-tanh gating; five sliding-window layers (RoPE base 10 000) for
//! every global one (the file's `rope.freq_base`). Norm weights in the GGUF
//! already include Gemma's `1 +` offset (the converter adds it).

use super::{Activation, BlockShape, DecoderSpec, Rope, RopeKind, Tensors, hparam, hparam_or};
use crate::Result;
use crate::gguf::GgufFile;

/// Every `SWA_PATTERN`-th layer attends globally; the others use the window
/// (llama.cpp: `set_swa_pattern(6)` for gemma3; the GGUF has no key for it).
const SWA_PATTERN: usize = 6;
/// RoPE base of the sliding-window layers (llama.cpp: `rope_freq_base_train_swa`).
const SWA_ROPE_BASE: f32 = 10_000.0;

pub(super) fn spec(file: &GgufFile) -> Result<DecoderSpec> {
    let a = "gemma3";
    let n_embd = hparam(file, a, "embedding_length")?;
    let n_layer = hparam(file, a, "block_count")?;
    let n_head = hparam(file, a, "attention.head_count")?;
    let n_kv_head = hparam_or(file, a, "attention.head_count_kv", n_head)?;
    let n_ff = hparam(file, a, "feed_forward_length")?;
    let head_dim = hparam_or(file, a, "attention.key_length", n_embd / n_head)?;
    let rope_base = file.get_f32("gemma3.rope.freq_base").unwrap_or(1_000_000.0);
    let norm_eps = file
        .get_f32("gemma3.attention.layer_norm_rms_epsilon")
        .unwrap_or(1e-6);
    let window = hparam_or(file, a, "attention.sliding_window", 512)?;
    let context_length = hparam_or(file, a, "context_length", 32768)?;
    let rope_scale = file.get_f32("gemma3.rope.scaling.factor").unwrap_or(1.0);
    if rope_scale != 1.0 {
        return Err(crate::Error::Model(format!(
            "{}: gemma3 RoPE scaling (factor {rope_scale}) is not supported yet",
            file.path().display()
        )));
    }

    let t = Tensors::new(file);
    let token_embd = t.table("token_embd.weight", n_embd)?;
    let n_vocab = token_embd.rows;
    let output = t
        .opt("output.weight", &[n_embd, n_vocab])?
        .unwrap_or_else(|| token_embd.clone());
    let output_norm = t.get("output_norm.weight", &[n_embd])?;
    let q = n_head * head_dim;
    let kv = n_kv_head * head_dim;
    let shape = BlockShape {
        n_embd,
        q_dim: q,
        kv_dim: kv,
        n_ff,
    };
    let layers = (0..n_layer)
        .map(|i| {
            let global = i % SWA_PATTERN == SWA_PATTERN - 1;
            let rope = Rope {
                kind: RopeKind::Halves,
                base: if global { rope_base } else { SWA_ROPE_BASE },
                dims: head_dim,
            };
            let mut l = t.block(i, &shape, rope, (!global).then_some(window))?;
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            l.q_norm = Some(t.get(&n("attn_q_norm"), &[head_dim])?);
            l.k_norm = Some(t.get(&n("attn_k_norm"), &[head_dim])?);
            l.post_attn_norm = Some(t.get(&n("post_attention_norm"), &[n_embd])?);
            l.post_ffn_norm = Some(t.get(&n("post_ffw_norm"), &[n_embd])?);
            Ok(l)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(DecoderSpec {
        arch: a.into(),
        n_embd,
        n_head,
        n_kv_head,
        head_dim,
        n_ff,
        n_vocab,
        context_length,
        norm_eps,
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        embed_scale: Some((n_embd as f32).sqrt()),
        activation: Activation::GeluTanh,
        token_embd,
        output_norm,
        output,
        layers,
    })
}
