//! A trained LoRA's parameters as a GGUF LoRA file (the format llama.cpp's
//! `--lora` loads).

use super::config::TrainConfig;
use crate::export::gguf_lora::{LoraFile, LoraPair};
use crate::model::DecoderSpec;
use crate::peft::lora::Lora;
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
    lora: &Lora,
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
        let r = lora.config.rank;
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
    let config = serde_json::to_string(meta.config).map_err(|e| Error::Invalid(e.to_string()))?;
    let base_name = meta
        .base
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    Ok(LoraFile {
        arch: spec.arch.clone(),
        rank: lora.config.rank,
        alpha: lora.config.scale() * lora.config.rank as f32,
        pairs,
        metadata: vec![
            (
                "general.name".into(),
                format!("edgetune LoRA r={} for {base_name}", lora.config.rank),
            ),
            ("edgetune.base_model".into(), base_name),
            ("edgetune.steps".into(), meta.steps.to_string()),
            ("edgetune.train_config".into(), config),
        ],
    })
}
