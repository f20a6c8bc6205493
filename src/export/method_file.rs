//! Adapters of any PEFT method, as GGUF files llama.cpp would not mistake
//! for a LoRA: `general.type = adapter`, `adapter.type = edgetune`, the
//! method and its settings as JSON (`edgetune.method`), and every trained
//! tensor under its training name (`blk.0.attn_k.weight.ia3`, …) in f32.
//!
//! Reading one rebuilds the method for the base model, checks each tensor
//! against the parameter the method makes (name and size), and asks the
//! method for its inference [`Effect`]s: the adapter reloads to exactly the
//! outputs it had when it was written. Methods whose adapter llama.cpp can
//! load (LoRA, PiSSA as a rank-`2r` LoRA) are written as GGUF LoRA instead
//! ([`crate::export::gguf_lora`]); a method file converts to GGUF LoRA when
//! all its effects are low-rank (VeRA).

use crate::gguf::{GgufFile, GgufWriter, Value};
use crate::graph::DecoderGraph;
use crate::model::Model;
use crate::peft::lora::LoraConfig;
use crate::peft::{Effect, Method, MethodSpec, ParamMap};
use crate::quant::GgmlType;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `adapter.type` of a method file.
pub const ADAPTER_TYPE: &str = "edgetune";
/// Metadata key of the method description.
pub const METHOD_KEY: &str = "edgetune.method";

/// The method a file was trained with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodDesc {
    /// The methods and their own settings.
    pub spec: MethodSpec,
    /// Rank, alpha, targets and layers of the low-rank methods (and the
    /// layers of the others).
    pub lora: LoraConfig,
}

/// A method adapter in memory.
#[derive(Debug, Clone)]
pub struct MethodFile {
    /// `general.architecture` of the base model.
    pub arch: String,
    /// The method.
    pub method: MethodDesc,
    /// Trained tensors, by training name, in graph order.
    pub tensors: Vec<(String, Vec<f32>)>,
    /// Other string metadata (`general.name`, `edgetune.*`).
    pub metadata: Vec<(String, String)>,
}

/// Write `f` to `path` atomically. Fails without touching `path` when a
/// value is not finite or a metadata key is one the writer owns.
pub fn write(path: &Path, f: &MethodFile) -> Result<()> {
    let bad = |msg: String| Error::Invalid(format!("{}: {msg}", path.display()));
    if f.tensors.is_empty() {
        return Err(bad("the adapter has no tensors".into()));
    }
    let mut w = GgufWriter::new();
    w.add_metadata("general.type", Value::String("adapter".into()));
    w.add_metadata("general.architecture", Value::String(f.arch.clone()));
    w.add_metadata("adapter.type", Value::String(ADAPTER_TYPE.into()));
    let desc = serde_json::to_string(&f.method).map_err(|e| bad(e.to_string()))?;
    w.add_metadata(METHOD_KEY, Value::String(desc));
    for (k, v) in &f.metadata {
        if k.starts_with("adapter.")
            || k == METHOD_KEY
            || k == "general.type"
            || k == "general.architecture"
        {
            return Err(bad(format!("metadata key '{k}' is written by the writer")));
        }
        w.add_metadata(k.clone(), Value::String(v.clone()));
    }
    for (name, v) in &f.tensors {
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(bad(format!("tensor '{name}' element {i} is {}", v[i])));
        }
        w.add_f32_tensor(name.clone(), &[v.len() as u64], GgmlType::F32, v)?;
    }
    let mut bytes = Vec::new();
    w.write(&mut bytes)
        .map_err(|e| bad(format!("cannot encode GGUF: {e}")))?;
    crate::train::checkpoint::write_atomic(path, &bytes)
}

/// Whether the GGUF at `path` is a method file (without reading tensors).
pub fn is_method_file(path: &Path) -> bool {
    GgufFile::open(path).is_ok_and(|g| {
        g.get("general.type").and_then(Value::as_str) == Some("adapter")
            && g.get("adapter.type").and_then(Value::as_str) == Some(ADAPTER_TYPE)
    })
}

/// Read a method file. Errors name the file and the key or tensor.
pub fn read(path: &Path) -> Result<MethodFile> {
    let g = GgufFile::open(path)?;
    let fail = |msg: String| Error::Gguf {
        path: path.to_path_buf(),
        msg,
    };
    if g.require_str("general.type")? != "adapter" {
        return Err(fail("general.type is not 'adapter'".into()));
    }
    let ty = g.require_str("adapter.type")?;
    if ty != ADAPTER_TYPE {
        return Err(fail(format!(
            "adapter.type is '{ty}', expected '{ADAPTER_TYPE}'"
        )));
    }
    let arch = g.require_str("general.architecture")?.to_string();
    let method: MethodDesc = serde_json::from_str(g.require_str(METHOD_KEY)?)
        .map_err(|e| fail(format!("{METHOD_KEY}: {e}")))?;
    let metadata = g
        .metadata()
        .iter()
        .filter(|(k, _)| {
            !k.starts_with("adapter.")
                && !matches!(
                    k.as_str(),
                    "general.type" | "general.architecture" | METHOD_KEY
                )
        })
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect();
    let tensors = g
        .tensors()
        .iter()
        .map(|t| {
            Ok((
                t.name.clone(),
                super::gguf_lora::decode(&g, t).map_err(&fail)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(MethodFile {
        arch,
        method,
        tensors,
        metadata,
    })
}

/// The method of `f` rebuilt for `model`, with its tensors checked against
/// the parameters the method makes there.
pub fn method_for(
    f: &MethodFile,
    model: &Model,
    path: &Path,
) -> Result<(Box<dyn Method>, ParamMap)> {
    let fail =
        |msg: String| Error::Invalid(format!("{} does not fit the model: {msg}", path.display()));
    let spec = model.spec();
    if f.arch != spec.arch {
        return Err(fail(format!(
            "it was trained on {}, the model is {}",
            f.arch, spec.arch
        )));
    }
    let m = crate::peft::build(&f.method.spec, &f.method.lora, model)
        .map_err(|e| fail(e.to_string()))?;
    let g = DecoderGraph::build(spec, 1, 2, &*m);
    if g.params.len() != f.tensors.len() {
        return Err(fail(format!(
            "{} tensors, the method makes {} parameters",
            f.tensors.len(),
            g.params.len()
        )));
    }
    let mut map = ParamMap::new();
    for p in &g.params {
        let Some((_, v)) = f.tensors.iter().find(|(n, _)| *n == p.name) else {
            return Err(fail(format!("tensor '{}' is missing", p.name)));
        };
        if v.len() != p.shape.numel() {
            return Err(fail(format!(
                "tensor '{}' has {} values, the method's has {}",
                p.name,
                v.len(),
                p.shape.numel()
            )));
        }
        map.insert(p.name.clone(), v.clone());
    }
    Ok((m, map))
}

/// The inference effects of the method file at `path` on `model`.
pub fn effects(f: &MethodFile, model: &Model, path: &Path) -> Result<Vec<(String, Effect)>> {
    let (m, map) = method_for(f, model, path)?;
    m.effects(&map, model)
}
