//! Adapters on disk: the GGUF LoRA format llama.cpp loads, and Hugging
//! Face PEFT's directory format.

pub mod gguf_lora;
pub mod merge;
pub mod method_file;
pub mod peft;
pub mod peft_export;
pub mod peft_methods;

use crate::model::Model;
use crate::peft::AdapterWeights;
use crate::{Error, Result};
use gguf_lora::LoraFile;
use std::path::{Path, PathBuf};

/// The formats an adapter is read from and written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterFormat {
    /// One GGUF file, as llama.cpp's `--lora` loads it.
    Gguf,
    /// A Hugging Face PEFT directory.
    Peft,
}

impl AdapterFormat {
    /// The format of what is at `path`: a directory holding
    /// `adapter_config.json` is PEFT, anything else GGUF.
    pub fn detect(path: &Path) -> AdapterFormat {
        if path.is_dir() && path.join(peft::CONFIG_FILE).exists() {
            AdapterFormat::Peft
        } else {
            AdapterFormat::Gguf
        }
    }
}

/// Read a LoRA adapter in either format for `model` and check it fits the
/// model's tensors; errors name the file and what does not fit. A method
/// file ([`method_file`]) whose effects are all low-rank (VeRA) reads as
/// the LoRA it amounts to; another method is an error naming `merge` and
/// `--adapter`, which take it.
pub fn load_adapter(path: &Path, model: &Model) -> Result<LoraFile> {
    if !path.is_dir() && method_file::is_method_file(path) {
        let f = method_file::read(path)?;
        let label = f.method.spec.label();
        let weights = AdapterWeights::from_effects(method_file::effects(&f, model, path)?, 1.0)?;
        let Some(pairs) = weights.low_rank_pairs() else {
            return Err(Error::Invalid(format!(
                "{}: a {label} adapter is not a LoRA, so llama.cpp's GGUF LoRA and PEFT's LoRA \
                 cannot hold it: fold it into the model with `edgetune merge`, or apply it with \
                 --adapter",
                path.display()
            )));
        };
        let rank = pairs[0].1;
        return Ok(LoraFile {
            arch: f.arch,
            rank,
            // A′ carries the scale: alpha = rank makes it 1.
            alpha: rank as f32,
            pairs: pairs
                .into_iter()
                .map(|(base, r, a, b)| gguf_lora::LoraPair {
                    base,
                    n_in: a.len() / r,
                    n_out: b.len() / r,
                    a,
                    b,
                })
                .collect(),
            metadata: f.metadata,
        });
    }
    let file = match AdapterFormat::detect(path) {
        AdapterFormat::Peft => peft::read(path, &peft::HfLayout::of(model)?)?,
        AdapterFormat::Gguf if path.is_dir() => {
            return Err(Error::Invalid(format!(
                "{}: a directory without {} is not an adapter",
                path.display(),
                peft::CONFIG_FILE
            )));
        }
        AdapterFormat::Gguf => gguf_lora::read(path)?,
    };
    file.check_base(model.file())
        .map_err(|e| Error::Invalid(format!("{} does not fit the model: {e}", path.display())))?;
    Ok(file)
}

/// Read an adapter of any method, in any format, for `model`: the
/// inference weights at `strength` (1 as trained). A GGUF LoRA or PEFT
/// LoRA is read as [`load_adapter`] does; a method file
/// ([`method_file`]) is rebuilt into its method's effects.
pub fn load_adapter_weights(path: &Path, model: &Model, strength: f32) -> Result<AdapterWeights> {
    if !path.is_dir() && method_file::is_method_file(path) {
        let f = method_file::read(path)?;
        let effects = method_file::effects(&f, model, path)?;
        return AdapterWeights::from_effects(effects, strength);
    }
    if AdapterFormat::detect(path) == AdapterFormat::Peft {
        let cfg_path = path.join(peft::CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: {e}", cfg_path.display())))?;
        if peft_methods::is_method_dir(&cfg) {
            let effects = peft_methods::read_effects(path, &cfg, model)?;
            return AdapterWeights::from_effects(effects, strength);
        }
    }
    let file = load_adapter(path, model)?;
    Ok(AdapterWeights::new(&file, strength))
}

/// The adapters in `dir` (not its subfolders' contents), sorted by path:
/// `.gguf` files that read as GGUF LoRA or method adapters (a base model or any other
/// GGUF is passed over), and PEFT directories.
pub fn find_adapters(dir: &Path) -> Result<Vec<(PathBuf, AdapterFormat)>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    Ok(entries
        .into_iter()
        .filter_map(|path| match AdapterFormat::detect(&path) {
            AdapterFormat::Peft => Some((path, AdapterFormat::Peft)),
            AdapterFormat::Gguf
                if path.extension().is_some_and(|e| e == "gguf")
                    && (gguf_lora::read(&path).is_ok() || method_file::is_method_file(&path)) =>
            {
                Some((path, AdapterFormat::Gguf))
            }
            AdapterFormat::Gguf => None,
        })
        .collect())
}

/// The name an adapter at `path` is known by: its file name without
/// `.gguf`, or its directory's name.
pub fn adapter_name(path: &Path) -> String {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
