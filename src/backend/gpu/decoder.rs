//! A model on the GPU: every weight uploaded once in its GGUF block layout
//! (split by rows where a tensor exceeds the binding limit), norm vectors as
//! f32. Sessions ([`super::session`]) hold the KV cache and run the passes.

use super::GpuContext;
use super::matmul::GpuWeight;
use super::session::GpuSession;
use crate::backend::{Decoder, Session};
use crate::model::{DecoderSpec, Model, Weight};
use crate::quant::GgmlType;
use crate::{Error, Result};
use std::ops::ControlFlow;
use std::sync::Arc;

/// The weights of one block on the device.
pub(crate) struct LayerWeights {
    pub wq: GpuWeight,
    pub wk: GpuWeight,
    pub wv: GpuWeight,
    pub wo: GpuWeight,
    pub gate: GpuWeight,
    pub up: GpuWeight,
    pub down: GpuWeight,
    pub attn_norm: wgpu::Buffer,
    pub ffn_norm: wgpu::Buffer,
    pub q_norm: Option<wgpu::Buffer>,
    pub k_norm: Option<wgpu::Buffer>,
    pub post_attn_norm: Option<wgpu::Buffer>,
    pub post_ffn_norm: Option<wgpu::Buffer>,
}

/// A model ready to run on a GPU.
pub struct GpuDecoder<'m> {
    model: &'m Model,
    pub(crate) ctx: Arc<GpuContext>,
    pub(crate) layers: Vec<LayerWeights>,
    pub(crate) token_embd: GpuWeight,
    /// `None` when the output projection is the token embedding (tied).
    pub(crate) output: Option<GpuWeight>,
    pub(crate) output_norm: wgpu::Buffer,
    weight_bytes: u64,
    split: Vec<(String, usize)>,
}

impl<'m> GpuDecoder<'m> {
    /// Upload `model` to the device of `ctx`.
    pub fn new(model: &'m Model, ctx: Arc<GpuContext>) -> Result<Self> {
        GpuDecoder::with_progress(model, ctx, &mut |_, _| ControlFlow::Continue(()))
    }

    /// Upload `model`, calling `progress(layers_done, layers)` after each
    /// block; `Break` cancels.
    pub fn with_progress(
        model: &'m Model,
        ctx: Arc<GpuContext>,
        progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Self> {
        let s = model.spec();
        let mut bytes = 0u64;
        let mut split = Vec::new();
        let mut matrix = |w: &Weight| -> Result<GpuWeight> {
            let g = GpuWeight::upload(&ctx, &w.name, w.ty, w.rows, w.cols, model.data(w))?;
            bytes += g.bytes();
            if g.parts() > 1 {
                split.push((w.name.clone(), g.parts()));
            }
            Ok(g)
        };
        let token_embd = matrix(&s.token_embd)?;
        let output = if s.output.name == s.token_embd.name {
            None
        } else {
            Some(matrix(&s.output)?)
        };
        let mut layers = Vec::with_capacity(s.layers.len());
        for (i, l) in s.layers.iter().enumerate() {
            layers.push(LayerWeights {
                wq: matrix(&l.wq)?,
                wk: matrix(&l.wk)?,
                wv: matrix(&l.wv)?,
                wo: matrix(&l.wo)?,
                gate: matrix(&l.w_gate)?,
                up: matrix(&l.w_up)?,
                down: matrix(&l.w_down)?,
                attn_norm: vector(&ctx, model, &l.attn_norm)?,
                ffn_norm: vector(&ctx, model, &l.ffn_norm)?,
                q_norm: l
                    .q_norm
                    .as_ref()
                    .map(|w| vector(&ctx, model, w))
                    .transpose()?,
                k_norm: l
                    .k_norm
                    .as_ref()
                    .map(|w| vector(&ctx, model, w))
                    .transpose()?,
                post_attn_norm: l
                    .post_attn_norm
                    .as_ref()
                    .map(|w| vector(&ctx, model, w))
                    .transpose()?,
                post_ffn_norm: l
                    .post_ffn_norm
                    .as_ref()
                    .map(|w| vector(&ctx, model, w))
                    .transpose()?,
            });
            if progress(i + 1, s.layers.len()).is_break() {
                return Err(Error::Cancelled);
            }
        }
        let output_norm = vector(&ctx, model, &s.output_norm)?;
        Ok(GpuDecoder {
            model,
            ctx,
            layers,
            token_embd,
            output,
            output_norm,
            weight_bytes: bytes,
            split,
        })
    }

    /// The device.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// Device bytes held by the weights.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Weights split by rows over several bindings (larger than the
    /// device's binding limit), with their part counts.
    pub fn split_weights(&self) -> &[(String, usize)] {
        &self.split
    }

    /// The model's description.
    pub fn spec(&self) -> &DecoderSpec {
        self.model.spec()
    }

    /// The output projection (the token embedding when tied).
    pub(crate) fn output(&self) -> &GpuWeight {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }

    /// An empty session for up to `capacity` tokens.
    pub fn new_session(&self, capacity: usize) -> Result<GpuSession<'_, 'm>> {
        GpuSession::new(self, capacity)
    }
}

/// A norm vector, decoded to f32 on the host (a few KB) and uploaded.
fn vector(ctx: &GpuContext, model: &Model, w: &Weight) -> Result<wgpu::Buffer> {
    let v = model.vector(w)?;
    Ok(ctx.upload(bytemuck::cast_slice(&v), &w.name))
}

impl Decoder for GpuDecoder<'_> {
    fn spec(&self) -> &DecoderSpec {
        self.model.spec()
    }

    fn device_name(&self) -> String {
        let a = self.ctx.adapter();
        format!(
            "gpu: {} ({}{})",
            a.name,
            a.backend,
            if a.software { ", software" } else { "" }
        )
    }

    fn backend(&self) -> &'static str {
        "gpu"
    }

    fn time_matmul(
        &self,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &[u8],
        n_tok: usize,
        reps: usize,
    ) -> Result<f64> {
        super::bench::time_matmul(&self.ctx, ty, rows, cols, data, n_tok, reps)
    }

    fn session(&self, capacity: usize) -> Result<Box<dyn Session + '_>> {
        Ok(Box::new(self.new_session(capacity)?))
    }
}
