//! Method files ([`super::method_file`]) written as Hugging Face PEFT
//! directories, for the methods PEFT has: DoRA (`use_dora`), VeRA, (IA)³,
//! LoHa, LoKr, prompt tuning and prefix tuning — the inverse of
//! [`super::peft_methods`]. Per-row tensors of llama's q/k projections go
//! back to transformers' row order. Two cannot follow that order and are
//! refused on llama's q or k, naming `merge`: VeRA (its shared projection
//! cannot be in two row orders at once) and LoKr (a Kronecker row does not
//! follow a head).

use super::method_file::MethodFile;
use super::peft::{
    CONFIG_FILE, HfLayout, WEIGHTS_FILE, hf_module, hf_row, serialize, split_gguf, targets_of,
};
use crate::model::Model;
use crate::peft::{MethodKind, lokr};
use crate::{Error, Result};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;
use std::path::Path;

/// Whether [`write`] exports a method file of `kinds` natively.
pub fn exports(kinds: &[MethodKind]) -> bool {
    matches!(
        kinds,
        [MethodKind::Dora
            | MethodKind::Vera
            | MethodKind::Ia3
            | MethodKind::Loha
            | MethodKind::Lokr
            | MethodKind::Prompt
            | MethodKind::Prefix]
    )
}

/// `v (n × width)` in transformers' row order for projection `proj`
/// (unchanged where llama.cpp did not permute it).
fn hf_rows(v: &[f32], width: usize, proj: &str, layout: &HfLayout) -> Vec<f32> {
    let n = v.len() / width;
    let Some(heads) = layout.permuted_heads(proj) else {
        return v.to_vec();
    };
    let mut out = vec![0.0; v.len()];
    for i in 0..n {
        let dst = hf_row(i, n, heads);
        out[dst * width..(dst + 1) * width].copy_from_slice(&v[i * width..(i + 1) * width]);
    }
    out
}

/// Write method file `f` (trained on `model`) as a PEFT directory `dir`.
pub fn write(dir: &Path, f: &MethodFile, model: &Model) -> Result<()> {
    let layout = HfLayout::of(model)?;
    let kinds = f.method.spec.kinds.as_slice();
    let label = f.method.spec.label();
    if !exports(kinds) {
        return Err(Error::Invalid(format!(
            "a {label} adapter has no PEFT form edgetune writes (DoRA, VeRA, (IA)³, LoHa, LoKr, \
             prompt and prefix tuning do); fold it into the model with `edgetune merge`"
        )));
    }
    let spec = model.spec();
    let lora = &f.method.lora;
    let get = |name: &str| -> Result<&[f32]> {
        f.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .ok_or_else(|| Error::Invalid(format!("tensor '{name}' is missing")))
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut bases: Vec<String> = Vec::new();
    let shape_of = |base: &str| spec.weight(base).map(|w| (w.rows, w.cols));
    let mut config = json!({
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": null,
        "inference_mode": true,
        "revision": null,
    });
    match kinds[0] {
        MethodKind::Dora | MethodKind::Loha | MethodKind::Lokr => {
            let suffix = match kinds[0] {
                MethodKind::Dora => ".lora_a",
                MethodKind::Loha => ".hada_w1_a",
                _ => ".lokr_w1",
            };
            for (name, _) in &f.tensors {
                if let Some(base) = name.strip_suffix(suffix) {
                    bases.push(base.to_string());
                }
            }
            let r = lora.rank;
            for base in &bases {
                let (rows, cols) = shape_of(base)
                    .ok_or_else(|| Error::Invalid(format!("the model has no tensor {base}")))?;
                let module = hf_module(base)
                    .ok_or_else(|| Error::Invalid(format!("{base} has no PEFT name")))?;
                let (_, proj) = split_gguf(base).expect("hf_module parsed it");
                match kinds[0] {
                    MethodKind::Dora => {
                        tensors.push((
                            format!("{module}.lora_A.weight"),
                            vec![r, cols],
                            get(&format!("{base}.lora_a"))?.to_vec(),
                        ));
                        let b = hf_rows(get(&format!("{base}.lora_b"))?, r, proj, &layout);
                        tensors.push((format!("{module}.lora_B.weight"), vec![rows, r], b));
                        let m = hf_rows(get(&format!("{base}.dora_m"))?, 1, proj, &layout);
                        tensors.push((format!("{module}.lora_magnitude_vector"), vec![rows], m));
                    }
                    MethodKind::Loha => {
                        for i in [1, 2] {
                            let a = hf_rows(get(&format!("{base}.hada_w{i}_a"))?, r, proj, &layout);
                            tensors.push((format!("{module}.hada_w{i}_a"), vec![rows, r], a));
                            let b = get(&format!("{base}.hada_w{i}_b"))?.to_vec();
                            tensors.push((format!("{module}.hada_w{i}_b"), vec![r, cols], b));
                        }
                    }
                    _ => {
                        if layout.permuted_heads(proj).is_some() {
                            return Err(Error::Invalid(format!(
                                "{base}: LoKr on llama's {proj} cannot be written for \
                                 transformers (its rows are permuted by head, a Kronecker \
                                 factor's are not); export it as LoRA-free weights with \
                                 `edgetune merge`, or train LoKr without q and k"
                            )));
                        }
                        let ((o1, i1), (o2, i2)) = lokr::shapes(rows, cols);
                        tensors.push((
                            format!("{module}.lokr_w1"),
                            vec![o1, i1],
                            get(&format!("{base}.lokr_w1"))?.to_vec(),
                        ));
                        let (a, b) = (
                            get(&format!("{base}.lokr_w2_a"))?,
                            get(&format!("{base}.lokr_w2_b"))?,
                        );
                        // PEFT keeps w2 whole unless r < max(out₂, in₂)/2.
                        if 2 * r < o2.max(i2) {
                            tensors.push((format!("{module}.lokr_w2_a"), vec![o2, r], a.to_vec()));
                            tensors.push((format!("{module}.lokr_w2_b"), vec![r, i2], b.to_vec()));
                        } else {
                            let w2 = (0..o2 * i2)
                                .map(|e| {
                                    (0..r)
                                        .map(|k| a[(e / i2) * r + k] * b[k * i2 + e % i2])
                                        .sum()
                                })
                                .collect();
                            tensors.push((format!("{module}.lokr_w2"), vec![o2, i2], w2));
                        }
                    }
                }
            }
            let (targets, layers) = targets_of(bases.iter().map(String::as_str), &layout)?;
            let c = config.as_object_mut().expect("an object");
            c.insert("target_modules".into(), targets);
            c.insert("layers_to_transform".into(), layers);
            c.insert("r".into(), json!(r));
            match kinds[0] {
                MethodKind::Dora => {
                    c.insert("peft_type".into(), json!("LORA"));
                    c.insert("use_dora".into(), json!(true));
                    c.insert("lora_alpha".into(), json!(lora.alpha));
                    c.insert("use_rslora".into(), json!(lora.rslora));
                    c.insert("lora_dropout".into(), json!(lora.dropout));
                    c.insert("bias".into(), json!("none"));
                    c.insert("fan_in_fan_out".into(), json!(false));
                    c.insert("init_lora_weights".into(), json!(true));
                }
                kind => {
                    if lora.rslora {
                        return Err(Error::Invalid(format!(
                            "{label}: PEFT's {kind} has no rsLoRA scale; train without --rslora to export"
                        )));
                    }
                    c.insert(
                        "peft_type".into(),
                        json!(if kind == MethodKind::Loha {
                            "LOHA"
                        } else {
                            "LOKR"
                        }),
                    );
                    c.insert("alpha".into(), json!(lora.alpha));
                    c.insert("rank_dropout".into(), json!(0.0));
                    c.insert("module_dropout".into(), json!(0.0));
                    c.insert("init_weights".into(), json!(true));
                    if kind == MethodKind::Lokr {
                        c.insert("decompose_both".into(), json!(false));
                        c.insert("decompose_factor".into(), json!(-1));
                    }
                }
            }
        }
        MethodKind::Vera => {
            let r = lora.rank;
            let vera = crate::peft::vera::Vera::new(lora.clone(), &f.method.spec, spec)?;
            for (name, _) in &f.tensors {
                if let Some(base) = name.strip_suffix(".vera_d") {
                    bases.push(base.to_string());
                }
            }
            for base in &bases {
                let module = hf_module(base)
                    .ok_or_else(|| Error::Invalid(format!("{base} has no PEFT name")))?;
                let (_, proj) = split_gguf(base).expect("hf_module parsed it");
                if layout.permuted_heads(proj).is_some() {
                    return Err(Error::Invalid(format!(
                        "{base}: VeRA on llama's {proj} cannot be written for transformers (its \
                         rows are permuted by head, the shared projection's cannot be for one \
                         module only); fold it into the model with `edgetune merge`, or train \
                         VeRA without q and k"
                    )));
                }
                let d = get(&format!("{base}.vera_d"))?.to_vec();
                let b = get(&format!("{base}.vera_b"))?.to_vec();
                tensors.push((format!("{module}.vera_lambda_d"), vec![r], d));
                tensors.push((format!("{module}.vera_lambda_b"), vec![b.len()], b));
            }
            let (a, b) = vera.shared();
            tensors.push(("base_model.vera_A".into(), vec![r, a.len() / r], a.to_vec()));
            tensors.push(("base_model.vera_B".into(), vec![b.len() / r, r], b.to_vec()));
            let (targets, layers) = targets_of(bases.iter().map(String::as_str), &layout)?;
            let c = config.as_object_mut().expect("an object");
            c.insert("peft_type".into(), json!("VERA"));
            c.insert("target_modules".into(), targets);
            c.insert("layers_to_transform".into(), layers);
            c.insert("r".into(), json!(r));
            c.insert("projection_prng_key".into(), json!(f.method.spec.vera_seed));
            c.insert("save_projection".into(), json!(true));
            c.insert("vera_dropout".into(), json!(lora.dropout));
            c.insert("d_initial".into(), json!(f.method.spec.vera_d_init));
            c.insert("bias".into(), json!("none"));
            c.insert("fan_in_fan_out".into(), json!(false));
            c.insert("init_weights".into(), json!(true));
        }
        MethodKind::Ia3 => {
            let mut ff = Vec::new();
            for (name, v) in &f.tensors {
                let base = name
                    .strip_suffix(".ia3")
                    .ok_or_else(|| Error::Invalid(format!("'{name}' is not an (IA)³ vector")))?;
                let module = hf_module(base)
                    .ok_or_else(|| Error::Invalid(format!("{base} has no PEFT name")))?;
                let (_, proj) = split_gguf(base).expect("hf_module parsed it");
                if crate::peft::ia3::scales_input(
                    proj.parse()
                        .map_err(|_| Error::Invalid(format!("{base}: not a projection")))?,
                ) {
                    tensors.push((format!("{module}.ia3_l"), vec![1, v.len()], v.clone()));
                    ff.push(module.rsplit('.').next().unwrap_or("down_proj").to_string());
                } else {
                    tensors.push((
                        format!("{module}.ia3_l"),
                        vec![v.len(), 1],
                        hf_rows(v, 1, proj, &layout),
                    ));
                }
                bases.push(base.to_string());
            }
            ff.sort();
            ff.dedup();
            let (mut targets, layers) = targets_of(bases.iter().map(String::as_str), &layout)?;
            if !layers.is_null() {
                // IA3Config has no layers_to_transform: name the modules.
                let names: Vec<String> = bases
                    .iter()
                    .filter_map(|b| hf_module(b))
                    .map(|m| {
                        m.trim_start_matches("base_model.model.")
                            .replace('.', "\\.")
                    })
                    .collect();
                targets = json!(format!("({})", names.join("|")));
            }
            let c = config.as_object_mut().expect("an object");
            c.insert("peft_type".into(), json!("IA3"));
            c.insert("target_modules".into(), targets);
            c.insert("feedforward_modules".into(), json!(ff));
            c.insert("fan_in_fan_out".into(), json!(false));
            c.insert("init_ia3_weights".into(), json!(true));
        }
        MethodKind::Prompt => {
            let e = get(crate::peft::prompt::EMBEDDINGS)?;
            let n = e.len() / spec.n_embd;
            tensors.push(("prompt_embeddings".into(), vec![n, spec.n_embd], e.to_vec()));
            let c = config.as_object_mut().expect("an object");
            c.insert("peft_type".into(), json!("PROMPT_TUNING"));
            c.insert("num_virtual_tokens".into(), json!(n));
            c.insert("token_dim".into(), json!(spec.n_embd));
            c.insert("num_transformer_submodules".into(), json!(1));
            c.insert("num_attention_heads".into(), json!(spec.n_head));
            c.insert("num_layers".into(), json!(spec.layers.len()));
            c.insert("prompt_tuning_init".into(), json!("RANDOM"));
        }
        _ => {
            let (heads, d, layers) = (spec.n_kv_head, spec.head_dim, spec.layers.len());
            let kv = heads * d;
            let n = get(&crate::peft::prefix::rows_name(0, "k"))?.len() / kv;
            let permuted = layout.permuted_heads("attn_k").is_some();
            let mut out = vec![0.0f32; n * layers * 2 * kv];
            for li in 0..layers {
                for (which, name) in [(0, "k"), (1, "v")] {
                    let rows = get(&crate::peft::prefix::rows_name(li, name))?;
                    for t in 0..n {
                        let dst = &mut out[t * layers * 2 * kv + (2 * li + which) * kv..][..kv];
                        for h in 0..heads {
                            for i in 0..d {
                                let hf = if which == 0 && permuted {
                                    hf_row(i, d, 1)
                                } else {
                                    i
                                };
                                dst[h * d + hf] = rows[t * kv + h * d + i];
                            }
                        }
                    }
                }
            }
            tensors.push(("prompt_embeddings".into(), vec![n, layers * 2 * kv], out));
            let c = config.as_object_mut().expect("an object");
            c.insert("peft_type".into(), json!("PREFIX_TUNING"));
            c.insert("num_virtual_tokens".into(), json!(n));
            c.insert("token_dim".into(), json!(kv));
            c.insert("num_transformer_submodules".into(), json!(1));
            c.insert("num_attention_heads".into(), json!(heads));
            c.insert("num_layers".into(), json!(layers));
            c.insert("encoder_hidden_size".into(), json!(kv));
            c.insert("prefix_projection".into(), json!(false));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(k, s, v)| (k, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(k, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::Invalid(format!("tensor '{k}': {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let data = serialize(views, dir)?;
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialize");
    crate::train::checkpoint::write_atomic(&dir.join(WEIGHTS_FILE), &data)?;
    crate::train::checkpoint::write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}
