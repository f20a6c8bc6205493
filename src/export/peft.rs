//! LoRA adapters in Hugging Face PEFT's format, both ways: a directory with
//! `adapter_config.json` and `adapter_model.safetensors`.
//!
//! # Names
//!
//! PEFT keys its tensors by the module path in the transformers model,
//! `base_model.model.model.layers.{N}.{module}.lora_A.weight` (and
//! `lora_B`), where GGUF names the base tensor `blk.{N}.{name}.weight`:
//!
//! | GGUF | transformers |
//! |---|---|
//! | `attn_q` `attn_k` `attn_v` `attn_output` | `self_attn.q_proj` `k_proj` `v_proj` `o_proj` |
//! | `ffn_gate` `ffn_up` `ffn_down` | `mlp.gate_proj` `up_proj` `down_proj` |
//!
//! # Shapes and order
//!
//! `lora_A.weight` is (r, n_in) and `lora_B.weight` (n_out, r), the same
//! bytes as GGUF's `lora_a`/`lora_b`, with one exception: for `llama`,
//! llama.cpp's converter permutes the rows of `q_proj` and `k_proj` (RoPE
//! pairs from the two halves of each head to adjacent rows), and a row
//! permutation of `W + s·B·A` lands on B alone. Within head `h` of `d`
//! rows, GGUF row `h·d + 2j + s` is transformers row `h·d + s·d/2 + j`
//! (`s` ∈ {0, 1}); heads are `n_head` for q and `n_head_kv` for k. Gemma 3
//! is converted unpermuted.
//!
//! # Scale
//!
//! PEFT scales by `lora_alpha / r`, or `lora_alpha / √r` with `use_rslora`;
//! llama.cpp by `alpha / r`. Import stores `alpha = lora_alpha · √r` for
//! rsLoRA (the same scale); export writes `lora_alpha = alpha` without
//! rsLoRA.

use super::gguf_lora::{LoraFile, LoraPair};
use crate::model::Model;
use crate::{Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// The config file of a PEFT adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file of a PEFT adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// GGUF projection name and transformers module path, per target.
pub(super) const MODULES: [(&str, &str); 7] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Prefix of every LoRA tensor key PEFT saves for a causal LM.
pub(super) const KEY_PREFIX: &str = "base_model.model.model.layers.";

/// What the name and row mapping needs to know about the base model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfLayout {
    /// `general.architecture`: `llama` or `gemma3`.
    pub arch: String,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// Transformer blocks.
    pub n_layer: usize,
}

impl HfLayout {
    /// The layout of `model`'s architecture; an error for one whose
    /// transformers names edgetune does not know.
    pub fn of(model: &Model) -> Result<HfLayout> {
        let s = model.spec();
        if !matches!(s.arch.as_str(), "llama" | "gemma3") {
            return Err(Error::Invalid(format!(
                "{}: no Hugging Face name mapping for architecture '{}' (llama and gemma3 have one)",
                model.file().path().display(),
                s.arch
            )));
        }
        Ok(HfLayout {
            arch: s.arch.clone(),
            n_head: s.n_head,
            n_head_kv: s.n_kv_head,
            n_layer: s.layers.len(),
        })
    }

    /// Heads whose rows llama.cpp permuted in GGUF tensor `proj`, if any.
    pub(super) fn permuted_heads(&self, proj: &str) -> Option<usize> {
        match (self.arch.as_str(), proj) {
            ("llama", "attn_q") => Some(self.n_head),
            ("llama", "attn_k") => Some(self.n_head_kv),
            _ => None,
        }
    }
}

/// GGUF row `i` of a permuted projection with `heads` heads of `n / heads`
/// rows: the transformers row it came from.
pub(super) fn hf_row(i: usize, n: usize, heads: usize) -> usize {
    let d = n / heads;
    let (h, within) = (i / d, i % d);
    let (j, s) = (within / 2, within % 2);
    h * d + s * (d / 2) + j
}

/// `b (n_out × r)` with its rows reordered: `out[i] = b[from(i)]`.
pub(super) fn reorder_rows(b: &[f32], r: usize, from: impl Fn(usize) -> usize) -> Vec<f32> {
    let n = b.len() / r;
    let mut out = vec![0.0; b.len()];
    for i in 0..n {
        let src = from(i);
        out[i * r..(i + 1) * r].copy_from_slice(&b[src * r..(src + 1) * r]);
    }
    out
}

/// Split a GGUF base name `blk.N.proj.weight` into (N, proj).
pub(super) fn split_gguf(base: &str) -> Option<(usize, &str)> {
    let rest = base.strip_prefix("blk.")?.strip_suffix(".weight")?;
    let (n, proj) = rest.split_once('.')?;
    Some((n.parse().ok()?, proj))
}

/// The PEFT module path (without `.lora_A.weight`) of a GGUF base name.
pub(super) fn hf_module(base: &str) -> Option<String> {
    let (layer, proj) = split_gguf(base)?;
    let (_, module) = MODULES.iter().find(|(g, _)| *g == proj)?;
    Some(format!("{KEY_PREFIX}{layer}.{module}"))
}

/// Parse a PEFT key into (layer, GGUF projection, is_b).
fn parse_key(key: &str) -> Option<(usize, &'static str, bool)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, false)
    } else {
        (rest.strip_suffix(".lora_B.weight")?, true)
    };
    let (proj, _) = MODULES.iter().find(|(_, m)| *m == module)?;
    Some((layer.parse().ok()?, proj, which))
}

/// Decode a tensor's values to f32 (F32, F16 and BF16).
pub(super) fn values(t: &TensorView, key: &str, file: &Path) -> Result<Vec<f32>> {
    let data = t.data();
    let bad = |msg: String| Error::Invalid(format!("{}: tensor '{key}': {msg}", file.display()));
    let v: Vec<f32> = match t.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => return Err(bad(format!("dtype {other:?} (F32, F16 or BF16 expected)"))),
    };
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(bad(format!("element {i} is {}", v[i])));
    }
    Ok(v)
}

/// Read a PEFT LoRA directory for a base model of `layout`. Errors name the
/// file and the field or tensor at fault: a method other than plain LoRA
/// (DoRA, per-module ranks, biases, saved full modules), a tensor edgetune
/// cannot map, a missing half of a pair, or shapes that disagree.
pub fn read(dir: &Path, layout: &HfLayout) -> Result<LoraFile> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: {e}", cfg_path.display())))?;
    let field = |msg: String| Error::Invalid(format!("{}: {msg}", cfg_path.display()));
    let peft_type = cfg.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != "LORA" {
        return Err(field(format!(
            "peft_type is '{peft_type}'; only LORA adapters import (the other methods come with edgetune's PEFT family)"
        )));
    }
    let flag = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
    if flag("use_dora") {
        return Err(field(
            "use_dora is true: DoRA adapters do not import as plain LoRA".into(),
        ));
    }
    if flag("fan_in_fan_out") {
        return Err(field(
            "fan_in_fan_out is true (Conv1D models): not a llama or gemma3 adapter".into(),
        ));
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if cfg
            .get(k)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(field(format!(
                "{k} is set: one rank and alpha for every module is supported"
            )));
        }
    }
    if cfg
        .get("bias")
        .and_then(Value::as_str)
        .is_some_and(|b| b != "none")
        || flag("lora_bias")
    {
        return Err(field(
            "the adapter trains biases (bias / lora_bias); llama.cpp's LoRA has none".into(),
        ));
    }
    if cfg
        .get("modules_to_save")
        .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(field(
            "modules_to_save is set: the adapter carries full modules, not only LoRA pairs".into(),
        ));
    }
    let rank = cfg.get("r").and_then(Value::as_u64).unwrap_or(8) as usize;
    let lora_alpha = cfg.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0) as f32;
    let rslora = flag("use_rslora");
    if rank == 0 {
        return Err(field("r is 0".into()));
    }

    let w_path = dir.join(WEIGHTS_FILE);
    if !w_path.exists() && dir.join("adapter_model.bin").exists() {
        return Err(Error::Invalid(format!(
            "{}: only {WEIGHTS_FILE} is read (adapter_model.bin is a pickle; re-save with safe_serialization=True)",
            dir.display()
        )));
    }
    let bytes = std::fs::read(&w_path).map_err(|e| Error::io(&w_path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Invalid(format!("{}: {e}", w_path.display())))?;
    let bad = |msg: String| Error::Invalid(format!("{}: {msg}", w_path.display()));
    // (layer, projection) → (A, B), each with its shape.
    type Half = (Vec<usize>, Vec<f32>);
    type Pair = (Option<Half>, Option<Half>);
    let mut halves: BTreeMap<(usize, &str), Pair> = BTreeMap::new();
    for (key, t) in st.tensors() {
        let (layer, proj, is_b) = parse_key(&key).ok_or_else(|| {
            bad(format!(
                "tensor '{key}' is not a LoRA A/B weight of a llama or gemma3 projection \
                 ({KEY_PREFIX}N.self_attn|mlp.*_proj.lora_A|lora_B.weight)"
            ))
        })?;
        if layer >= layout.n_layer {
            return Err(bad(format!(
                "tensor '{key}': layer {layer}, the model has {}",
                layout.n_layer
            )));
        }
        let shape = t.shape().to_vec();
        if shape.len() != 2 {
            return Err(bad(format!(
                "tensor '{key}' has shape {shape:?}, 2-D expected"
            )));
        }
        let v = values(&t, &key, &w_path)?;
        let slot = halves.entry((layer, proj)).or_default();
        if is_b {
            slot.1 = Some((shape, v));
        } else {
            slot.0 = Some((shape, v));
        }
    }
    if halves.is_empty() {
        return Err(bad("no LoRA tensors".into()));
    }
    let mut pairs = Vec::with_capacity(halves.len());
    for ((layer, proj), (a, b)) in halves {
        let base = format!("blk.{layer}.{proj}.weight");
        let ((sa, a), (sb, b)) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            _ => {
                return Err(bad(format!(
                    "the LoRA pair of '{}' is missing one half",
                    hf_module(&base).unwrap_or(base)
                )));
            }
        };
        if sa[0] != rank || sb[1] != rank {
            return Err(bad(format!(
                "'{}': lora_A is {sa:?} and lora_B {sb:?}, rank r={rank} in {CONFIG_FILE} expects (r, in) and (out, r)",
                hf_module(&base).unwrap_or_default()
            )));
        }
        let (n_in, n_out) = (sa[1], sb[0]);
        let b = match layout.permuted_heads(proj) {
            Some(heads) if n_out % (2 * heads) == 0 => {
                reorder_rows(&b, rank, |i| hf_row(i, n_out, heads))
            }
            Some(heads) => {
                return Err(bad(format!(
                    "'{}': {n_out} output rows do not split into {heads} heads of even size",
                    hf_module(&base).unwrap_or_default()
                )));
            }
            None => b,
        };
        pairs.push(LoraPair {
            base,
            n_in,
            n_out,
            a,
            b,
        });
    }
    let alpha = if rslora {
        lora_alpha * (rank as f32).sqrt()
    } else {
        lora_alpha
    };
    let mut metadata = vec![("edgetune.imported_from".to_string(), "peft".to_string())];
    if let Some(name) = cfg.get("base_model_name_or_path").and_then(Value::as_str) {
        metadata.push(("edgetune.peft.base_model_name_or_path".into(), name.into()));
    }
    Ok(LoraFile {
        arch: layout.arch.clone(),
        rank,
        alpha,
        pairs,
        metadata,
    })
}

/// `target_modules` and `layers_to_transform` when the pairs are every
/// chosen module on every chosen layer, else one regular expression that
/// names exactly the adapted modules (PEFT matches a string with
/// `re.fullmatch` against module names).
fn targets(f: &LoraFile, layout: &HfLayout) -> Result<(Value, Value)> {
    targets_of(f.pairs.iter().map(|p| p.base.as_str()), layout)
}

/// [`targets`] of the adapted base tensors `bases`.
pub(super) fn targets_of<'a>(
    bases: impl Iterator<Item = &'a str>,
    layout: &HfLayout,
) -> Result<(Value, Value)> {
    let mut set = BTreeSet::new();
    for base in bases {
        let (layer, proj) = split_gguf(base)
            .filter(|(_, proj)| MODULES.iter().any(|(g, _)| g == proj))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "tensor '{base}' has no PEFT name (blk.N.<projection>.weight expected)"
                ))
            })?;
        set.insert((layer, proj));
    }
    let layers: BTreeSet<usize> = set.iter().map(|&(l, _)| l).collect();
    let projs: BTreeSet<&str> = set.iter().map(|&(_, p)| p).collect();
    let short = |proj: &str| {
        let m = MODULES.iter().find(|(g, _)| *g == proj).unwrap().1;
        m.rsplit('.').next().unwrap().to_string()
    };
    if layers.len() * projs.len() == set.len() {
        let modules: Vec<String> = MODULES
            .iter()
            .filter(|(g, _)| projs.contains(g))
            .map(|(g, _)| short(g))
            .collect();
        let which = if layers.len() == layout.n_layer {
            Value::Null
        } else {
            json!(layers)
        };
        return Ok((json!(modules), which));
    }
    let alts: Vec<String> = set
        .iter()
        .map(|&(l, p)| {
            let m = MODULES.iter().find(|(g, _)| *g == p).unwrap().1;
            format!("model\\.layers\\.{l}\\.{}", m.replace('.', "\\."))
        })
        .collect();
    Ok((json!(format!("({})", alts.join("|"))), Value::Null))
}

/// Write `f` as a PEFT LoRA directory (created if missing; both files
/// written atomically) that `PeftModel.from_pretrained` loads onto the
/// transformers model of the base.
pub fn write(dir: &Path, f: &LoraFile, layout: &HfLayout) -> Result<()> {
    if f.arch != layout.arch {
        return Err(Error::Invalid(format!(
            "the adapter is for '{}', the base model is '{}'",
            f.arch, layout.arch
        )));
    }
    let (target_modules, layers) = targets(f, layout)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(2 * f.pairs.len());
    let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    for p in &f.pairs {
        let module = hf_module(&p.base).expect("checked by targets");
        let (_, proj) = split_gguf(&p.base).expect("checked by targets");
        let b = match layout.permuted_heads(proj) {
            Some(heads) if p.n_out % (2 * heads) == 0 => {
                // The inverse of the import's reordering.
                let mut from = vec![0; p.n_out];
                for i in 0..p.n_out {
                    from[hf_row(i, p.n_out, heads)] = i;
                }
                reorder_rows(&p.b, f.rank, |i| from[i])
            }
            Some(heads) => {
                return Err(Error::Invalid(format!(
                    "tensor '{}': {} rows do not split into {heads} heads of even size",
                    p.base, p.n_out
                )));
            }
            None => p.b.clone(),
        };
        tensors.push((
            format!("{module}.lora_A.weight"),
            vec![f.rank, p.n_in],
            le(&p.a),
        ));
        tensors.push((
            format!("{module}.lora_B.weight"),
            vec![p.n_out, f.rank],
            le(&b),
        ));
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::Invalid(format!("tensor '{k}': {e}")))
        })
        .collect::<Result<_>>()?;
    let bytes = serialize(views, dir)?;
    let base_name = f
        .metadata
        .iter()
        .find(|(k, _)| k == "edgetune.peft.base_model_name_or_path")
        .map(|(_, v)| v.clone());
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": f.rank,
        "lora_alpha": f.alpha,
        "use_rslora": false,
        "use_dora": false,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "target_modules": target_modules,
        "layers_to_transform": layers,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": true,
        "inference_mode": true,
        "revision": null,
    });
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialize");
    crate::train::checkpoint::write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
    crate::train::checkpoint::write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}

/// The safetensors bytes of `views`, as PEFT saves them (`format: pt`).
pub(super) fn serialize(views: Vec<(String, TensorView)>, dir: &Path) -> Result<Vec<u8>> {
    let info = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize(views, Some(info))
        .map_err(|e| Error::Invalid(format!("{}: {e}", dir.join(WEIGHTS_FILE).display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_row_permutation_is_llama_cpps() {
        // llama.cpp: reshape(heads, 2, d/2) → swapaxes(1, 2): GGUF row
        // (h, j, s) holds transformers row (h, s, j).
        let (n, heads) = (12, 2);
        let gguf_from_hf: Vec<usize> = (0..n).map(|i| hf_row(i, n, heads)).collect();
        assert_eq!(gguf_from_hf, [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]);
    }

    #[test]
    fn names_map_both_ways() {
        assert_eq!(
            hf_module("blk.7.attn_output.weight").as_deref(),
            Some("base_model.model.model.layers.7.self_attn.o_proj")
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.7.mlp.down_proj.lora_B.weight"),
            Some((7, "ffn_down", true))
        );
        assert_eq!(parse_key("base_model.model.lm_head.lora_A.weight"), None);
        assert_eq!(hf_module("token_embd.weight"), None);
    }
}
