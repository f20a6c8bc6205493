//! A description of a GGUF model file for people and programs (`edgetune info`).

use super::Model;
use crate::gguf::{GgufFile, Value};
use serde::Serialize;
use std::collections::BTreeMap;

/// What `edgetune info` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    /// The file.
    pub path: String,
    /// File size in bytes.
    pub file_bytes: u64,
    /// GGUF version.
    pub gguf_version: u32,
    /// `general.architecture`.
    pub architecture: Option<String>,
    /// `general.name`.
    pub name: Option<String>,
    /// Whether edgetune can run this model.
    pub supported: bool,
    /// Why not, when it cannot.
    pub unsupported_reason: Option<String>,
    /// Hyper-parameters (`<arch>.*` integer and float keys, without the prefix).
    pub hyperparameters: BTreeMap<String, serde_json::Value>,
    /// Parameters in all tensors.
    pub parameters: u64,
    /// Number of tensors.
    pub tensors: usize,
    /// Tensors per element type, e.g. `{"Q4_1": 210, "F32": 61}`.
    pub tensor_types: BTreeMap<String, usize>,
    /// Bytes of tensor data per element type.
    pub tensor_bytes: BTreeMap<String, u64>,
    /// `tokenizer.ggml.model` (`gpt2`, `llama`, …).
    pub tokenizer: Option<String>,
    /// `tokenizer.ggml.pre`.
    pub tokenizer_pre: Option<String>,
    /// Vocabulary size.
    pub vocab_size: Option<usize>,
    /// Whether `tokenizer.chat_template` is present.
    pub chat_template: bool,
}

impl ModelSummary {
    /// Summarise an open file (reads only the header; tensor data is not touched).
    pub fn of(file: &GgufFile) -> ModelSummary {
        let arch = file.get_str("general.architecture").map(str::to_string);
        let mut hyperparameters = BTreeMap::new();
        if let Some(a) = &arch {
            let prefix = format!("{a}.");
            for (k, v) in file.metadata() {
                let Some(short) = k.strip_prefix(&prefix) else {
                    continue;
                };
                let j = match v {
                    Value::F32(_) | Value::F64(_) => v.as_f32().map(|f| serde_json::json!(f)),
                    Value::Bool(b) => Some(serde_json::json!(b)),
                    Value::String(s) => Some(serde_json::json!(s)),
                    _ => v.as_i64().map(|i| serde_json::json!(i)),
                };
                if let Some(j) = j {
                    hyperparameters.insert(short.to_string(), j);
                }
            }
        }
        let mut tensor_types = BTreeMap::new();
        let mut tensor_bytes = BTreeMap::new();
        let mut parameters = 0u64;
        for t in file.tensors() {
            *tensor_types.entry(t.ty.name().to_string()).or_insert(0) += 1;
            *tensor_bytes.entry(t.ty.name().to_string()).or_insert(0) += t.n_bytes;
            parameters += t.dims.iter().product::<u64>();
        }
        let check = super::DecoderSpec::from_file(file)
            .map(drop)
            .map_err(|e| e.to_string());
        ModelSummary {
            path: file.path().display().to_string(),
            file_bytes: file.file_size(),
            gguf_version: file.version(),
            name: file.get_str("general.name").map(str::to_string),
            architecture: arch,
            supported: check.is_ok(),
            unsupported_reason: check.err(),
            hyperparameters,
            parameters,
            tensors: file.tensors().len(),
            tensor_types,
            tensor_bytes,
            tokenizer: file.get_str("tokenizer.ggml.model").map(str::to_string),
            tokenizer_pre: file.get_str("tokenizer.ggml.pre").map(str::to_string),
            vocab_size: file.get_array("tokenizer.ggml.tokens").map(<[Value]>::len),
            chat_template: file.get_str("tokenizer.chat_template").is_some(),
        }
    }
}

impl Model {
    /// [`ModelSummary::of`] this model's file.
    pub fn summary(&self) -> ModelSummary {
        ModelSummary::of(&self.file)
    }
}
