//! `llama` (SmolLM2 and kin): GQA, RoPE on adjacent pairs, SwiGLU, optionally
//! tied embeddings.

use super::{Activation, DecoderSpec, LayerSpec, Rope, RopeKind, Tensors, hparam};
use crate::Result;
use crate::gguf::GgufFile;

pub(super) fn spec(file: &GgufFile) -> Result<DecoderSpec> {
    let a = "llama";
    let n_embd = hparam(file, a, "embedding_length")?;
    let n_layer = hparam(file, a, "block_count")?;
    let n_head = hparam(file, a, "attention.head_count")?;
    let n_kv_head = file
        .get_u64("llama.attention.head_count_kv")
        .map_or(n_head, |v| v as usize);
    let n_ff = hparam(file, a, "feed_forward_length")?;
    let head_dim = n_embd / n_head;
    let rope_dims = file
        .get_u64("llama.rope.dimension_count")
        .map_or(head_dim, |v| v as usize);
    let rope_base = file.get_f32("llama.rope.freq_base").unwrap_or(10_000.0);
    let norm_eps = file
        .get_f32("llama.attention.layer_norm_rms_epsilon")
        .unwrap_or(1e-5);
    let context_length = file
        .get_u64("llama.context_length")
        .map_or(2048, |v| v as usize);

    let t = Tensors::new(file);
    let token_embd = t.table("token_embd.weight", n_embd)?;
    let n_vocab = token_embd.rows;
    let output = t
        .opt("output.weight", &[n_embd, n_vocab])?
        .unwrap_or_else(|| token_embd.clone());
    let output_norm = t.get("output_norm.weight", &[n_embd])?;
    let kv = n_kv_head * head_dim;
    let rope = Rope {
        kind: RopeKind::Adjacent,
        base: rope_base,
        dims: rope_dims,
    };
    let layers = (0..n_layer)
        .map(|i| {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            Ok(LayerSpec {
                attn_norm: t.get(&n("attn_norm"), &[n_embd])?,
                wq: t.get(&n("attn_q"), &[n_embd, n_head * head_dim])?,
                wk: t.get(&n("attn_k"), &[n_embd, kv])?,
                wv: t.get(&n("attn_v"), &[n_embd, kv])?,
                wo: t.get(&n("attn_output"), &[n_head * head_dim, n_embd])?,
                q_norm: None,
                k_norm: None,
                post_attn_norm: None,
                ffn_norm: t.get(&n("ffn_norm"), &[n_embd])?,
                w_gate: t.get(&n("ffn_gate"), &[n_embd, n_ff])?,
                w_up: t.get(&n("ffn_up"), &[n_embd, n_ff])?,
                w_down: t.get(&n("ffn_down"), &[n_ff, n_embd])?,
                post_ffn_norm: None,
                rope,
                window: None,
            })
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
        embed_scale: None,
        activation: Activation::Silu,
        token_embd,
        output_norm,
        output,
        layers,
    })
}
