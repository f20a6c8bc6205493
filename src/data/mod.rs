//! Training data: dataset formats, chat and prompt masking, packing, splits.
//!
//! [`load`] turns a file or folder into a [`Dataset`] of token sequences, each
//! with a mask saying which tokens are loss targets:
//!
//! | input | one example per | loss on |
//! |---|---|---|
//! | `.txt` / `.md` file, or a folder of them | file | every token |
//! | `.jsonl` line `{"text": ...}` | line | every token |
//! | `.jsonl` line `{"prompt": ..., "completion": ...}` | line | the completion and EOS |
//! | `.jsonl` line `{"messages": [...]}` | line | the assistant turns, end-of-turn included |
//!
//! ([`DataOptions::train_on_prompt`] trains on every token of the last two.)
//! Examples longer than [`DataOptions::seq`] are cut into windows.
//! [`Dataset::split`] holds some examples out for evaluation; [`Packer`]
//! packs examples into fixed-size rows, several to a row, with the
//! positions and attention segments that keep them apart ([`Batch`]).

mod jsonl;
mod pack;
#[cfg(test)]
mod pack_tests;
#[cfg(test)]
mod tests;

pub use pack::{Batch, IGNORE, Packer, PackerState, eval_batches};

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::{Error, Result};

/// How many skip messages a [`Dataset`] keeps; the count goes on in `skipped`.
const MAX_WARNINGS: usize = 32;

/// How to turn text into training examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOptions {
    /// The longest example in tokens; longer ones are cut into windows.
    pub seq: usize,
    /// Train on prompts and user turns too, not only on completions and
    /// assistant turns.
    pub train_on_prompt: bool,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            seq: 256,
            train_on_prompt: false,
        }
    }
}

/// One training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids, at most [`DataOptions::seq`] of them.
    pub tokens: Vec<u32>,
    /// Same length as `tokens`: whether predicting `tokens[i]` from
    /// `tokens[..i]` is trained. `trainable[0]` is always false.
    pub trainable: Vec<bool>,
    /// Where it came from: `"path:line"` for JSON lines, `"path"` for notes.
    pub source: String,
}

impl Example {
    /// How many tokens are loss targets.
    pub fn target_tokens(&self) -> usize {
        self.trainable.iter().filter(|&&t| t).count()
    }
}

/// Examples ready for training, with what was dropped or cut on the way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dataset {
    /// The examples, in file (and line) order.
    pub examples: Vec<Example>,
    /// Examples (or windows of one) left out: fewer than 2 tokens, or no target.
    pub skipped: usize,
    /// Examples longer than `seq` that were cut into several windows.
    pub split_windows: usize,
    /// The token that pads rows in a [`Batch`]: the model's pad token, else EOS, else 0.
    pub pad_id: u32,
    /// Why examples were skipped, `source: reason`; the first few only.
    pub warnings: Vec<String>,
}

impl Dataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Tokens over all examples.
    pub fn tokens(&self) -> usize {
        self.examples.iter().map(|e| e.tokens.len()).sum()
    }

    /// Loss targets over all examples.
    pub fn target_tokens(&self) -> usize {
        self.examples.iter().map(Example::target_tokens).sum()
    }

    /// Split into `(train, eval)`: a `seed`-determined random
    /// `eval_fraction` of the examples (rounded) goes to `eval`, both keeping
    /// file order. With a fraction above 0 and at least 2 examples, `eval`
    /// gets at least one and `train` keeps at least one. The load counts
    /// (`skipped`, `split_windows`, `warnings`) stay with `train`.
    pub fn split(self, eval_fraction: f32, seed: u64) -> (Dataset, Dataset) {
        let n = self.examples.len();
        let fraction = if eval_fraction.is_nan() {
            0.0
        } else {
            eval_fraction.clamp(0.0, 1.0)
        };
        let mut n_eval = (fraction as f64 * n as f64).round() as usize;
        if fraction > 0.0 && n >= 2 {
            n_eval = n_eval.clamp(1, n - 1);
        } else if n < 2 {
            n_eval = 0;
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let mut is_eval = vec![false; n];
        for &i in &order[..n_eval] {
            is_eval[i] = true;
        }
        let mut eval = Dataset {
            pad_id: self.pad_id,
            ..Dataset::default()
        };
        let mut train = self;
        let all = std::mem::replace(&mut train.examples, Vec::with_capacity(n - n_eval));
        for (e, to_eval) in all.into_iter().zip(is_eval) {
            if to_eval {
                eval.examples.push(e);
            } else {
                train.examples.push(e);
            }
        }
        (train, eval)
    }
}

/// Read a dataset; the format comes from the path (see the [module docs](self)):
/// a folder or `.txt`/`.md` file holds notes, a `.jsonl`/`.json` file holds
/// JSON lines. `template` renders `messages` lines; errors name `file:line:`.
pub fn load(
    path: &Path,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    opts: &DataOptions,
) -> Result<Dataset> {
    if opts.seq < 2 {
        return Err(Error::Invalid(format!(
            "the sequence length must be at least 2 tokens, not {}",
            opts.seq
        )));
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mut b = Builder::new(tok, opts);
    if meta.is_dir() {
        let mut files = Vec::new();
        collect_notes(path, 0, &mut files)?;
        if files.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: no .txt or .md files in this folder",
                path.display()
            )));
        }
        files.sort();
        for f in &files {
            b.note(f)?;
        }
    } else {
        let ext = path
            .extension()
            .and_then(|x| x.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "txt" | "md" => b.note(path)?,
            "jsonl" | "json" => jsonl::load(path, template, &mut b)?,
            _ => {
                return Err(Error::Invalid(format!(
                    "{}: unknown data format; expected a .txt or .md file, a folder of them, \
                     or a .jsonl file",
                    path.display()
                )));
            }
        }
    }
    b.finish(path)
}

/// The `.txt` and `.md` files under `dir`, at any depth.
fn collect_notes(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    // Deep enough for any real tree; stops a symlink loop.
    if depth > 64 {
        return Err(Error::Invalid(format!(
            "{}: folders nested too deep (a symlink loop?)",
            dir.display()
        )));
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if meta.is_dir() {
            collect_notes(&path, depth + 1, out)?;
        } else if meta.is_file() && is_note(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn is_note(path: &Path) -> bool {
    path.extension()
        .and_then(|x| x.to_str())
        .is_some_and(|x| x.eq_ignore_ascii_case("txt") || x.eq_ignore_ascii_case("md"))
}

/// Read a file as UTF-8 text, without a leading byte-order mark.
fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::Invalid(format!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// Collects examples: cuts long ones into windows, skips empty ones.
struct Builder<'a> {
    tok: &'a Tokenizer,
    opts: &'a DataOptions,
    ds: Dataset,
}

impl<'a> Builder<'a> {
    fn new(tok: &'a Tokenizer, opts: &'a DataOptions) -> Self {
        let pad_id = tok.pad_id().or(tok.eos_id()).unwrap_or(0);
        Builder {
            tok,
            opts,
            ds: Dataset {
                pad_id,
                ..Dataset::default()
            },
        }
    }

    /// `tokens` followed by EOS, unless they already end with it (or the model has none).
    fn with_eos(&self, mut tokens: Vec<u32>) -> Vec<u32> {
        if let Some(eos) = self.tok.eos_id()
            && tokens.last() != Some(&eos)
        {
            tokens.push(eos);
        }
        tokens
    }

    /// One note file: every token trained. Control-token spellings in the
    /// text stay text: notes are prose, not pre-formatted prompts.
    fn note(&mut self, path: &Path) -> Result<()> {
        let text = read_text(path)?;
        let loc = path.display().to_string();
        if text.trim().is_empty() {
            self.skip(&loc, "the file is empty");
            return Ok(());
        }
        let tokens = self
            .tok
            .encode_with(&text, true, false)
            .map_err(|e| Error::Invalid(format!("{loc}: {e}")))?;
        let tokens = self.with_eos(tokens);
        let trainable = vec![true; tokens.len()];
        self.push(tokens, trainable, loc);
        Ok(())
    }

    fn skip(&mut self, source: &str, why: &str) {
        self.ds.skipped += 1;
        if self.ds.warnings.len() < MAX_WARNINGS {
            self.ds.warnings.push(format!("{source}: skipped: {why}"));
        }
    }

    /// Add an example, cut into windows of at most `seq` tokens.
    fn push(&mut self, tokens: Vec<u32>, trainable: Vec<bool>, source: String) {
        debug_assert_eq!(tokens.len(), trainable.len());
        let seq = self.opts.seq;
        if tokens.len() > seq {
            self.ds.split_windows += 1;
        }
        for (t, m) in windows(&tokens, &trainable, seq) {
            let mut m = m.to_vec();
            m[0] = false;
            if t.len() < 2 {
                self.skip(&source, "fewer than 2 tokens");
            } else if !m.contains(&true) {
                self.skip(&source, "no token to train on");
            } else {
                self.ds.examples.push(Example {
                    tokens: t.to_vec(),
                    trainable: m,
                    source: source.clone(),
                });
            }
        }
    }

    fn finish(self, path: &Path) -> Result<Dataset> {
        if self.ds.examples.is_empty() {
            let why = match self.ds.warnings.first() {
                Some(w) => format!(" ({} skipped; {w})", self.ds.skipped),
                None => String::new(),
            };
            return Err(Error::Invalid(format!(
                "{}: no training examples{why}",
                path.display()
            )));
        }
        Ok(self.ds)
    }
}

/// Consecutive windows of at most `seq` tokens and their masks (`seq > 0`).
fn windows<'t>(
    tokens: &'t [u32],
    trainable: &'t [bool],
    seq: usize,
) -> impl Iterator<Item = (&'t [u32], &'t [bool])> {
    tokens.chunks(seq).zip(trainable.chunks(seq))
}
