//! A trained adapter on disk: LoRA (and PiSSA, as the rank-`2r` LoRA it
//! amounts to) as a GGUF LoRA file (the format llama.cpp's `--lora`
//! loads), every other method as a method file
//! ([`crate::export::method_file`]).

use super::config::TrainConfig;
use crate::export::gguf_lora::{LoraFile, LoraPair};
use crate::export::method_file::{MethodDesc, MethodFile};
use crate::model::DecoderSpec;
use crate::model::Model;
use crate::peft::lora::LoraConfig;
use crate::peft::{Effect, Method, MethodKind, ParamMap};
use crate::{Error, Result};
use std::path::Path;

/// What the adapter file records about its training.
pub struct AdapterMeta<'a> {
    /// The run's configuration.
    pub config: &'a TrainConfig,
    /// Optimizer steps taken.
    pub steps: u64,
    /// The base model's file.
    pub base: &'a Path,
}

/// Pair the `…lora_a` / `…lora_b` parameters into a [`LoraFile`]. The file's
/// alpha is `scale · rank`, so llama.cpp's `alpha / rank` gives the scale
/// used in training (also under rsLoRA).
pub fn to_lora_file(
    spec: &DecoderSpec,
    lora: &LoraConfig,
    names: &[String],
    params: &[Vec<f32>],
    meta: &AdapterMeta,
) -> Result<LoraFile> {
    let mut pairs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let Some(base) = name.strip_suffix(".lora_a") else {
            continue;
        };
        let j = names
            .iter()
            .position(|n| n.strip_suffix(".lora_b") == Some(base))
            .ok_or_else(|| {
                Error::Invalid(format!("adapter tensor {name} has no matching lora_b"))
            })?;
        let r = lora.rank;
        let n_in = params[i].len() / r;
        let n_out = params[j].len() / r;
        pairs.push(LoraPair {
            base: base.to_string(),
            n_in,
            n_out,
            a: params[i].clone(),
            b: params[j].clone(),
        });
    }
    Ok(LoraFile {
        arch: spec.arch.clone(),
        rank: lora.rank,
        alpha: lora.scale() * lora.rank as f32,
        pairs,
        metadata: run_metadata(meta)?,
    })
}

/// A short description of the run's method: `LoRA r=8`, `ia3`, `dora+norm r=8`.
pub fn describe(cfg: &TrainConfig) -> String {
    let kinds = &cfg.method.kinds;
    let label = if kinds == &[MethodKind::Lora] {
        "LoRA".to_string()
    } else {
        cfg.method.label()
    };
    if kinds.iter().any(|k| k.is_reparameterized()) {
        format!("{label} r={}", cfg.lora.rank)
    } else {
        label
    }
}

/// The file's name, base-model name and run metadata of an adapter.
fn run_metadata(meta: &AdapterMeta) -> Result<Vec<(String, String)>> {
    let config = serde_json::to_string(meta.config).map_err(|e| Error::Invalid(e.to_string()))?;
    let base_name = meta
        .base
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    Ok(vec![
        (
            "general.name".into(),
            format!("edgetune {} for {base_name}", describe(meta.config)),
        ),
        ("edgetune.base_model".into(), base_name),
        ("edgetune.steps".into(), meta.steps.to_string()),
        ("edgetune.train_config".into(), config),
    ])
}

/// Write the trained `params` (named `names`) of `method` to `path`: LoRA
/// as trained (its α and r) and PiSSA (the rank-`2r` LoRA of its effects)
/// as GGUF LoRA files llama.cpp loads, every other method (and hybrid) as
/// a method file.
pub fn write_adapter(
    path: &Path,
    model: &Model,
    method: &dyn Method,
    names: &[String],
    params: &[Vec<f32>],
    meta: &AdapterMeta,
) -> Result<()> {
    let spec = model.spec();
    let kinds = meta.config.method.kinds.as_slice();
    if kinds == [MethodKind::Lora] {
        let file = to_lora_file(spec, &meta.config.lora, names, params, meta)?;
        return crate::export::gguf_lora::write(path, &file, false);
    }
    if kinds == [MethodKind::Pissa] {
        let map: ParamMap = names.iter().cloned().zip(params.iter().cloned()).collect();
        let mut pairs = Vec::new();
        let mut rank = 0;
        for (base, e) in method.effects(&map, model)? {
            let Effect::LowRank { rank: r, a, b } = e else {
                return Err(Error::Invalid(format!(
                    "PiSSA made a {} effect on {base}",
                    e.kind()
                )));
            };
            rank = r;
            pairs.push(LoraPair {
                base,
                n_in: a.len() / r,
                n_out: b.len() / r,
                a,
                b,
            });
        }
        // A carries the scale: alpha = rank makes llama.cpp's α/r = 1.
        let file = LoraFile {
            arch: spec.arch.clone(),
            rank,
            alpha: rank as f32,
            pairs,
            metadata: run_metadata(meta)?,
        };
        return crate::export::gguf_lora::write(path, &file, false);
    }
    let file = MethodFile {
        arch: spec.arch.clone(),
        method: MethodDesc {
            spec: meta.config.method.clone(),
            lora: meta.config.lora.clone(),
        },
        tensors: names.iter().cloned().zip(params.iter().cloned()).collect(),
        metadata: run_metadata(meta)?,
    };
    crate::export::method_file::write(path, &file)
}
