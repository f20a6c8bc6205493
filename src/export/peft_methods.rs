//! Hugging Face PEFT adapters of the other methods, read into inference
//! [`Effect`]s: DoRA (`use_dora`), VeRA, (IA)³, LoHa and LoKr. Names, the
//! llama q/k row permutation and scales as in [`super::peft`]; what each
//! method stores, as PEFT 0.21 saves it:
//!
//! | method | tensors per module (after `…layers.N.<module>.`) | effect |
//! |---|---|---|
//! | DoRA | `lora_A.weight (r, in)`, `lora_B.weight (out, r)`, `lora_magnitude_vector (out)` | low-rank, then `m / ‖W + s·B·A‖` per row |
//! | VeRA | `vera_lambda_d (r)`, `vera_lambda_b (out)`; shared `base_model.vera_A (r, max_in)`, `base_model.vera_B (max_out, r)` | low-rank `diag(λb)·B[:out]`, `diag(λd)·A[:, :in]` |
//! | (IA)³ | `ia3_l`: `(out, 1)` scales the output, `(1, in)` (feed-forward modules) the input | scale |
//! | LoHa | `hada_w1_a (out, r)`, `hada_w1_b (r, in)`, `hada_w2_a`, `hada_w2_b` | dense `s·(w1a·w1b) ⊙ (w2a·w2b)` |
//! | LoKr | `lokr_w1 (a, c)` (or `lokr_w1_a`·`lokr_w1_b`), `lokr_w2 (b, d)` (or `lokr_w2_a`·`lokr_w2_b`) | dense `s·w1 ⊗ w2` |
//! | prompt tuning | one `prompt_embeddings (n, C)` | `n` virtual tokens before the embeddings |
//! | prefix tuning | one `prompt_embeddings (n, L·2·kv)`, column `((2·layer + k|v)·heads + head)·d + i` | `n` key and value rows before each layer's |
//!
//! Per-row tensors of a permuted projection (DoRA's `B` and magnitude,
//! VeRA's `λb` and its slice of `vera_B`, (IA)³'s output vector, LoHa's
//! left factors, LoKr's whole `ΔW`) are reordered to GGUF rows.

use super::peft::{HfLayout, KEY_PREFIX, MODULES, hf_row, reorder_rows, values};
use crate::model::Model;
use crate::peft::{Effect, ParamMap};
use crate::{Error, Result};
use safetensors::tensor::SafeTensors;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Whether the PEFT directory's config names a method this module reads
/// (rather than plain LoRA).
pub fn is_method_dir(cfg: &Value) -> bool {
    let ty = cfg.get("peft_type").and_then(Value::as_str).unwrap_or("");
    matches!(
        ty,
        "VERA" | "IA3" | "LOHA" | "LOKR" | "PROMPT_TUNING" | "PREFIX_TUNING"
    ) || (ty == "LORA" && cfg.get("use_dora").and_then(Value::as_bool) == Some(true))
}

/// One module's tensors: suffix → (shape, values).
type Module = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Split `…layers.N.<module>.<suffix>` into (N, GGUF projection, suffix).
fn parse_key(key: &str) -> Option<(usize, &'static str, &str)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (layer, rest) = rest.split_once('.')?;
    let (proj, module) = MODULES
        .iter()
        .find(|(_, m)| rest.strip_prefix(m).is_some_and(|r| r.starts_with('.')))?;
    Some((layer.parse().ok()?, proj, &rest[module.len() + 1..]))
}

/// Read the PEFT directory `dir` (config already parsed as `cfg`) for
/// `model`: its effects, in layer and projection order.
pub fn read_effects(dir: &Path, cfg: &Value, model: &Model) -> Result<Vec<(String, Effect)>> {
    let layout = HfLayout::of(model)?;
    let cfg_path = dir.join(super::peft::CONFIG_FILE);
    let field = |msg: String| Error::Invalid(format!("{}: {msg}", cfg_path.display()));
    let w_path = dir.join(super::peft::WEIGHTS_FILE);
    let bytes = std::fs::read(&w_path).map_err(|e| Error::io(&w_path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Invalid(format!("{}: {e}", w_path.display())))?;
    let bad = |msg: String| Error::Invalid(format!("{}: {msg}", w_path.display()));
    let ty = cfg.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if matches!(ty, "PROMPT_TUNING" | "PREFIX_TUNING") {
        return virtual_tokens(ty, cfg, &st, model, &w_path);
    }
    let mut shared: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut modules: BTreeMap<(usize, &str), Module> = BTreeMap::new();
    for (key, t) in st.tensors() {
        let v = values(&t, &key, &w_path)?;
        let shape = t.shape().to_vec();
        if let Some(name) = key.strip_prefix("base_model.").filter(|k| !k.contains('.')) {
            shared.insert(name.to_string(), (shape, v));
            continue;
        }
        let (layer, proj, suffix) = parse_key(&key).ok_or_else(|| {
            bad(format!(
                "tensor '{key}' is not a module of a llama or gemma3 layer"
            ))
        })?;
        if layer >= layout.n_layer {
            return Err(bad(format!(
                "tensor '{key}': layer {layer}, the model has {}",
                layout.n_layer
            )));
        }
        modules
            .entry((layer, proj))
            .or_default()
            .insert(suffix.to_string(), (shape, v));
    }
    if modules.is_empty() {
        return Err(bad("no adapter tensors".into()));
    }
    let num = |k: &str, default: f64| cfg.get(k).and_then(Value::as_f64).unwrap_or(default);
    if matches!(ty, "LORA" | "VERA" | "LOHA" | "LOKR") && num("r", 8.0) < 1.0 {
        return Err(field(format!(
            "r is {}, at least 1 expected",
            num("r", 8.0)
        )));
    }
    let spec = model.spec();
    let mut out = Vec::new();
    for ((layer, proj), m) in modules {
        let base = format!("blk.{layer}.{proj}.weight");
        let w = spec
            .weight(&base)
            .ok_or_else(|| bad(format!("the model has no tensor {base}")))?;
        let (rows, cols) = (w.rows, w.cols);
        let get = |suffix: &str| -> Result<&(Vec<usize>, Vec<f32>)> {
            m.get(suffix)
                .ok_or_else(|| bad(format!("{base}: tensor '{suffix}' is missing")))
        };
        let sized = |suffix: &str, n: usize| -> Result<&[f32]> {
            let (shape, v) = get(suffix)?;
            if v.len() != n {
                return Err(bad(format!(
                    "{base}: '{suffix}' is {shape:?}, {n} values expected"
                )));
            }
            Ok(v)
        };
        // GGUF row i of this projection holds transformers row perm(i).
        let heads = layout.permuted_heads(proj);
        let perm = |i: usize| heads.map_or(i, |h| hf_row(i, rows, h));
        let per_row = |v: &[f32], width: usize| reorder_rows(v, width, perm);
        match ty {
            "LORA" => {
                let r = num("r", 8.0) as usize;
                let alpha = num("lora_alpha", 8.0) as f32;
                let s = if cfg.get("use_rslora").and_then(Value::as_bool) == Some(true) {
                    alpha / (r as f32).sqrt()
                } else {
                    alpha / r as f32
                };
                let mut map = ParamMap::new();
                map.insert(
                    format!("{base}.lora_a"),
                    sized("lora_A.weight", r * cols)?.to_vec(),
                );
                map.insert(
                    format!("{base}.lora_b"),
                    per_row(sized("lora_B.weight", rows * r)?, r),
                );
                map.insert(
                    format!("{base}.dora_m"),
                    per_row(sized("lora_magnitude_vector", rows)?, 1),
                );
                out.extend(crate::peft::dora::dora_effects(&map, r, s, model)?);
            }
            "VERA" => {
                let r = num("r", 256.0) as usize;
                let (sa, a) = shared.get("vera_A").ok_or_else(|| {
                    field("save_projection is false: vera_A/vera_B are not in the file".into())
                })?;
                let (sb, b) = shared
                    .get("vera_B")
                    .ok_or_else(|| bad("vera_B is missing".into()))?;
                if sa.len() != 2
                    || sa[0] != r
                    || sa[1] < cols
                    || sb.len() != 2
                    || sb[1] != r
                    || sb[0] < rows
                {
                    return Err(bad(format!(
                        "vera_A {sa:?} / vera_B {sb:?} do not cover {base} ({rows} × {cols}) at r={r}"
                    )));
                }
                let d = sized("vera_lambda_d", r)?;
                let lb = sized("vera_lambda_b", rows)?;
                let mut a2 = Vec::with_capacity(r * cols);
                for (k, row) in a.chunks_exact(sa[1]).enumerate() {
                    a2.extend(row[..cols].iter().map(|v| v * d[k]));
                }
                let b2: Vec<f32> = (0..rows)
                    .flat_map(|i| {
                        let src = perm(i);
                        b[src * r..(src + 1) * r].iter().map(move |v| v * lb[src])
                    })
                    .collect();
                out.push((
                    base,
                    Effect::LowRank {
                        rank: r,
                        a: a2,
                        b: b2,
                    },
                ));
            }
            "IA3" => {
                let (shape, v) = get("ia3_l")?;
                let e = match shape.as_slice() {
                    [n, 1] if *n == rows => Effect::OutScale(per_row(v, 1)),
                    [1, n] if *n == cols => Effect::InScale(v.clone()),
                    _ => {
                        return Err(bad(format!(
                            "{base}: ia3_l is {shape:?}, ({rows}, 1) or (1, {cols}) expected"
                        )));
                    }
                };
                out.push((base, e));
            }
            "LOHA" => {
                let r = num("r", 8.0) as usize;
                let s = num("alpha", 8.0) as f32 / r as f32;
                let (w1a, w2a) = (sized("hada_w1_a", rows * r)?, sized("hada_w2_a", rows * r)?);
                let (w1b, w2b) = (sized("hada_w1_b", r * cols)?, sized("hada_w2_b", r * cols)?);
                let (w1a, w2a) = (per_row(w1a, r), per_row(w2a, r));
                let delta = crate::peft::loha::delta(&w1a, w1b, &w2a, w2b, r, s);
                out.push((base, Effect::Dense { rows, cols, delta }));
            }
            "LOKR" => {
                let r = num("r", 8.0) as usize;
                let s = num("alpha", 8.0) as f32 / r as f32;
                let factor = |w: &str| -> Result<(Vec<f32>, (usize, usize))> {
                    if let Some((shape, v)) = m.get(&format!("lokr_{w}")) {
                        if shape.len() != 2 {
                            return Err(bad(format!("{base}: lokr_{w} is {shape:?}")));
                        }
                        return Ok((v.clone(), (shape[0], shape[1])));
                    }
                    let (sa, a) = get(&format!("lokr_{w}_a"))?;
                    let (sb, b) = get(&format!("lokr_{w}_b"))?;
                    if sa.len() != 2 || sb.len() != 2 || sa[1] != sb[0] {
                        return Err(bad(format!(
                            "{base}: lokr_{w}_a {sa:?} and _b {sb:?} do not multiply"
                        )));
                    }
                    let (p, k, q) = (sa[0], sa[1], sb[1]);
                    let prod = (0..p * q)
                        .map(|e| (0..k).map(|t| a[(e / q) * k + t] * b[t * q + e % q]).sum())
                        .collect();
                    Ok((prod, (p, q)))
                };
                let (w1, d1) = factor("w1")?;
                let (w2, d2) = factor("w2")?;
                if d1.0 * d2.0 != rows || d1.1 * d2.1 != cols {
                    return Err(bad(format!(
                        "{base}: {d1:?} ⊗ {d2:?} is not {rows} × {cols}"
                    )));
                }
                let mut delta = vec![0.0; rows * cols];
                crate::backend::cpu::train::peft_ops::kron(&w1, d1, &w2, d2, &mut delta);
                delta.iter_mut().for_each(|v| *v *= s);
                let delta = per_row(&delta, cols);
                out.push((base, Effect::Dense { rows, cols, delta }));
            }
            other => return Err(field(format!("peft_type '{other}' is not read here"))),
        }
    }
    Ok(out)
}

/// Prompt or prefix tuning's one `prompt_embeddings` tensor as virtual
/// rows: before the embeddings, or before each layer's keys (their head
/// dimension put in llama.cpp's order for llama) and values.
fn virtual_tokens(
    ty: &str,
    cfg: &Value,
    st: &SafeTensors,
    model: &Model,
    w_path: &Path,
) -> Result<Vec<(String, Effect)>> {
    let bad = |msg: String| Error::Invalid(format!("{}: {msg}", w_path.display()));
    let t = st
        .tensor("prompt_embeddings")
        .map_err(|_| bad("tensor 'prompt_embeddings' is missing".into()))?;
    let shape = t.shape().to_vec();
    let v = values(&t, "prompt_embeddings", w_path)?;
    let spec = model.spec();
    let n = cfg
        .get("num_virtual_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0) as usize;
    if ty == "PROMPT_TUNING" {
        if shape != [n, spec.n_embd] {
            return Err(bad(format!(
                "prompt_embeddings is {shape:?}, ({n}, {}) expected",
                spec.n_embd
            )));
        }
        let base = spec.token_embd.name.clone();
        return Ok(vec![(base, Effect::Prefix { rows: n, values: v })]);
    }
    // With `prefix_projection`, PEFT saves the projection's output: the
    // same layout.
    let (heads, d, layers) = (spec.n_kv_head, spec.head_dim, spec.layers.len());
    let kv = heads * d;
    if shape != [n, layers * 2 * kv] {
        return Err(bad(format!(
            "prompt_embeddings is {shape:?}, ({n}, {}) expected for {layers} layers of {heads} \
             key/value heads of {d}",
            layers * 2 * kv
        )));
    }
    let permuted = HfLayout::of(model)?.permuted_heads("attn_k").is_some();
    let mut out = Vec::new();
    for (li, l) in spec.layers.iter().enumerate() {
        for (which, w) in [(0, &l.wk), (1, &l.wv)] {
            let mut rows = Vec::with_capacity(n * kv);
            for t in 0..n {
                let block = &v[t * layers * 2 * kv + (2 * li + which) * kv..][..kv];
                for h in 0..heads {
                    for i in 0..d {
                        // Key dims in llama.cpp's pair order: i = 2j + s
                        // holds transformers' s·d/2 + j.
                        let src = if which == 0 && permuted {
                            hf_row(i, d, 1)
                        } else {
                            i
                        };
                        rows.push(block[h * d + src]);
                    }
                }
            }
            out.push((
                w.name.clone(),
                Effect::Prefix {
                    rows: n,
                    values: rows,
                },
            ));
        }
    }
    Ok(out)
}
