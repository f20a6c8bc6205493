//! LoRA adapters as GGUF files, in the layout llama.cpp's `--lora` loads
//! (`llama_adapter_lora_init_impl` in `src/llama-adapter.cpp`; the reference
//! writer is `convert_lora_to_gguf.py`).
//!
//! # Metadata
//!
//! | key | type | llama.cpp |
//! |---|---|---|
//! | `general.type` | string `"adapter"` | required, else "expect general.type to be 'adapter'" |
//! | `general.architecture` | string, the base model's arch (`llama`, `gemma3`, …) | must equal the model's arch, else "model arch and LoRA arch mismatch" |
//! | `adapter.type` | string `"lora"` | required, else "expect adapter.type to be 'lora'" |
//! | `adapter.lora.alpha` | **f32** | read with `gguf_get_val_f32`, which asserts the type is f32 (any other type aborts); absent reads as 0 |
//! | `general.name` | string | informational |
//! | `general.file_type` | u32 (0 all f32, 1 mostly f16) | informational (written by the converter) |
//!
//! Other string keys (`edgetune.*`) travel in [`LoraFile::metadata`].
//!
//! # Tensors
//!
//! Each adapted base tensor `W` (e.g. `blk.0.attn_q.weight`) has a pair
//! `W.lora_a` and `W.lora_b`; `y = W x + scale · B (A x)` with
//! `scale = alpha / rank` (`rank = lora_b.ne[0]`), or 1 when alpha is 0
//! (`llama_adapter_lora_weight::get_scale`). In ggml dims (fastest first):
//!
//! - `lora_a`: `[n_in, r]` — A as (r, n_in) row-major, PEFT's `lora_A.weight`;
//! - `lora_b`: `[r, n_out]` — B as (n_out, r) row-major, PEFT's `lora_B.weight`.
//!
//! The checks llama.cpp applies on load, all of which [`read()`] repeats except
//! those that need the base model (see [`LoraFile::check_base`]):
//!
//! - every tensor name ends in `.lora_a` or `.lora_b`; names ending in
//!   `_norm.weight` are skipped; anything else throws "LoRA tensor '…' has
//!   unexpected suffix";
//! - each pair is complete: "LoRA tensor pair for '…' is missing one component";
//! - the base tensor exists in the model: "… does not exist in base model";
//! - for every tensor except `token_embd.weight`: `W.ne[0] == a.ne[0]` and
//!   `W.ne[1] == b.ne[1]` ("has incorrect shape"), and `a.ne[1] == b.ne[0]`
//!   ("lora_a tensor is not transposed");
//! - for `token_embd.weight` A and B are flipped (`W.ne[0] == b.ne[1]`,
//!   `W.ne[1] == a.ne[1]`, the converter stores `lora_a` transposed): edgetune
//!   neither writes nor reads embedding adapters.
//!
//! llama.cpp does not check tensor types (ggml's `mul_mat` must support them;
//! the converter writes f32, f16, bf16 or q8_0), that ranks agree across pairs,
//! or the number of dimensions. [`read()`] additionally requires 2-D tensors, one
//! rank for the whole file (what [`LoraFile::rank`] means) and finite values.

use crate::gguf::{GgufFile, GgufWriter, TensorInfo, Value};
use crate::quant::GgmlType;
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// Suffix of the A tensor of a pair.
pub const LORA_A_SUFFIX: &str = ".lora_a";
/// Suffix of the B tensor of a pair.
pub const LORA_B_SUFFIX: &str = ".lora_b";

/// Keys the writer owns; [`LoraFile::metadata`] may not set them.
const OWNED_KEYS: [&str; 6] = [
    "general.type",
    "general.architecture",
    "general.file_type",
    "general.alignment",
    "adapter.type",
    "adapter.lora.alpha",
];

/// The adapter of one base tensor: `ΔW = scale · B A`, shapes (n_out, n_in).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    /// The base tensor's GGUF name, e.g. `blk.0.attn_q.weight`.
    pub base: String,
    /// Input features: the base tensor's `ne[0]` (row length).
    pub n_in: usize,
    /// Output features: the base tensor's `ne[1]` (row count).
    pub n_out: usize,
    /// A, (rank, n_in) row-major.
    pub a: Vec<f32>,
    /// B, (n_out, rank) row-major.
    pub b: Vec<f32>,
}

/// A whole LoRA adapter as llama.cpp loads it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFile {
    /// The base model's `general.architecture`.
    pub arch: String,
    /// The rank r shared by every pair.
    pub rank: usize,
    /// `adapter.lora.alpha`: llama.cpp scales by `alpha / rank` (by 1 when alpha is 0).
    pub alpha: f32,
    /// The pairs, in file order.
    pub pairs: Vec<LoraPair>,
    /// Extra string keys written verbatim (`edgetune.*`, `general.name`, …). On
    /// [`read()`], every string key except `general.type`, `general.architecture`
    /// and `adapter.type`; [`write()`] adds a `general.name` when none is given.
    pub metadata: Vec<(String, String)>,
}

impl LoraFile {
    /// The factor on `B A`, as llama.cpp computes it: `alpha / rank`, or 1 when alpha is 0.
    pub fn scale(&self) -> f32 {
        if self.alpha == 0.0 || self.rank == 0 {
            1.0
        } else {
            self.alpha / self.rank as f32
        }
    }

    /// The checks llama.cpp makes against the base model: same architecture,
    /// every base tensor present and 2-D with `ne = [n_in, n_out]`.
    pub fn check_base(&self, base: &GgufFile) -> Result<()> {
        let fail = |msg: String| Error::Gguf {
            path: base.path().to_path_buf(),
            msg,
        };
        let arch = base.require_str("general.architecture")?;
        if arch != self.arch {
            return Err(fail(format!(
                "the base model's architecture is '{arch}', the LoRA adapter's is '{}'",
                self.arch
            )));
        }
        for p in &self.pairs {
            let t = base.tensor(&p.base).ok_or_else(|| {
                fail(format!(
                    "LoRA tensor '{}' does not exist in the base model",
                    p.base
                ))
            })?;
            let want = [p.n_in as u64, p.n_out as u64];
            if t.dims.get(..2) != Some(&want[..]) || t.dims[2..].iter().any(|&d| d != 1) {
                return Err(fail(format!(
                    "tensor '{}' has dims {:?}, the LoRA pair expects [{}, {}] (n_in, n_out)",
                    p.base, t.dims, p.n_in, p.n_out
                )));
            }
        }
        Ok(())
    }
}

/// Write `f` to `path` atomically, tensors in f16 when `f16` (else f32).
///
/// Fails without touching `path` when a pair's lengths disagree with its
/// shape and the rank, a base name repeats or is an embedding, a value is
/// not finite (or overflows f16), or a metadata key is one the writer owns.
pub fn write(path: &Path, f: &LoraFile, f16: bool) -> Result<()> {
    let bad = |msg: String| Error::Invalid(format!("{}: {msg}", path.display()));
    if f.arch.is_empty() {
        return Err(bad(
            "general.architecture: the base architecture is empty".into()
        ));
    }
    if f.rank == 0 {
        return Err(bad("rank is 0".into()));
    }
    if !f.alpha.is_finite() {
        return Err(bad(format!("adapter.lora.alpha is {}", f.alpha)));
    }
    if f.pairs.is_empty() {
        return Err(bad("the adapter has no LoRA tensors".into()));
    }
    let ty = if f16 { GgmlType::F16 } else { GgmlType::F32 };
    let mut w = GgufWriter::new();
    w.add_metadata("general.type", Value::String("adapter".into()));
    w.add_metadata("general.architecture", Value::String(f.arch.clone()));
    w.add_metadata("general.file_type", Value::U32(u32::from(f16)));
    if !f.metadata.iter().any(|(k, _)| k == "general.name") {
        w.add_metadata(
            "general.name",
            Value::String(format!("{} LoRA adapter (edgetune)", f.arch)),
        );
    }
    w.add_metadata("adapter.type", Value::String("lora".into()));
    w.add_metadata("adapter.lora.alpha", Value::F32(f.alpha));
    for (k, v) in &f.metadata {
        if OWNED_KEYS.contains(&k.as_str()) || k.starts_with("adapter.") {
            return Err(bad(format!(
                "metadata key '{k}' is written from the LoraFile fields, not from metadata"
            )));
        }
        w.add_metadata(k.clone(), Value::String(v.clone()));
    }
    let mut seen = std::collections::HashSet::new();
    for p in &f.pairs {
        check_pair(p, f.rank, f16).map_err(|m| bad(format!("tensor '{}': {m}", p.base)))?;
        if !seen.insert(p.base.as_str()) {
            return Err(bad(format!(
                "tensor '{}': two pairs for one base tensor",
                p.base
            )));
        }
        let (r, n_in, n_out) = (f.rank as u64, p.n_in as u64, p.n_out as u64);
        w.add_f32_tensor(format!("{}{LORA_A_SUFFIX}", p.base), &[n_in, r], ty, &p.a)?;
        w.add_f32_tensor(format!("{}{LORA_B_SUFFIX}", p.base), &[r, n_out], ty, &p.b)?;
    }
    let mut bytes = Vec::new();
    w.write(&mut bytes)
        .map_err(|e| bad(format!("cannot encode GGUF: {e}")))?;
    crate::train::checkpoint::write_atomic(path, &bytes)
}

/// What is wrong with `p` for writing at `rank`, if anything.
fn check_pair(p: &LoraPair, rank: usize, f16: bool) -> Result<(), String> {
    if p.base.is_empty() {
        return Err("empty base tensor name".into());
    }
    if p.base.ends_with(LORA_A_SUFFIX) || p.base.ends_with(LORA_B_SUFFIX) {
        return Err(format!(
            "the base name must not end in {LORA_A_SUFFIX} or {LORA_B_SUFFIX}"
        ));
    }
    if p.base.ends_with("token_embd.weight") {
        return Err(
            "embedding adapters use a flipped layout in llama.cpp and are not supported".into(),
        );
    }
    if p.n_in == 0 || p.n_out == 0 {
        return Err(format!(
            "shape n_in={} n_out={} has a zero",
            p.n_in, p.n_out
        ));
    }
    let want_a = rank.checked_mul(p.n_in);
    let want_b = rank.checked_mul(p.n_out);
    if want_a != Some(p.a.len()) {
        return Err(format!(
            "lora_a has {} values, (rank {rank}, n_in {}) needs {}",
            p.a.len(),
            p.n_in,
            rank.saturating_mul(p.n_in)
        ));
    }
    if want_b != Some(p.b.len()) {
        return Err(format!(
            "lora_b has {} values, (n_out {}, rank {rank}) needs {}",
            p.b.len(),
            p.n_out,
            rank.saturating_mul(p.n_out)
        ));
    }
    let limit = if f16 {
        f32::from(half::f16::MAX)
    } else {
        f32::MAX
    };
    for (which, v) in [("lora_a", &p.a), ("lora_b", &p.b)] {
        if let Some(i) = v.iter().position(|x| !x.is_finite() || x.abs() > limit) {
            return Err(format!(
                "{which} element {i} is {}, not representable{}",
                v[i],
                if f16 { " in f16" } else { "" }
            ));
        }
    }
    Ok(())
}

/// Read and validate an adapter: `general.type` "adapter", `adapter.type`
/// "lora", an f32 `adapter.lora.alpha`, complete pairs of 2-D tensors with
/// matching shapes and one rank. Errors name the file and the key or tensor.
pub fn read(path: &Path) -> Result<LoraFile> {
    let g = GgufFile::open(path)?;
    let fail = |msg: String| Error::Gguf {
        path: path.to_path_buf(),
        msg,
    };
    let general_type = g.require_str("general.type")?;
    if general_type != "adapter" {
        return Err(fail(format!(
            "general.type is '{general_type}', expected 'adapter' (is this a model rather than a LoRA adapter?)"
        )));
    }
    let adapter_type = g.require_str("adapter.type")?;
    if adapter_type != "lora" {
        return Err(fail(format!(
            "adapter.type is '{adapter_type}', expected 'lora'"
        )));
    }
    let arch = g.require_str("general.architecture")?.to_string();
    let alpha = match g.get("adapter.lora.alpha") {
        Some(Value::F32(a)) if a.is_finite() => *a,
        Some(v) => {
            return Err(fail(format!(
                "adapter.lora.alpha is {} {v}; llama.cpp needs a finite f32",
                v.type_name()
            )));
        }
        None => return Err(fail("metadata key 'adapter.lora.alpha' is missing".into())),
    };
    let metadata = g
        .metadata()
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "general.type" | "general.architecture" | "adapter.type"
            )
        })
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect();

    // Pair the tensors up, keeping the order of first appearance.
    let mut order: Vec<&str> = Vec::new();
    let mut halves: HashMap<&str, (Option<&TensorInfo>, Option<&TensorInfo>)> = HashMap::new();
    for t in g.tensors() {
        let (base, is_a) = if let Some(b) = t.name.strip_suffix(LORA_A_SUFFIX) {
            (b, true)
        } else if let Some(b) = t.name.strip_suffix(LORA_B_SUFFIX) {
            (b, false)
        } else if t.name.ends_with("_norm.weight") {
            // llama.cpp skips these too ("TODO: add support for norm vector").
            continue;
        } else {
            return Err(fail(format!(
                "tensor '{}' has an unexpected suffix (expected {LORA_A_SUFFIX} or {LORA_B_SUFFIX})",
                t.name
            )));
        };
        let slot = halves.entry(base).or_insert_with(|| {
            order.push(base);
            (None, None)
        });
        if is_a {
            slot.0 = Some(t)
        } else {
            slot.1 = Some(t)
        };
    }
    if order.is_empty() {
        return Err(fail("the adapter has no LoRA tensors".into()));
    }

    let mut rank: Option<(usize, &str)> = None;
    let mut pairs = Vec::with_capacity(order.len());
    for base in order {
        let (a, b) = match halves[base] {
            (Some(a), Some(b)) => (a, b),
            (None, _) => {
                return Err(fail(format!(
                    "tensor '{base}{LORA_A_SUFFIX}' is missing (its {LORA_B_SUFFIX} is present)"
                )));
            }
            (_, None) => {
                return Err(fail(format!(
                    "tensor '{base}{LORA_B_SUFFIX}' is missing (its {LORA_A_SUFFIX} is present)"
                )));
            }
        };
        if base.ends_with("token_embd.weight") {
            return Err(fail(format!(
                "tensor '{base}': embedding adapters (flipped A/B layout) are not supported"
            )));
        }
        for t in [a, b] {
            if t.dims.len() != 2 {
                return Err(fail(format!(
                    "tensor '{}' has dims {:?}, expected 2 dimensions",
                    t.name, t.dims
                )));
            }
        }
        // a.ne = [n_in, r], b.ne = [r, n_out].
        let (n_in, r_a) = (a.dims[0] as usize, a.dims[1] as usize);
        let (r_b, n_out) = (b.dims[0] as usize, b.dims[1] as usize);
        if r_a != r_b {
            return Err(fail(format!(
                "tensor '{}' has dims {:?} and '{}' has {:?}: lora_a.ne[1] (rank {r_a}) must equal lora_b.ne[0] ({r_b})",
                a.name, a.dims, b.name, b.dims
            )));
        }
        match rank {
            None => rank = Some((r_a, base)),
            Some((r, first)) if r != r_a => {
                return Err(fail(format!(
                    "tensor '{}' has rank {r_a}, but '{first}{LORA_A_SUFFIX}' has rank {r}: one rank per file",
                    a.name
                )));
            }
            Some(_) => {}
        }
        let a_vals = decode(&g, a).map_err(&fail)?;
        let b_vals = decode(&g, b).map_err(&fail)?;
        pairs.push(LoraPair {
            base: base.to_string(),
            n_in,
            n_out,
            a: a_vals,
            b: b_vals,
        });
    }
    Ok(LoraFile {
        arch,
        rank: rank.map_or(0, |r| r.0),
        alpha,
        pairs,
        metadata,
    })
}

/// A tensor's values as f32, checked finite.
pub(crate) fn decode(g: &GgufFile, t: &TensorInfo) -> Result<Vec<f32>, String> {
    // The reader bounded n_elements by the file size, so it fits in memory.
    let mut out = vec![0.0f32; t.n_elements() as usize];
    crate::quant::dequantize_row(t.ty, g.tensor_data(t), &mut out)
        .map_err(|e| format!("tensor '{}': {e}", t.name))?;
    if let Some(i) = out.iter().position(|x| !x.is_finite()) {
        return Err(format!("tensor '{}' element {i} is {}", t.name, out[i]));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic adapter: two layers, q (8 → 8) and down (16 → 8), rank 4.
    fn sample(rank: usize) -> LoraFile {
        let val = |seed: usize, n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i + 1) * (seed + 3) * 2654435761usize) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        };
        let mut pairs = Vec::new();
        for l in 0..2 {
            for (k, (name, n_in, n_out)) in [("attn_q", 8, 8), ("ffn_down", 16, 8)]
                .into_iter()
                .enumerate()
            {
                let seed = l * 10 + k;
                pairs.push(LoraPair {
                    base: format!("blk.{l}.{name}.weight"),
                    n_in,
                    n_out,
                    a: val(seed, rank * n_in),
                    b: val(seed + 100, n_out * rank),
                });
            }
        }
        LoraFile {
            arch: "llama".into(),
            rank,
            alpha: 8.0,
            pairs,
            metadata: vec![
                ("general.name".into(), "test adapter".into()),
                ("edgetune.train.config".into(), "{\"lr\":0.0002}".into()),
            ],
        }
    }

    #[test]
    fn f32_round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.gguf");
        let f = sample(4);
        write(&p, &f, false).unwrap();
        assert_eq!(read(&p).unwrap(), f);
        assert_eq!(f.scale(), 2.0);
    }

    #[test]
    fn f16_round_trip_is_close() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a16.gguf");
        let f = sample(4);
        write(&p, &f, true).unwrap();
        let back = read(&p).unwrap();
        assert_eq!(back.pairs.len(), f.pairs.len());
        assert_eq!((back.rank, back.alpha, &back.arch), (4, 8.0, &f.arch));
        for (x, y) in back.pairs.iter().zip(&f.pairs) {
            assert_eq!((&x.base, x.n_in, x.n_out), (&y.base, y.n_in, y.n_out));
            for (u, v) in x.a.iter().chain(&x.b).zip(y.a.iter().chain(&y.b)) {
                assert!((u - v).abs() <= 1e-3 * v.abs().max(1e-3), "{u} vs {v}");
            }
        }
        let g = GgufFile::open(&p).unwrap();
        assert!(g.tensors().iter().all(|t| t.ty == GgmlType::F16));
        assert_eq!(g.get_u64("general.file_type"), Some(1));
    }

    #[test]
    fn written_file_has_llama_cpp_layout() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.gguf");
        let f = sample(4);
        write(&p, &f, false).unwrap();
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.get_str("general.type"), Some("adapter"));
        assert_eq!(g.get_str("general.architecture"), Some("llama"));
        assert_eq!(g.get_str("adapter.type"), Some("lora"));
        // f32 exactly: llama.cpp's gguf_get_val_f32 asserts the type.
        assert_eq!(g.get("adapter.lora.alpha"), Some(&Value::F32(8.0)));
        assert_eq!(g.get_str("general.name"), Some("test adapter"));
        assert_eq!(g.get_str("edgetune.train.config"), Some("{\"lr\":0.0002}"));
        assert_eq!(g.tensors().len(), 8);
        let a = g.tensor("blk.1.ffn_down.weight.lora_a").unwrap();
        let b = g.tensor("blk.1.ffn_down.weight.lora_b").unwrap();
        assert_eq!(a.dims, [16, 4], "lora_a ne = [n_in, r]");
        assert_eq!(b.dims, [4, 8], "lora_b ne = [r, n_out]");
        assert_eq!(a.ty, GgmlType::F32);
        // Row-major bytes: the first row of A is A[0][0..n_in].
        let pair = &f.pairs[3];
        let bytes = g.tensor_data(a);
        let first: Vec<f32> = bytes[..16 * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(first, pair.a[..16]);
        // Second element of B's data is B[0][1].
        let b1 = f32::from_le_bytes(g.tensor_data(b)[4..8].try_into().unwrap());
        assert_eq!(b1, pair.b[1]);
        // Default general.name when the caller gives none.
        let mut f2 = f.clone();
        f2.metadata.clear();
        write(&p, &f2, false).unwrap();
        let g = GgufFile::open(&p).unwrap();
        assert!(g.get_str("general.name").unwrap().contains("llama"));
    }

    #[test]
    fn scale_follows_llama_cpp() {
        let mut f = sample(4);
        f.alpha = 16.0;
        assert_eq!(f.scale(), 4.0);
        f.alpha = 0.0;
        assert_eq!(f.scale(), 1.0);
    }

    /// Writes a hand-built GGUF and returns read's error.
    fn read_err(build: impl FnOnce(&mut GgufWriter)) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.gguf");
        let mut w = GgufWriter::new();
        build(&mut w);
        w.write_file(&p).unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("bad.gguf"), "error does not name the file: {e}");
        e
    }

    fn adapter_meta(w: &mut GgufWriter) {
        w.add_metadata("general.type", Value::String("adapter".into()));
        w.add_metadata("general.architecture", Value::String("llama".into()));
        w.add_metadata("adapter.type", Value::String("lora".into()));
        w.add_metadata("adapter.lora.alpha", Value::F32(4.0));
    }

    fn add(w: &mut GgufWriter, name: &str, dims: &[u64]) {
        let n = dims.iter().product::<u64>() as usize;
        w.add_f32_tensor(name, dims, GgmlType::F32, &vec![0.5; n])
            .unwrap();
    }

    #[test]
    fn missing_lora_b_names_the_tensor() {
        let e = read_err(|w| {
            adapter_meta(w);
            add(w, "blk.0.attn_q.weight.lora_a", &[8, 4]);
            add(w, "blk.0.attn_q.weight.lora_b", &[4, 8]);
            add(w, "blk.0.attn_k.weight.lora_a", &[8, 4]);
        });
        assert!(e.contains("'blk.0.attn_k.weight.lora_b' is missing"), "{e}");
    }

    #[test]
    fn mismatched_ranks_name_the_tensor() {
        // Inside one pair (llama.cpp's "not transposed" check).
        let e = read_err(|w| {
            adapter_meta(w);
            add(w, "blk.0.attn_q.weight.lora_a", &[8, 4]);
            add(w, "blk.0.attn_q.weight.lora_b", &[8, 4]);
        });
        assert!(
            e.contains("blk.0.attn_q.weight.lora_a") && e.contains("rank 4"),
            "{e}"
        );
        // Across pairs.
        let e = read_err(|w| {
            adapter_meta(w);
            add(w, "blk.0.attn_q.weight.lora_a", &[8, 4]);
            add(w, "blk.0.attn_q.weight.lora_b", &[4, 8]);
            add(w, "blk.0.attn_v.weight.lora_a", &[8, 2]);
            add(w, "blk.0.attn_v.weight.lora_b", &[2, 8]);
        });
        assert!(e.contains("'blk.0.attn_v.weight.lora_a' has rank 2"), "{e}");
    }

    #[test]
    fn wrong_metadata_names_the_key() {
        let e = read_err(|w| {
            adapter_meta(w);
            w.add_metadata("adapter.type", Value::String("lokr".into()));
            add(w, "x.weight.lora_a", &[8, 4]);
            add(w, "x.weight.lora_b", &[4, 8]);
        });
        assert!(e.contains("adapter.type") && e.contains("lokr"), "{e}");
        let e = read_err(|w| {
            adapter_meta(w);
            w.add_metadata("general.type", Value::String("model".into()));
        });
        assert!(e.contains("general.type") && e.contains("'model'"), "{e}");
        let e = read_err(|w| {
            w.add_metadata("general.type", Value::String("adapter".into()));
            w.add_metadata("general.architecture", Value::String("llama".into()));
            w.add_metadata("adapter.type", Value::String("lora".into()));
            add(w, "x.weight.lora_a", &[8, 4]);
            add(w, "x.weight.lora_b", &[4, 8]);
        });
        assert!(
            e.contains("adapter.lora.alpha") && e.contains("missing"),
            "{e}"
        );
        let e = read_err(|w| {
            adapter_meta(w);
            w.add_metadata("adapter.lora.alpha", Value::U32(16));
            add(w, "x.weight.lora_a", &[8, 4]);
            add(w, "x.weight.lora_b", &[4, 8]);
        });
        assert!(e.contains("adapter.lora.alpha is u32"), "{e}");
        let e = read_err(|w| {
            adapter_meta(w);
            add(w, "x.weight.lora_a", &[8, 4]);
            add(w, "x.weight.lora_b", &[4, 8]);
            add(w, "x.weight.lora_c", &[4, 8]);
        });
        assert!(
            e.contains("'x.weight.lora_c'") && e.contains("suffix"),
            "{e}"
        );
    }

    #[test]
    fn norm_tensors_are_skipped_like_llama_cpp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.gguf");
        let mut w = GgufWriter::new();
        adapter_meta(&mut w);
        add(&mut w, "blk.0.attn_norm.weight", &[8]);
        add(&mut w, "blk.0.attn_q.weight.lora_a", &[8, 2]);
        add(&mut w, "blk.0.attn_q.weight.lora_b", &[2, 6]);
        w.write_file(&p).unwrap();
        let f = read(&p).unwrap();
        assert_eq!(f.pairs.len(), 1);
        assert_eq!((f.rank, f.pairs[0].n_in, f.pairs[0].n_out), (2, 8, 6));
        assert_eq!(f.scale(), 2.0);
    }

    #[test]
    fn write_rejects_bad_input_and_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.gguf");
        write(&p, &sample(4), false).unwrap();
        let before = std::fs::read(&p).unwrap();

        let mut f = sample(4);
        f.pairs[1].b.pop();
        let e = write(&p, &f, false).unwrap_err().to_string();
        assert!(
            e.contains("blk.0.ffn_down.weight") && e.contains("lora_b"),
            "{e}"
        );

        let mut f = sample(4);
        f.pairs[2].a[3] = 1e5;
        write(&p, &f, false).unwrap(); // 1e5 is fine in f32
        let e = write(&p, &f, true).unwrap_err().to_string();
        assert!(
            e.contains("blk.1.attn_q.weight") && e.contains("f16"),
            "{e}"
        );
        write(&p, &sample(4), false).unwrap();

        let mut f = sample(4);
        f.metadata.push(("adapter.lora.alpha".into(), "3".into()));
        assert!(
            write(&p, &f, false)
                .unwrap_err()
                .to_string()
                .contains("adapter.lora.alpha")
        );

        let mut f = sample(4);
        f.pairs[0].base = "token_embd.weight".into();
        assert!(
            write(&p, &f, false)
                .unwrap_err()
                .to_string()
                .contains("token_embd")
        );

        assert_eq!(std::fs::read(&p).unwrap(), before);
    }

    #[test]
    fn check_base_matches_dims_and_arch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("base.gguf");
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", Value::String("llama".into()));
        for l in 0..2 {
            add(&mut w, &format!("blk.{l}.attn_q.weight"), &[8, 8]);
            add(&mut w, &format!("blk.{l}.ffn_down.weight"), &[16, 8]);
        }
        w.write_file(&p).unwrap();
        let base = GgufFile::open(&p).unwrap();
        let f = sample(4);
        f.check_base(&base).unwrap();
        let mut g = f.clone();
        g.pairs[1].n_in = 8;
        let e = g.check_base(&base).unwrap_err().to_string();
        assert!(e.contains("blk.0.ffn_down.weight"), "{e}");
        let mut g = f.clone();
        g.pairs[0].base = "blk.5.attn_q.weight".into();
        assert!(
            g.check_base(&base)
                .unwrap_err()
                .to_string()
                .contains("blk.5.attn_q.weight")
        );
        let mut g = f;
        g.arch = "gemma3".into();
        assert!(
            g.check_base(&base)
                .unwrap_err()
                .to_string()
                .contains("gemma3")
        );
    }
}
