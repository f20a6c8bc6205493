//! Fold adapters into a base model: `W' = W + Σ sᵢ·Bᵢ·Aᵢ` for LoRA, and the
//! same for every method whose effect is a change of weights (DoRA's
//! per-row magnitude, (IA)³'s and norm tuning's scales, LoHa's and LoKr's
//! dense updates), written as a whole GGUF model that needs no adapter at
//! run time. Prompt and prefix tuning and bottleneck adapters add
//! computation no weight holds: merging one is refused, naming it.
//!
//! Only the adapted tensors change: each is decoded to f32, the effects
//! are folded in ([`AdapterWeights::fold_into`]), and the result is encoded
//! in the chosen type. Every
//! other tensor and all metadata are copied byte for byte. Re-encoding in
//! the base's own quantized type adds a rounding error on top of the
//! adapter (the update is often smaller than one quantization step, so
//! part of it is lost); f16 keeps it. [`logit_error`] measures the
//! difference a merge makes against the base with the adapter applied.

use super::gguf_lora::LoraFile;
use crate::backend::Logits;
use crate::backend::cpu::CpuDecoder;
use crate::gguf::{GgufWriter, Value, ValueType};
use crate::model::Model;
use crate::peft::AdapterWeights;
use crate::quant::{GgmlType, dequantize_row};
use crate::{Error, Result};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

/// The type of the merged tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeType {
    /// IEEE half precision: the update survives (11 significant bits).
    F16,
    /// 8-bit blocks of 32: half the size of f16, with more rounding error.
    Q8_0,
    /// Each tensor's own type in the base model (smallest file; re-quantizing
    /// rounds part of the update away).
    Same,
}

/// What a merge did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    /// Tensors that received an update, with the type written.
    pub merged: Vec<(String, GgmlType)>,
    /// Tensors copied unchanged.
    pub copied: usize,
    /// Bytes of tensor data written.
    pub data_bytes: u64,
}

/// Merge LoRA `adapters` (each with a strength) into `model`'s tensors and
/// write the whole model to `out` atomically. `progress(done, total)` is
/// called per tensor; returning `Break` cancels before anything is written.
pub fn merge(
    model: &Model,
    adapters: &[(LoraFile, f32)],
    ty: MergeType,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<MergeReport> {
    let mut named = Vec::new();
    for (lora, strength) in adapters {
        lora.check_base(model.file())?;
        named.push((
            lora_name(lora, *strength),
            AdapterWeights::new(lora, *strength),
        ));
    }
    let refs: Vec<(String, &AdapterWeights)> = named.iter().map(|(n, w)| (n.clone(), w)).collect();
    merge_weights(model, &refs, ty, out, progress)
}

/// `general.name:strength` of a LoRA file, for the merged model's metadata.
fn lora_name(l: &LoraFile, strength: f32) -> String {
    let name = l
        .metadata
        .iter()
        .find(|(k, _)| k == "general.name")
        .map_or("adapter", |(_, v)| v.as_str());
    format!("{name}:{strength}")
}

/// [`merge`] for adapters of any method, loaded for inference (at their
/// strengths) and named for the merged model's metadata.
pub fn merge_weights(
    model: &Model,
    adapters: &[(String, &AdapterWeights)],
    ty: MergeType,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<MergeReport> {
    let file = model.file();
    let mut updates: HashMap<&str, Vec<&AdapterWeights>> = HashMap::new();
    for (_, a) in adapters {
        for base in a.bases() {
            if file.tensor(base).is_none() {
                return Err(Error::Invalid(format!(
                    "the adapter changes {base}, which the model does not have"
                )));
            }
            updates.entry(base).or_default().push(a);
        }
    }
    if updates.is_empty() {
        return Err(Error::Invalid(
            "nothing to merge: the adapters change no tensor".into(),
        ));
    }
    let mut w = GgufWriter::new();
    for (key, value) in file.metadata() {
        match value {
            // The reader does not keep an empty array's element type.
            Value::Array(a) if a.is_empty() => w.add_array(key.clone(), ValueType::U32, vec![])?,
            v => w.add_metadata(key.clone(), v.clone()),
        }
    }
    let names: Vec<&str> = adapters.iter().map(|(n, _)| n.as_str()).collect();
    w.add_metadata("edgetune.merged_adapters", Value::String(names.join(", ")));
    let mut report = MergeReport {
        merged: Vec::new(),
        copied: 0,
        data_bytes: 0,
    };
    let total = file.tensors().len();
    for (i, t) in file.tensors().iter().enumerate() {
        if progress(i, total).is_break() {
            return Err(Error::Cancelled);
        }
        let data = file.tensor_data(t);
        let Some(ups) = updates.get(t.name.as_str()) else {
            w.add_tensor(t.name.clone(), &t.dims, t.ty, data.to_vec())?;
            report.copied += 1;
            report.data_bytes += data.len() as u64;
            continue;
        };
        let n_in = t.dims[0] as usize;
        let n_out = t.dims.get(1).map_or(1, |&d| d as usize);
        let mut wf = vec![0.0f32; n_in * n_out];
        let row_bytes = t.ty.row_bytes(n_in).ok_or_else(|| {
            Error::Invalid(format!(
                "tensor '{}': rows of {n_in} do not fit {}",
                t.name,
                t.ty.name()
            ))
        })?;
        for (src, dst) in data.chunks_exact(row_bytes).zip(wf.chunks_exact_mut(n_in)) {
            dequantize_row(t.ty, src, dst)?;
        }
        for a in ups {
            a.fold_into(&t.name, &mut wf, n_out, n_in)?;
        }
        // Input scales scale what every adapter's terms read: last.
        for a in ups {
            if let Some(v) = a.in_scale(&t.name) {
                for row in wf.chunks_exact_mut(n_in) {
                    row.iter_mut().zip(&v).for_each(|(w, v)| *w *= v);
                }
            }
        }
        let out_ty = match ty {
            // Vectors (norms) keep f32, as converters write them.
            _ if n_out == 1 => GgmlType::F32,
            MergeType::F16 => GgmlType::F16,
            MergeType::Q8_0 if n_in.is_multiple_of(GgmlType::Q8_0.block_size()) => GgmlType::Q8_0,
            // Rows that do not split into blocks of 32 stay f16.
            MergeType::Q8_0 => GgmlType::F16,
            MergeType::Same => t.ty,
        };
        w.add_f32_tensor(t.name.clone(), &t.dims, out_ty, &wf)?;
        report.data_bytes += out_ty.row_bytes(n_in).unwrap_or(0) as u64 * n_out as u64;
        report.merged.push((t.name.clone(), out_ty));
    }
    let _ = progress(total, total);
    w.write_file(out)?;
    Ok(report)
}

/// How far a merged model's logits are from the base model with the same
/// adapters applied at run time, over the last-position logits of `prompts`
/// (token ids): (largest |Δ|, mean |Δ|).
pub fn logit_error(
    base: &Model,
    adapters: &[(LoraFile, f32)],
    merged: &Model,
    prompts: &[Vec<u32>],
) -> Result<(f64, f64)> {
    let weights: Vec<Arc<AdapterWeights>> = adapters
        .iter()
        .map(|(l, s)| Arc::new(AdapterWeights::new(l, *s)))
        .collect();
    logit_error_weights(base, &weights, merged, prompts)
}

/// [`logit_error`] for adapters of any method, loaded for inference.
pub fn logit_error_weights(
    base: &Model,
    adapters: &[Arc<AdapterWeights>],
    merged: &Model,
    prompts: &[Vec<u32>],
) -> Result<(f64, f64)> {
    let mut with = CpuDecoder::new(base)?;
    for a in adapters {
        with.add_adapter(a.clone());
    }
    let folded = CpuDecoder::new(merged)?;
    let (mut worst, mut sum, mut n) = (0.0f64, 0.0f64, 0usize);
    for p in prompts.iter().filter(|p| !p.is_empty()) {
        let a = with.forward(p, &mut with.new_cache(p.len()), Logits::Last)?;
        let b = folded.forward(p, &mut folded.new_cache(p.len()), Logits::Last)?;
        for (x, y) in a.iter().zip(&b) {
            let d = f64::from((x - y).abs());
            worst = worst.max(d);
            sum += d;
            n += 1;
        }
    }
    Ok((worst, sum / n.max(1) as f64))
}
