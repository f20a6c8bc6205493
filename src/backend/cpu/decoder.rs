//! Executes a [`DecoderSpec`] on the CPU: embeddings, blocks, final norm,
//! logits, with a KV cache. Weights are read from the memory map and decoded
//! per band or per row; only norm vectors (a few KB) are kept as f32.

use super::attention::{AttnShape, attention};
use super::invariant;
use super::matmul::{MatvecMode, QMatrix, matmul_with};
use super::ops::{add_assign, gated_activation, rms_norm, rope};
use crate::backend::Logits;
use crate::model::{DecoderSpec, Model, Weight};
use crate::peft::AdapterWeights;
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

    /// Keys and values of layer `layer` for the tokens held, `(len, kv)` each.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let n = self.len * self.kv_row;
        (&self.k[layer][..n], &self.v[layer][..n])
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        2 * self.k.len() * self.capacity * self.kv_row * 4
    }
}

/// One sequence of a [`CpuDecoder::forward_batch`] pass.
pub struct SeqPass<'a> {
    /// Tokens to append.
    pub tokens: &'a [u32],
    /// The sequence's cache; the tokens go after what it holds.
    pub cache: &'a mut KvCache,
    /// Adapters of this sequence (applied after the decoder's own).
    pub adapters: &'a [Arc<AdapterWeights>],
}

/// Where one sequence's rows sit in a batched pass.
struct SeqRows<'a> {
    start: usize,
    len: usize,
    pos0: usize,
    adapters: &'a [Arc<AdapterWeights>],
}

impl SeqRows<'_> {
    fn rows<'x>(&self, x: &'x [f32], width: usize) -> &'x [f32] {
        &x[self.start * width..(self.start + self.len) * width]
    }

    fn rows_mut<'x>(&self, x: &'x mut [f32], width: usize) -> &'x mut [f32] {
        &mut x[self.start * width..(self.start + self.len) * width]
    }
}

/// The sequences' adapters of a pass, grouped so that each adapter runs
/// once over all rows that use it (Punica's gathered products): level `i`
/// holds the `i`-th adapter of every stack, so each row still receives its
/// adapters in its own order.
#[derive(Default)]
struct AdapterGroups<'a> {
    /// Per level: each adapter with the rows using it, ascending.
    levels: Vec<Vec<(&'a AdapterWeights, Vec<usize>)>>,
}

impl<'a> AdapterGroups<'a> {
    fn new(seqs: &[SeqRows<'a>]) -> Self {
        let mut levels: Vec<Vec<(&'a AdapterWeights, Vec<usize>)>> = Vec::new();
        for seq in seqs {
            for (i, a) in seq.adapters.iter().enumerate() {
                if levels.len() <= i {
                    levels.push(Vec::new());
                }
                let rows = seq.start..seq.start + seq.len;
                match levels[i].iter_mut().find(|(b, _)| std::ptr::eq(*b, &**a)) {
                    Some((_, r)) => r.extend(rows),
                    None => levels[i].push((&**a, rows.collect())),
                }
            }
        }
        AdapterGroups { levels }
    }

    /// `out (·, n_out) += Δ(x (·, n_in))` of `base` for every group. The
    /// groups of a level, split into chunks of rows, run in parallel; each
    /// chunk's change is added to its rows afterwards (the same single
    /// addition per output as applying in place).
    fn apply(
        &self,
        base: &str,
        x: &[f32],
        n_in: usize,
        out: &mut [f32],
        n_out: usize,
        invariant: bool,
    ) {
        use rayon::prelude::*;
        let chunk = if invariant { 8 } else { 64 };
        for level in &self.levels {
            let tasks: Vec<(&AdapterWeights, &[usize])> = level
                .iter()
                .filter(|(a, _)| a.adapts(base))
                .flat_map(|(a, rows)| rows.chunks(chunk).map(move |c| (*a, c)))
                .collect();
            let deltas: Vec<Vec<f32>> = tasks
                .par_iter()
                .map(|(a, rows)| {
                    let mut xg = Vec::with_capacity(rows.len() * n_in);
                    for &r in rows.iter() {
                        xg.extend_from_slice(&x[r * n_in..(r + 1) * n_in]);
                    }
                    let mut d = vec![0.0; rows.len() * n_out];
                    a.apply_with(base, &xg, &mut d, invariant);
                    d
                })
                .collect();
            for ((_, rows), d) in tasks.iter().zip(&deltas) {
                for (&r, dr) in rows.iter().zip(d.chunks_exact(n_out)) {
                    let o = &mut out[r * n_out..(r + 1) * n_out];
                    o.iter_mut().zip(dr).for_each(|(o, d)| *o += d);
                }
            }
        }
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
    adapters: Vec<Arc<AdapterWeights>>,
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

    /// `out = x·Wᵀ` over all rows of a pass, then the decoder's adapters on
    /// every row and each sequence's own adapters on its rows.
    /// `invariant`: batch-invariant products (see [`CpuDecoder::forward_batch`]).
    fn matmul(
        &self,
        x: &[f32],
        w: &Weight,
        out: &mut [f32],
        groups: &AdapterGroups,
        invariant: bool,
    ) {
        let q = self.qmatrix(w);
        // (IA)³-style input scales of the decoder's adapters, multiplied.
        let mut scaled: Option<Vec<f32>> = None;
        for a in &self.adapters {
            if let Some(v) = a.in_scale(&w.name) {
                let xs = scaled.get_or_insert_with(|| x.to_vec());
                for row in xs.chunks_exact_mut(v.len()) {
                    row.iter_mut().zip(&v).for_each(|(x, v)| *x *= v);
                }
            }
        }
        let x = scaled.as_deref().unwrap_or(x);
        if invariant {
            invariant::matmul(x, &q, out);
        } else {
            matmul_with(x, &q, out, self.matvec);
        }
        for a in &self.adapters {
            a.apply_site(&w.name, x, out, invariant);
        }
        groups.apply(&w.name, x, w.cols, out, w.rows, invariant);
    }

    /// The decoder's adapters' scales of the norm `w`, on `x`.
    fn norm_effects(&self, w: &Weight, x: &mut [f32]) {
        for a in &self.adapters {
            a.apply_norm(&w.name, x);
        }
    }

    /// Add an adapter to every pass (adapters stack, each with the strength
    /// it was loaded with).
    pub fn add_adapter(&mut self, adapter: Arc<AdapterWeights>) {
        self.adapters.push(adapter);
    }

    /// The model's description.
    pub fn spec(&self) -> &DecoderSpec {
        self.model.spec()
    }

    /// Virtual tokens the decoder's adapters put first in every cache
    /// (prompt and prefix tuning).
    pub fn virtual_rows(&self) -> usize {
        self.adapters
            .iter()
            .map(|a| a.virtual_rows())
            .max()
            .unwrap_or(0)
    }

    /// Fill an empty cache with the adapters' virtual tokens: run prompt
    /// tuning's embeddings through the layers, or copy prefix tuning's keys
    /// and values in.
    fn prime(&self, cache: &mut KvCache) -> Result<()> {
        let n = self.virtual_rows();
        if n == 0 || !cache.is_empty() {
            return Ok(());
        }
        if self
            .adapters
            .iter()
            .filter(|a| a.virtual_rows() > 0)
            .count()
            > 1
        {
            return Err(Error::Invalid(
                "two adapters put virtual tokens first (prompt or prefix tuning): apply one of \
                 them at a time"
                    .into(),
            ));
        }
        let s = self.spec();
        let prompt = self
            .adapters
            .iter()
            .find_map(|a| a.prefix(&s.token_embd.name));
        if let Some(e) = prompt {
            let dummy = vec![0u32; n];
            let mut seqs = [SeqPass {
                tokens: &dummy,
                cache,
                adapters: &[],
            }];
            self.run_layers_from(&mut seqs, false, Some(e.to_vec()))?;
            return Ok(());
        }
        crate::backend::check_tokens(s, &vec![0; n], 0, cache.capacity)?;
        let kv = cache.kv_row;
        for (li, l) in s.layers.iter().enumerate() {
            for a in &self.adapters {
                if let Some(k) = a.prefix(&l.wk.name) {
                    cache.k[li][..n * kv].copy_from_slice(&k[..n * kv]);
                }
                if let Some(v) = a.prefix(&l.wv.name) {
                    cache.v[li][..n * kv].copy_from_slice(&v[..n * kv]);
                }
            }
        }
        cache.len = n;
        Ok(())
    }

    /// An empty cache for up to `capacity` tokens (and the adapters'
    /// virtual tokens, which take its first slots).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let capacity = capacity + self.virtual_rows();
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

    fn qmatrix(&self, w: &Weight) -> QMatrix<'m> {
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
        let mut seqs = [SeqPass {
            tokens,
            cache,
            adapters: &[],
        }];
        self.pool.install(|| self.run_layers(&mut seqs, false))
    }

    /// One pass over several sequences at once: each appends its tokens to
    /// its own cache and applies its own adapters (on top of the decoder's),
    /// while every frozen product runs once over the rows of all of them.
    /// Returns the final-norm hidden states of all rows, in order
    /// `(Σ n_tok, n_embd)`.
    ///
    /// `invariant` computes every product with the batch-invariant kernels
    /// ([`invariant`]): each row gets the same bits whatever else is in the
    /// pass, so a request decoded in a batch gets the tokens it gets alone
    /// (in another invariant pass). Otherwise products take the fastest
    /// path for the number of rows (row dot products below 4 rows, a GEMM
    /// from 4), whose last bits depend on that number.
    pub fn forward_batch(&self, seqs: &mut [SeqPass<'_>], invariant: bool) -> Result<Vec<f32>> {
        self.pool.install(|| self.run_layers(seqs, invariant))
    }

    fn run_layers(&self, seqs: &mut [SeqPass<'_>], invariant: bool) -> Result<Vec<f32>> {
        for seq in seqs.iter_mut() {
            self.prime(seq.cache)?;
        }
        self.run_layers_from(seqs, invariant, None)
    }

    /// [`CpuDecoder::run_layers`] from the embeddings `x0` instead of the
    /// tokens' when given.
    fn run_layers_from(
        &self,
        seqs: &mut [SeqPass<'_>],
        invariant: bool,
        x0: Option<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let s = self.spec();
        if seqs.is_empty() {
            return Err(Error::Invalid(
                "a batched pass needs at least one sequence".into(),
            ));
        }
        let mut tokens = Vec::new();
        let mut rows = Vec::with_capacity(seqs.len());
        for seq in seqs.iter() {
            let cache = &seq.cache;
            if cache.k.len() != s.layers.len() || cache.kv_row != s.n_kv_head * s.head_dim {
                return Err(Error::Invalid(
                    "this KV cache was made for another model".into(),
                ));
            }
            crate::backend::check_tokens(s, seq.tokens, cache.len, cache.capacity)?;
            if let Some(a) = seq.adapters.iter().find(|a| !a.is_additive()) {
                return Err(Error::Invalid(format!(
                    "an adapter of a batched sequence rescales activations ({} tensors): batched \
                     requests take adapters that add a term (LoRA, PiSSA, VeRA, LoHa, LoKr); \
                     merge this one into the model (`edgetune merge`) to serve it",
                    a.len()
                )));
            }
            rows.push(SeqRows {
                start: tokens.len(),
                len: seq.tokens.len(),
                pos0: cache.len,
                adapters: seq.adapters,
            });
            tokens.extend_from_slice(seq.tokens);
        }
        let n = tokens.len();
        let (d, e) = (s.head_dim, s.n_embd);
        let (q_dim, kv_dim) = (s.n_head * d, s.n_kv_head * d);
        let mut x = match x0 {
            Some(x) => x,
            None => self.embed(&tokens)?,
        };
        let mut h = vec![0.0; n * e];
        let mut q = vec![0.0; n * q_dim];
        let mut k = vec![0.0; n * kv_dim];
        let mut v = vec![0.0; n * kv_dim];
        let mut att = vec![0.0; n * q_dim];
        let mut o = vec![0.0; n * e];
        let mut gate = vec![0.0; n * s.n_ff];
        let mut up = vec![0.0; n * s.n_ff];
        let groups = AdapterGroups::new(&rows);
        let mm =
            |x: &[f32], w: &Weight, out: &mut [f32]| self.matmul(x, w, out, &groups, invariant);
        for (li, (l, norms)) in s.layers.iter().zip(&self.norms).enumerate() {
            h.copy_from_slice(&x);
            rms_norm(&mut h, &norms.attn, s.norm_eps);
            self.norm_effects(&l.attn_norm, &mut h);
            mm(&h, &l.wq, &mut q);
            mm(&h, &l.wk, &mut k);
            mm(&h, &l.wv, &mut v);
            if let (Some(w), Some(wk)) = (&norms.k, &l.k_norm) {
                rms_norm(&mut k, w, s.norm_eps);
                self.norm_effects(wk, &mut k);
            }
            if let (Some(w), Some(wq)) = (&norms.q, &l.q_norm) {
                rms_norm(&mut q, w, s.norm_eps);
                self.norm_effects(wq, &mut q);
            }
            let shape = AttnShape {
                n_head: s.n_head,
                n_kv_head: s.n_kv_head,
                head_dim: d,
                scale: s.attn_scale,
                window: l.window,
            };
            for (r, seq) in rows.iter().zip(seqs.iter_mut()) {
                let (kr, vr) = (r.rows_mut(&mut k, kv_dim), r.rows(&v, kv_dim));
                rope(kr, r.len, d, r.pos0, &l.rope);
                let span = r.pos0 * kv_dim..(r.pos0 + r.len) * kv_dim;
                seq.cache.k[li][span.clone()].copy_from_slice(kr);
                seq.cache.v[li][span].copy_from_slice(vr);
                let qr = r.rows_mut(&mut q, q_dim);
                rope(qr, r.len, d, r.pos0, &l.rope);
                let (kc, vc) = (&seq.cache.k[li], &seq.cache.v[li]);
                attention(qr, kc, vc, r.pos0, &shape, r.rows_mut(&mut att, q_dim));
            }
            mm(&att, &l.wo, &mut o);
            if let (Some(w), Some(wp)) = (&norms.post_attn, &l.post_attn_norm) {
                rms_norm(&mut o, w, s.norm_eps);
                self.norm_effects(wp, &mut o);
            }
            for a in &self.adapters {
                a.apply_sublayer(&l.wo.name, &h, &mut o);
            }
            add_assign(&mut x, &o);

            h.copy_from_slice(&x);
            rms_norm(&mut h, &norms.ffn, s.norm_eps);
            self.norm_effects(&l.ffn_norm, &mut h);
            mm(&h, &l.w_gate, &mut gate);
            mm(&h, &l.w_up, &mut up);
            gated_activation(&mut gate, &up, s.activation);
            mm(&gate, &l.w_down, &mut o);
            if let (Some(w), Some(wp)) = (&norms.post_ffn, &l.post_ffn_norm) {
                rms_norm(&mut o, w, s.norm_eps);
                self.norm_effects(wp, &mut o);
            }
            for a in &self.adapters {
                a.apply_sublayer(&l.w_down.name, &h, &mut o);
            }
            add_assign(&mut x, &o);
        }
        for (r, seq) in rows.iter().zip(seqs.iter_mut()) {
            seq.cache.len = r.pos0 + r.len;
        }
        rms_norm(&mut x, &self.output_norm, s.norm_eps);
        self.norm_effects(&s.output_norm, &mut x);
        Ok(x)
    }

    /// Logits of the rows of `hidden` (`(n, n_embd)`), each row with its own
    /// adapters on the output matrix (`adapters[i]` for row `i`). `invariant`
    /// as in [`CpuDecoder::forward_batch`].
    pub fn logits_batch(
        &self,
        hidden: &[f32],
        adapters: &[&[Arc<AdapterWeights>]],
        invariant: bool,
    ) -> Result<Vec<f32>> {
        let s = self.spec();
        if hidden.len() != adapters.len() * s.n_embd {
            return Err(Error::Invalid(format!(
                "{} hidden values for {} rows of {}",
                hidden.len(),
                adapters.len(),
                s.n_embd
            )));
        }
        let rows: Vec<SeqRows> = adapters
            .iter()
            .enumerate()
            .map(|(i, a)| SeqRows {
                start: i,
                len: 1,
                pos0: 0,
                adapters: a,
            })
            .collect();
        let groups = AdapterGroups::new(&rows);
        let mut out = vec![0.0; adapters.len() * s.n_vocab];
        self.pool
            .install(|| self.matmul(hidden, &s.output, &mut out, &groups, invariant));
        Ok(out)
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
        self.pool.install(|| {
            self.matmul(
                hidden,
                &s.output,
                &mut out,
                &AdapterGroups::default(),
                false,
            )
        });
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
