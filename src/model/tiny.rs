//! Tiny random llama and gemma3 models written with the project's own GGUF
//! writer, for tests and examples: small enough to run in milliseconds and
//! to check against naive formulas or finite differences.

use crate::gguf::{GgufWriter, Value};
use crate::quant::{self, GgmlType};
use std::path::Path;

/// Shape of a tiny model.
#[derive(Debug, Clone)]
pub struct Cfg {
    /// Architecture name.
    pub arch: &'static str,
    /// Hidden size.
    pub n_embd: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Feed-forward size.
    pub n_ff: usize,
    /// Vocabulary size.
    pub n_vocab: usize,
    /// Blocks.
    pub n_layer: usize,
    /// Sliding window of gemma3 layers.
    pub window: usize,
    /// Format of the matrices.
    pub ty: GgmlType,
}

impl Cfg {
    /// A small llama: GQA (4 query heads, 2 key/value heads), head_dim 16.
    pub fn llama(ty: GgmlType, n_layer: usize) -> Cfg {
        Cfg {
            arch: "llama",
            n_embd: 64,
            n_head: 4,
            n_kv: 2,
            head_dim: 16,
            n_ff: 96,
            n_vocab: 50,
            n_layer,
            window: 0,
            ty,
        }
    }

    /// A small gemma3 of six layers (five sliding, one global): one
    /// key/value head, head_dim 32.
    pub fn gemma3(ty: GgmlType, window: usize) -> Cfg {
        Cfg {
            arch: "gemma3",
            n_embd: 64,
            n_head: 2,
            n_kv: 1,
            head_dim: 32,
            n_ff: 128,
            n_vocab: 40,
            n_layer: 6,
            window,
            ty,
        }
    }
}

/// Deterministic pseudo-random values in [-scale, scale).
pub fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Write the model; return every tensor as the f32 values a reader decodes.
pub fn write_model(c: &Cfg, path: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    let mut w = GgufWriter::new();
    let a = c.arch;
    w.add_metadata("general.architecture", Value::String(a.into()));
    w.add_metadata(format!("{a}.embedding_length"), Value::U32(c.n_embd as u32));
    w.add_metadata(format!("{a}.block_count"), Value::U32(c.n_layer as u32));
    w.add_metadata(
        format!("{a}.attention.head_count"),
        Value::U32(c.n_head as u32),
    );
    w.add_metadata(
        format!("{a}.attention.head_count_kv"),
        Value::U32(c.n_kv as u32),
    );
    w.add_metadata(
        format!("{a}.feed_forward_length"),
        Value::U32(c.n_ff as u32),
    );
    w.add_metadata(format!("{a}.context_length"), Value::U32(64));
    w.add_metadata(
        format!("{a}.rope.freq_base"),
        Value::F32(if a == "gemma3" { 1e6 } else { 1e4 }),
    );
    w.add_metadata(
        format!("{a}.attention.layer_norm_rms_epsilon"),
        Value::F32(1e-6),
    );
    if a == "gemma3" {
        w.add_metadata("gemma3.attention.key_length", Value::U32(c.head_dim as u32));
        w.add_metadata(
            "gemma3.attention.sliding_window",
            Value::U32(c.window as u32),
        );
    }
    let mut out = std::collections::HashMap::new();
    let mut seed = 1;
    let mut add = |w: &mut GgufWriter, name: String, dims: &[usize], ty: GgmlType, base: f32| {
        seed += 1;
        let n: usize = dims.iter().product();
        let mut v = values(seed, n, 0.5);
        if base != 0.0 {
            v.iter_mut().for_each(|x| *x = base + 0.2 * *x);
        }
        let d64: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        w.add_f32_tensor(name.clone(), &d64, ty, &v)
            .expect("tiny model");
        // What a reader sees: decode row by row.
        let mut decoded = vec![0.0; n];
        let rb = ty.row_bytes(dims[0]).expect("tiny model");
        let mut buf = vec![0u8; rb];
        for (src, dst) in v.chunks(dims[0]).zip(decoded.chunks_mut(dims[0])) {
            quant::quantize_row(ty, src, &mut buf).expect("tiny model");
            quant::dequantize_row(ty, &buf, dst).expect("tiny model");
        }
        out.insert(name, decoded);
    };
    let (e, q, kv) = (c.n_embd, c.n_head * c.head_dim, c.n_kv * c.head_dim);
    add(
        &mut w,
        "token_embd.weight".into(),
        &[e, c.n_vocab],
        c.ty,
        0.0,
    );
    add(
        &mut w,
        "output_norm.weight".into(),
        &[e],
        GgmlType::F32,
        1.0,
    );
    for i in 0..c.n_layer {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        add(&mut w, n("attn_norm"), &[e], GgmlType::F32, 1.0);
        add(&mut w, n("attn_q"), &[e, q], c.ty, 0.0);
        add(&mut w, n("attn_k"), &[e, kv], c.ty, 0.0);
        add(&mut w, n("attn_v"), &[e, kv], c.ty, 0.0);
        add(&mut w, n("attn_output"), &[q, e], c.ty, 0.0);
        add(&mut w, n("ffn_norm"), &[e], GgmlType::F32, 1.0);
        add(&mut w, n("ffn_gate"), &[e, c.n_ff], c.ty, 0.0);
        add(&mut w, n("ffn_up"), &[e, c.n_ff], c.ty, 0.0);
        add(&mut w, n("ffn_down"), &[c.n_ff, e], c.ty, 0.0);
        if a == "gemma3" {
            add(&mut w, n("attn_q_norm"), &[c.head_dim], GgmlType::F32, 1.0);
            add(&mut w, n("attn_k_norm"), &[c.head_dim], GgmlType::F32, 1.0);
            add(&mut w, n("post_attention_norm"), &[e], GgmlType::F32, 1.0);
            add(&mut w, n("post_ffw_norm"), &[e], GgmlType::F32, 1.0);
        }
    }
    w.write_file(path).expect("tiny model");
    out
}
