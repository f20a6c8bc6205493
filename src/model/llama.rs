//! `llama` (SmolLM2 and kin): GQA, RoPE on adjacent pairs, SwiGLU, optionally
//! tied embeddings.

use super::{Activation, BlockShape, DecoderSpec, Rope, RopeKind, Tensors, hparam, hparam_or};
use crate::Result;
use crate::gguf::GgufFile;

pub(super) fn spec(file: &GgufFile) -> Result<DecoderSpec> {
    let a = "llama";
    let n_embd = hparam(file, a, "embedding_length")?;
    let n_layer = hparam(file, a, "block_count")?;
    let n_head = hparam(file, a, "attention.head_count")?;
    let n_kv_head = hparam_or(file, a, "attention.head_count_kv", n_head)?;
    let n_ff = hparam(file, a, "feed_forward_length")?;
    let head_dim = n_embd / n_head;
    let rope_dims = hparam_or(file, a, "rope.dimension_count", head_dim)?;
    unsupported_rope(file)?;
    if hparam_or(file, a, "attention.key_length", head_dim)? != head_dim {
        return Err(crate::Error::Model(format!(
            "{}: llama.attention.key_length differs from embedding_length / head_count: not supported yet",
            file.path().display()
        )));
    }
    let rope_base = file.get_f32("llama.rope.freq_base").unwrap_or(10_000.0);
    let norm_eps = file
        .get_f32("llama.attention.layer_norm_rms_epsilon")
        .unwrap_or(1e-5);
    let context_length = hparam_or(file, a, "context_length", 2048)?;

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
    let shape = BlockShape {
        n_embd,
        q_dim: n_head * head_dim,
        kv_dim: kv,
        n_ff,
    };
    let layers = (0..n_layer)
        .map(|i| t.block(i, &shape, rope, None))
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

/// RoPE variants this decoder does not implement (Llama 3.1+ frequency
/// factors, linear/YaRN scaling) are refused rather than run with wrong logits.
fn unsupported_rope(file: &GgufFile) -> Result<()> {
    let what = if file.tensor("rope_freqs.weight").is_some() {
        Some("RoPE frequency factors (rope_freqs.weight, Llama 3.1+)".to_string())
    } else if let Some(t) = file
        .get_str("llama.rope.scaling.type")
        .filter(|t| *t != "none")
    {
        Some(format!("RoPE scaling `{t}`"))
    } else {
        file.get_f32("llama.rope.scaling.factor")
            .filter(|f| *f != 1.0 && *f != 0.0)
            .map(|f| format!("RoPE scaling factor {f}"))
    };
    match what {
        Some(w) => Err(crate::Error::Model(format!(
            "{}: {w} is not supported yet",
            file.path().display()
        ))),
        None => Ok(()),
    }
}
