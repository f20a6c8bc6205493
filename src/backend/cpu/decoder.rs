//! Executes a [`DecoderSpec`] on the CPU: embeddings, blocks, final norm,
//! logits, with a KV cache. Weights are read from the memory map and decoded
//! per band or per row; only norm vectors (a few KB) are kept as f32.

use super::attention::{AttnShape, attention};
use super::matmul::{MatvecMode, QMatrix, matmul_with};
use super::ops::{add_assign, gated_activation, rms_norm, rope};
use crate::backend::Logits;
use crate::model::{DecoderSpec, Model, Weight};
use crate::{Error, Result};
use std::sync::Arc;

/// Keys and values of every layer for the tokens seen so far.
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
    kv_row: usize,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no token has been run.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most tokens this cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forget every token (keeps the allocation).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Forget tokens after the first `len`.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        2 * self.k.len() * self.capacity * self.kv_row * 4
    }
}

/// Norm vectors of one layer, decoded once.
struct LayerNorms {
    attn: Vec<f32>,
    ffn: Vec<f32>,
    q: Option<Vec<f32>>,
    k: Option<Vec<f32>>,
    post_attn: Option<Vec<f32>>,
    post_ffn: Option<Vec<f32>>,
}

/// How a [`CpuDecoder`] runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuOptions {
    /// Worker threads (`0`: one per core).
    pub threads: usize,
    /// How single-token products are computed.
    pub matvec: MatvecMode,
}

/// A model ready to run on the CPU.
pub struct CpuDecoder<'m> {
    model: &'m Model,
    norms: Vec<LayerNorms>,
    output_norm: Vec<f32>,
    matvec: MatvecMode,
    adapters: Vec<std::sync::Arc<crate::peft::lora::LoraWeights>>,
    /// The decoder's own workers. A whole pass runs inside `pool.install`
    /// (one hand-off per pass), so the hundreds of small parallel loops of a
    /// single-token step are forked from a worker and do not each inject a job
    /// from outside the pool and put the caller to sleep.
    pool: Arc<rayon::ThreadPool>,
}

/// Most worker threads a decoder accepts (far more than any CPU here has; a
/// larger number is a typo, and would exhaust memory spawning threads).
pub const MAX_THREADS: usize = 1024;

/// A thread pool of `threads` workers (`0`: one per core).
pub(crate) fn thread_pool(threads: usize) -> Result<Arc<rayon::ThreadPool>> {
    if threads > MAX_THREADS {
        return Err(Error::Invalid(format!(
            "{threads} worker threads requested; at most {MAX_THREADS} are allowed"
        )));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("edgetune-cpu-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| Error::Invalid(format!("cannot start {threads} CPU worker threads: {e}")))
}

impl<'m> CpuDecoder<'m> {
    /// Prepare `model` with default options (decodes only the norm vectors).
    pub fn new(model: &'m Model) -> Result<Self> {
        CpuDecoder::with_options(model, CpuOptions::default())
    }

    /// Prepare `model` to run with `options`.
    pub fn with_options(model: &'m Model, options: CpuOptions) -> Result<Self> {
        let opt = |w: &Option<Weight>| w.as_ref().map(|w| model.vector(w)).transpose();
        let norms = model
            .spec()
            .layers
            .iter()
            .map(|l| {
                Ok(LayerNorms {
                    attn: model.vector(&l.attn_norm)?,
                    ffn: model.vector(&l.ffn_norm)?,
                    q: opt(&l.q_norm)?,
                    k: opt(&l.k_norm)?,
                    post_attn: opt(&l.post_attn_norm)?,
                    post_ffn: opt(&l.post_ffn_norm)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let output_norm = model.vector(&model.spec().output_norm)?;
        Ok(CpuDecoder {
            model,
            norms,
            output_norm,
            matvec: options.matvec,
            adapters: Vec::new(),
            pool: thread_pool(options.threads)?,
        })
    }

    /// Run `f` on the decoder's workers.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// How single-token products are computed.
    pub fn matvec_mode(&self) -> MatvecMode {
        self.matvec
    }

    /// Worker threads.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    fn matmul(&self, x: &[f32], w: &'m Weight, out: &mut [f32]) {
        matmul_with(x, &self.qmatrix(w), out, self.matvec);
        for a in &self.adapters {
            a.apply(&w.name, x, out);
        }
    }

    /// Add a LoRA adapter to every pass (adapters stack, each with the
    /// strength it was loaded with).
    pub fn add_adapter(&mut self, adapter: std::sync::Arc<crate::peft::lora::LoraWeights>) {
        self.adapters.push(adapter);
    }

    /// The model's description.
    pub fn spec(&self) -> &DecoderSpec {
        self.model.spec()
    }

    /// An empty cache for up to `capacity` tokens.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let s = self.spec();
        let kv_row = s.n_kv_head * s.head_dim;
        let n = s.layers.len();
        KvCache {
            k: (0..n).map(|_| vec![0.0; capacity * kv_row]).collect(),
            v: (0..n).map(|_| vec![0.0; capacity * kv_row]).collect(),
            len: 0,
            capacity,
            kv_row,
        }
    }

    fn qmatrix(&self, w: &'m Weight) -> QMatrix<'m> {
        QMatrix::new(w.ty, w.rows, w.cols, self.model.data(w))
            .expect("weight shape validated at load")
    }

    /// Token embeddings (scaled where the architecture says so): `(n_tok, n_embd)`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let s = self.spec();
        let table = self.qmatrix(&s.token_embd);
        let mut x = vec![0.0; tokens.len() * s.n_embd];
        for (&t, row) in tokens.iter().zip(x.chunks_exact_mut(s.n_embd)) {
            if t as usize >= s.n_vocab {
                return Err(Error::Invalid(format!(
                    "token id {t} is outside the vocabulary (size {})",
                    s.n_vocab
                )));
            }
            table.dequantize_row(t as usize, row);
            if let Some(k) = s.embed_scale {
                row.iter_mut().for_each(|v| *v *= k);
            }
        }
        Ok(x)
    }

    /// Run `tokens` at the positions after those in `cache`, append their keys
    /// and values, and return the final-norm hidden states `(n_tok, n_embd)`.
    pub fn forward_hidden(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        self.pool.install(|| self.run_layers(tokens, cache))
    }

    fn run_layers(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let s = self.spec();
        let n = tokens.len();
        if n == 0 {
            return Err(Error::Invalid(
                "a forward pass needs at least one token".into(),
            ));
        }
        if cache.k.len() != s.layers.len() || cache.kv_row != s.n_kv_head * s.head_dim {
            return Err(Error::Invalid(
                "this KV cache was made for another model".into(),
            ));
        }
        let pos0 = cache.len;
        if pos0 + n > cache.capacity {
            return Err(Error::Invalid(format!(
                "{} tokens do not fit the context: {pos0} already held, capacity {}",
                n, cache.capacity
            )));
        }
        let (d, e) = (s.head_dim, s.n_embd);
        let (q_dim, kv_dim) = (s.n_head * d, s.n_kv_head * d);
        let mut x = self.embed(tokens)?;
        let mut h = vec![0.0; n * e];
        let mut q = vec![0.0; n * q_dim];
        let mut att = vec![0.0; n * q_dim];
        let mut o = vec![0.0; n * e];
        let mut gate = vec![0.0; n * s.n_ff];
        let mut up = vec![0.0; n * s.n_ff];
        for (li, (l, norms)) in s.layers.iter().zip(&self.norms).enumerate() {
            h.copy_from_slice(&x);
            rms_norm(&mut h, &norms.attn, s.norm_eps);
            self.matmul(&h, &l.wq, &mut q);
            let kc = &mut cache.k[li][pos0 * kv_dim..(pos0 + n) * kv_dim];
            self.matmul(&h, &l.wk, kc);
            if let Some(w) = &norms.k {
                rms_norm(kc, w, s.norm_eps);
            }
            rope(kc, n, d, pos0, &l.rope);
            let vc = &mut cache.v[li][pos0 * kv_dim..(pos0 + n) * kv_dim];
            self.matmul(&h, &l.wv, vc);
            if let Some(w) = &norms.q {
                rms_norm(&mut q, w, s.norm_eps);
            }
            rope(&mut q, n, d, pos0, &l.rope);
            let shape = AttnShape {
                n_head: s.n_head,
                n_kv_head: s.n_kv_head,
                head_dim: d,
                scale: s.attn_scale,
                window: l.window,
            };
            attention(&q, &cache.k[li], &cache.v[li], pos0, &shape, &mut att);
            self.matmul(&att, &l.wo, &mut o);
            if let Some(w) = &norms.post_attn {
                rms_norm(&mut o, w, s.norm_eps);
            }
            add_assign(&mut x, &o);

            h.copy_from_slice(&x);
            rms_norm(&mut h, &norms.ffn, s.norm_eps);
            self.matmul(&h, &l.w_gate, &mut gate);
            self.matmul(&h, &l.w_up, &mut up);
            gated_activation(&mut gate, &up, s.activation);
            self.matmul(&gate, &l.w_down, &mut o);
            if let Some(w) = &norms.post_ffn {
                rms_norm(&mut o, w, s.norm_eps);
            }
            add_assign(&mut x, &o);
        }
        cache.len += n;
        rms_norm(&mut x, &self.output_norm, s.norm_eps);
        Ok(x)
    }

    /// Logits of hidden states `(n, n_embd)`: `(n, n_vocab)`.
    pub fn logits(&self, hidden: &[f32]) -> Result<Vec<f32>> {
        let s = self.spec();
        if !hidden.len().is_multiple_of(s.n_embd) {
            return Err(Error::Invalid(format!(
                "{} hidden values are not rows of {}",
                hidden.len(),
                s.n_embd
            )));
        }
        let n = hidden.len() / s.n_embd;
        let mut out = vec![0.0; n * s.n_vocab];
        self.pool
            .install(|| self.matmul(hidden, &s.output, &mut out));
        Ok(out)
    }

    /// Run `tokens` after the cache's contents and return logits.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, which: Logits) -> Result<Vec<f32>> {
        let hidden = self.forward_hidden(tokens, cache)?;
        match which {
            Logits::All => self.logits(&hidden),
            Logits::Last => self.logits(&hidden[(tokens.len() - 1) * self.spec().n_embd..]),
        }
    }
}
