//! Architectures: hyper-parameters from GGUF metadata and the layer recipe
//! that turns a file's tensors into a decoder.
//!
//! Each supported architecture has one file (`llama.rs`, `gemma3.rs`) that
//! reads its metadata and names its tensors, producing a [`DecoderSpec`]: a
//! plain description of every layer (which weights, which norms, which RoPE,
//! which attention window). Backends execute a `DecoderSpec`; this module
//! runs nothing itself.

mod gemma3;
mod llama;
mod summary;
pub mod tiny;

pub use summary::ModelSummary;

use crate::gguf::{GgufFile, TensorInfo};
use crate::quant::GgmlType;
use crate::{Error, Result};
use std::path::Path;

/// A weight matrix of a linear layer, `[rows = n_out, cols = n_in]`, stored
/// row-major in its GGUF block format inside the memory map.
#[derive(Debug, Clone)]
pub struct Weight {
    /// The tensor's name in the file.
    pub name: String,
    /// Element type.
    pub ty: GgmlType,
    /// Output features (GGML `ne[1]`).
    pub rows: usize,
    /// Input features (GGML `ne[0]`): the length of one stored row.
    pub cols: usize,
    /// The tensor's header entry (locates its bytes in the map).
    info: TensorInfo,
}

impl Weight {
    fn from_info(t: &TensorInfo) -> Self {
        let rows = t.dims.iter().skip(1).product::<u64>() as usize;
        Weight {
            name: t.name.clone(),
            ty: t.ty,
            rows,
            cols: t.dims[0] as usize,
            info: t.clone(),
        }
    }

    /// Bytes of one stored row.
    pub fn row_bytes(&self) -> usize {
        self.info.n_bytes as usize / self.rows.max(1)
    }

    /// Number of parameters.
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }
}

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeKind {
    /// Adjacent pairs `(x[2i], x[2i+1])` — llama.cpp's `LLAMA_ROPE_TYPE_NORM`
    /// (llama's converter permutes q/k rows so this matches HF's halves).
    Adjacent,
    /// Halves `(x[i], x[i + d/2])` — GPT-NeoX style, used by Gemma.
    Halves,
}

/// The gated feed-forward activation: `act(gate) * up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU), llama.
    Silu,
    /// GELU with the tanh approximation (GeGLU), Gemma.
    GeluTanh,
}

/// Rotary position embedding of one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// Pairing of dimensions.
    pub kind: RopeKind,
    /// Frequency base θ.
    pub base: f32,
    /// Number of leading dimensions of each head that are rotated.
    pub dims: usize,
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    /// RMSNorm before attention.
    pub attn_norm: Weight,
    /// Query projection, `[n_head·head_dim, n_embd]`.
    pub wq: Weight,
    /// Key projection, `[n_kv_head·head_dim, n_embd]`.
    pub wk: Weight,
    /// Value projection, `[n_kv_head·head_dim, n_embd]`.
    pub wv: Weight,
    /// Attention output projection, `[n_embd, n_head·head_dim]`.
    pub wo: Weight,
    /// Per-head RMSNorm of queries (Gemma 3).
    pub q_norm: Option<Weight>,
    /// Per-head RMSNorm of keys (Gemma 3).
    pub k_norm: Option<Weight>,
    /// RMSNorm of the attention output before the residual add (Gemma 3).
    pub post_attn_norm: Option<Weight>,
    /// RMSNorm before the feed-forward.
    pub ffn_norm: Weight,
    /// Gate projection, `[n_ff, n_embd]`.
    pub w_gate: Weight,
    /// Up projection, `[n_ff, n_embd]`.
    pub w_up: Weight,
    /// Down projection, `[n_embd, n_ff]`.
    pub w_down: Weight,
    /// RMSNorm of the feed-forward output before the residual add (Gemma 3).
    pub post_ffn_norm: Option<Weight>,
    /// This layer's rotary embedding.
    pub rope: Rope,
    /// Sliding attention window: a query at position `i` sees keys at `j`
    /// with `i - j < window`; `None` for full causal attention.
    pub window: Option<usize>,
}

/// A decoder-only transformer, described layer by layer.
#[derive(Debug, Clone)]
pub struct DecoderSpec {
    /// Architecture name as in `general.architecture`.
    pub arch: String,
    /// Hidden size.
    pub n_embd: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (GQA when fewer than `n_head`).
    pub n_kv_head: usize,
    /// Dimension of each head.
    pub head_dim: usize,
    /// Feed-forward inner size.
    pub n_ff: usize,
    /// Vocabulary size.
    pub n_vocab: usize,
    /// Training context length.
    pub context_length: usize,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
    /// Scale of attention scores (usually `1/√head_dim`).
    pub attn_scale: f32,
    /// Multiplier applied to token embeddings (`√n_embd` for Gemma).
    pub embed_scale: Option<f32>,
    /// Feed-forward gate activation.
    pub activation: Activation,
    /// Token embedding table, `[n_vocab, n_embd]`.
    pub token_embd: Weight,
    /// Final RMSNorm.
    pub output_norm: Weight,
    /// Output projection, `[n_vocab, n_embd]` (the token embedding when tied).
    pub output: Weight,
    /// The blocks, in order.
    pub layers: Vec<LayerSpec>,
}

/// A model: the open GGUF file and the decoder read from it.
pub struct Model {
    file: GgufFile,
    spec: DecoderSpec,
}

impl Model {
    /// Open a GGUF file and read its architecture. Tensor data stays mapped.
    pub fn open(path: impl AsRef<Path>) -> Result<Model> {
        Model::from_file(GgufFile::open(path)?)
    }

    /// Read the architecture of an already open file.
    pub fn from_file(file: GgufFile) -> Result<Model> {
        let spec = DecoderSpec::from_file(&file)?;
        Ok(Model { file, spec })
    }

    /// The layer-by-layer description.
    pub fn spec(&self) -> &DecoderSpec {
        &self.spec
    }

    /// The underlying file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// A weight's bytes, borrowed from the memory map.
    pub fn data(&self, w: &Weight) -> &[u8] {
        self.file.tensor_data(&w.info)
    }

    /// A weight that is a plain vector (norms): its values as f32.
    pub fn vector(&self, w: &Weight) -> Result<Vec<f32>> {
        let mut out = vec![0.0; w.numel()];
        crate::quant::dequantize_row(w.ty, self.data(w), &mut out)?;
        Ok(out)
    }
}

/// Sizes of a block's standard tensors.
pub(crate) struct BlockShape {
    pub n_embd: usize,
    /// `n_head · head_dim`.
    pub q_dim: usize,
    /// `n_kv_head · head_dim`.
    pub kv_dim: usize,
    pub n_ff: usize,
}

/// Tensor lookup with errors that name the file and tensor.
pub(crate) struct Tensors<'a> {
    file: &'a GgufFile,
}

impl<'a> Tensors<'a> {
    pub(crate) fn new(file: &'a GgufFile) -> Self {
        Tensors { file }
    }

    /// A required tensor with exactly these GGML dims.
    pub(crate) fn get(&self, name: &str, dims: &[usize]) -> Result<Weight> {
        let t = self.file.tensor(name).ok_or_else(|| {
            Error::Model(format!(
                "{}: missing tensor `{name}`",
                self.file.path().display()
            ))
        })?;
        let got: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        if got != dims {
            return Err(Error::Model(format!(
                "{}: tensor `{name}` has shape {got:?}, expected {dims:?}",
                self.file.path().display()
            )));
        }
        Ok(Weight::from_info(t))
    }

    /// A required 2-D table with rows of `cols` elements and any number of
    /// rows (token embeddings).
    pub(crate) fn table(&self, name: &str, cols: usize) -> Result<Weight> {
        let rows = self
            .file
            .tensor(name)
            .and_then(|t| t.dims.get(1).copied())
            .unwrap_or(0);
        self.get(name, &[cols, rows as usize])
    }

    /// Block `i`'s standard tensors (`blk.{i}.attn_norm` … `ffn_down`, llama.cpp
    /// names), with no optional norms: architectures add theirs.
    pub(crate) fn block(
        &self,
        i: usize,
        s: &BlockShape,
        rope: Rope,
        window: Option<usize>,
    ) -> Result<LayerSpec> {
        let n = |name: &str| format!("blk.{i}.{name}.weight");
        Ok(LayerSpec {
            attn_norm: self.get(&n("attn_norm"), &[s.n_embd])?,
            wq: self.get(&n("attn_q"), &[s.n_embd, s.q_dim])?,
            wk: self.get(&n("attn_k"), &[s.n_embd, s.kv_dim])?,
            wv: self.get(&n("attn_v"), &[s.n_embd, s.kv_dim])?,
            wo: self.get(&n("attn_output"), &[s.q_dim, s.n_embd])?,
            q_norm: None,
            k_norm: None,
            post_attn_norm: None,
            ffn_norm: self.get(&n("ffn_norm"), &[s.n_embd])?,
            w_gate: self.get(&n("ffn_gate"), &[s.n_embd, s.n_ff])?,
            w_up: self.get(&n("ffn_up"), &[s.n_embd, s.n_ff])?,
            w_down: self.get(&n("ffn_down"), &[s.n_ff, s.n_embd])?,
            post_ffn_norm: None,
            rope,
            window,
        })
    }

    /// An optional tensor (absent is fine, a wrong shape is not).
    pub(crate) fn opt(&self, name: &str, dims: &[usize]) -> Result<Option<Weight>> {
        if self.file.tensor(name).is_none() {
            return Ok(None);
        }
        self.get(name, dims).map(Some)
    }
}

/// A required integer hyper-parameter `<arch>.<key>`, in `1..=2²⁴`.
pub(crate) fn hparam(file: &GgufFile, arch: &str, key: &str) -> Result<usize> {
    let full = format!("{arch}.{key}");
    check_hparam(file, &full, file.require_u64(&full)?)
}

/// An optional integer hyper-parameter `<arch>.<key>` (else `default`), in `1..=2²⁴`.
pub(crate) fn hparam_or(file: &GgufFile, arch: &str, key: &str, default: usize) -> Result<usize> {
    let full = format!("{arch}.{key}");
    match file.get(&full) {
        None => Ok(default),
        Some(_) => check_hparam(file, &full, file.require_u64(&full)?),
    }
}

fn check_hparam(file: &GgufFile, full: &str, v: u64) -> Result<usize> {
    if v == 0 || v > (1 << 24) {
        return Err(Error::Model(format!(
            "{}: `{full}` = {v} is out of range",
            file.path().display()
        )));
    }
    Ok(v as usize)
}

impl DecoderSpec {
    /// Read the decoder of a supported architecture from `file`'s metadata
    /// and tensor table, checking every shape.
    pub fn from_file(file: &GgufFile) -> Result<DecoderSpec> {
        let arch = file.require_str("general.architecture")?;
        let spec = match arch {
            "llama" => llama::spec(file)?,
            "gemma3" => gemma3::spec(file)?,
            other => {
                return Err(Error::Model(format!(
                    "{}: architecture `{other}` is not supported (supported: llama, gemma3)",
                    file.path().display()
                )));
            }
        };
        spec.validate(file)?;
        Ok(spec)
    }

    /// Every weight the decoder reads, once each (a tied output matrix is
    /// the embeddings): embeddings, output norm and matrix, then each block's.
    pub fn weights(&self) -> Vec<&Weight> {
        let mut all = vec![&self.token_embd, &self.output_norm, &self.output];
        for l in &self.layers {
            all.extend([
                &l.attn_norm,
                &l.wq,
                &l.wk,
                &l.wv,
                &l.wo,
                &l.ffn_norm,
                &l.w_gate,
                &l.w_up,
                &l.w_down,
            ]);
            all.extend(
                [&l.q_norm, &l.k_norm, &l.post_attn_norm, &l.post_ffn_norm]
                    .into_iter()
                    .flatten(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        all.retain(|w| seen.insert(w.name.as_str()));
        all
    }

    /// The weight the decoder reads under `name`.
    pub fn weight(&self, name: &str) -> Option<&Weight> {
        self.weights().into_iter().find(|w| w.name == name)
    }

    /// Number of parameters in the file's tensors that the decoder uses
    /// (a tied output matrix counted once).
    pub fn n_params(&self) -> usize {
        self.weights().into_iter().map(Weight::numel).sum()
    }

    fn validate(&self, file: &GgufFile) -> Result<()> {
        if !self.head_dim.is_multiple_of(2)
            || self.n_kv_head == 0
            || !self.n_head.is_multiple_of(self.n_kv_head)
        {
            return Err(Error::Model(format!(
                "{}: {} heads of dimension {} cannot share {} key/value heads",
                file.path().display(),
                self.n_head,
                self.head_dim,
                self.n_kv_head
            )));
        }
        for l in &self.layers {
            if l.rope.dims > self.head_dim || !l.rope.dims.is_multiple_of(2) {
                return Err(Error::Model(format!(
                    "{}: rope dimension count {} does not fit head dimension {}",
                    file.path().display(),
                    l.rope.dims,
                    self.head_dim
                )));
            }
        }
        Ok(())
    }
}
