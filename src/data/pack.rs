//! Packing examples into fixed-size batches: several examples share a row,
//! each with its own positions and attention segment, so none sees another.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Dataset, windows};
use crate::{Error, Result};

/// The target of a token that is not trained (padding, prompts, the last
/// token of an example).
pub const IGNORE: u32 = u32::MAX;

/// `batch` rows of `seq` tokens, every field row-major with `batch * seq`
/// entries (row `b`, position `t` at `b * seq + t`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Rows.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Input token ids; padding is the dataset's pad token.
    pub tokens: Vec<u32>,
    /// The token to predict at each position (the next token of the same
    /// example when that token is trainable), else [`IGNORE`].
    pub targets: Vec<u32>,
    /// Position within the token's own example: RoPE restarts at 0 for
    /// every packed example; 0 for padding.
    pub positions: Vec<u32>,
    /// Index within the row of the first token of the token's example:
    /// position `t` attends to keys `seg_start[t]..=t` only. Padding is its
    /// own segment (`seg_start[t] = t`).
    pub seg_start: Vec<u32>,
}

impl Batch {
    /// The batch as a training step's inputs, with the gradient's
    /// `loss_scale` and the dropout `seed`.
    pub fn step_inputs(&self, loss_scale: f32, seed: u64) -> crate::graph::StepInputs<'_> {
        crate::graph::StepInputs {
            tokens: &self.tokens,
            targets: &self.targets,
            positions: &self.positions,
            seg_start: &self.seg_start,
            loss_scale,
            seed,
        }
    }

    /// The batch with `n` virtual tokens (prompt or prefix tuning) before
    /// every row: token 0 at positions `0..n`, no targets, their own
    /// segment; the row's tokens follow at positions `n…`, their segment
    /// starts moved by `n`.
    pub fn with_virtual(&self, n: usize) -> Batch {
        if n == 0 {
            return self.clone();
        }
        let seq = self.seq + n;
        let mut out = Batch {
            batch: self.batch,
            seq,
            tokens: Vec::with_capacity(self.batch * seq),
            targets: Vec::with_capacity(self.batch * seq),
            positions: Vec::with_capacity(self.batch * seq),
            seg_start: Vec::with_capacity(self.batch * seq),
        };
        for r in 0..self.batch {
            let row = r * self.seq..(r + 1) * self.seq;
            out.tokens.extend(std::iter::repeat_n(0, n));
            out.targets.extend(std::iter::repeat_n(IGNORE, n));
            out.positions.extend(0..n as u32);
            out.seg_start.extend(std::iter::repeat_n(0, n));
            out.tokens.extend_from_slice(&self.tokens[row.clone()]);
            out.targets.extend_from_slice(&self.targets[row.clone()]);
            out.positions
                .extend(self.positions[row.clone()].iter().map(|p| p + n as u32));
            out.seg_start
                .extend(self.seg_start[row].iter().map(|s| s + n as u32));
        }
        out
    }

    /// A batch of padding only.
    fn padding(batch: usize, seq: usize, pad: u32) -> Batch {
        let n = batch * seq;
        Batch {
            batch,
            seq,
            tokens: vec![pad; n],
            targets: vec![IGNORE; n],
            positions: vec![0; n],
            seg_start: (0..batch).flat_map(|_| 0..seq as u32).collect(),
        }
    }

    /// How many positions have a target (not [`IGNORE`]).
    pub fn target_count(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }

    /// Write `unit` into `row` at column `at`.
    fn put(&mut self, row: usize, at: usize, unit: &Unit) {
        let base = row * self.seq + at;
        for (t, (&tok, &target)) in unit.tokens.iter().zip(&unit.targets).enumerate() {
            self.tokens[base + t] = tok;
            self.targets[base + t] = target;
            self.positions[base + t] = t as u32;
            self.seg_start[base + t] = at as u32;
        }
    }

    /// Fill rows greedily from `order[*cursor..]` (first fit in order: a new
    /// row starts when the next unit does not fit), advancing `cursor`.
    fn fill(&mut self, units: &[Unit], order: &[u32], cursor: &mut usize) {
        for row in 0..self.batch {
            let mut used = 0;
            while let Some(&i) = order.get(*cursor) {
                let unit = &units[i as usize];
                if used + unit.len() > self.seq {
                    break;
                }
                self.put(row, used, unit);
                used += unit.len();
                *cursor += 1;
            }
            if *cursor == order.len() {
                break;
            }
        }
    }
}

/// One packable sequence: an example, or a window of one longer than `seq`.
#[derive(Debug, Clone)]
struct Unit {
    tokens: Vec<u32>,
    /// `targets[t]`: `tokens[t + 1]` when trainable, else [`IGNORE`].
    targets: Vec<u32>,
}

impl Unit {
    fn len(&self) -> usize {
        self.tokens.len()
    }
}

/// The dataset's examples as units of at most `seq` tokens, in order, those
/// without a target left out.
fn units(ds: &Dataset, seq: usize) -> Vec<Unit> {
    let mut out = Vec::with_capacity(ds.examples.len());
    for e in &ds.examples {
        for (tokens, trainable) in windows(&e.tokens, &e.trainable, seq) {
            let targets: Vec<u32> = (0..tokens.len())
                .map(|t| match trainable.get(t + 1) {
                    Some(true) => tokens[t + 1],
                    _ => IGNORE,
                })
                .collect();
            if targets.iter().any(|&t| t != IGNORE) {
                out.push(Unit {
                    tokens: tokens.to_vec(),
                    targets,
                });
            }
        }
    }
    out
}

/// Where a [`Packer`] is: the epoch, and the index (in that epoch's
/// shuffled order) of the next example to pack. Saved with a checkpoint,
/// it resumes training on exactly the batches that would have come next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PackerState {
    /// Epochs completed.
    pub epoch: u64,
    /// The next example of this epoch's order.
    pub next_example: u64,
}

/// Endless training batches: each epoch shuffles the examples (ChaCha8
/// seeded with `seed + epoch`) and packs them in that order into rows of
/// `seq` tokens, `batch` rows at a time. An epoch ends with the batch that
/// holds its last example, padded as needed; the next batch starts the next
/// epoch. Examples longer than `seq` are cut into windows.
#[derive(Debug, Clone)]
pub struct Packer {
    units: Vec<Unit>,
    seq: usize,
    batch: usize,
    seed: u64,
    pad: u32,
    state: PackerState,
    /// This epoch's order of `units`.
    order: Vec<u32>,
}

impl Packer {
    /// A packer over `ds`, at epoch 0; an error when `seq < 2`, `batch` is
    /// 0, or no example has a target.
    pub fn new(ds: &Dataset, seq: usize, batch: usize, seed: u64) -> Result<Packer> {
        if seq < 2 || batch == 0 {
            return Err(Error::Invalid(format!(
                "cannot pack batches of {batch} rows of {seq} tokens: need at least 1 row of 2"
            )));
        }
        let units = units(ds, seq);
        if units.is_empty() {
            return Err(Error::Invalid(
                "the dataset has no example with a token to train on".into(),
            ));
        }
        let order = shuffled(units.len(), seed, 0);
        Ok(Packer {
            units,
            seq,
            batch,
            seed,
            pad: ds.pad_id,
            state: PackerState::default(),
            order,
        })
    }

    /// Where the packer is; [`restore`](Self::restore) returns to it.
    pub fn state(&self) -> PackerState {
        self.state
    }

    /// Continue from `state` (from [`state`](Self::state) on a packer over
    /// the same dataset, `seq` and seed); an error when it points past
    /// the examples.
    pub fn restore(&mut self, state: PackerState) -> Result<()> {
        let n = self.units.len() as u64;
        if state.next_example > n {
            return Err(Error::Invalid(format!(
                "the data position (example {} of epoch {}) is past the {n} examples of \
                 this dataset; was it made with other data?",
                state.next_example, state.epoch
            )));
        }
        self.order = shuffled(self.units.len(), self.seed, state.epoch);
        self.state = state;
        if state.next_example == n {
            self.next_epoch();
        }
        Ok(())
    }

    fn next_epoch(&mut self) {
        self.state.epoch += 1;
        self.state.next_example = 0;
        self.order = shuffled(self.units.len(), self.seed, self.state.epoch);
    }

    /// The next batch, moving to the next epoch after an epoch's last.
    pub fn next_batch(&mut self) -> Batch {
        let mut b = Batch::padding(self.batch, self.seq, self.pad);
        let mut cursor = self.state.next_example as usize;
        b.fill(&self.units, &self.order, &mut cursor);
        self.state.next_example = cursor as u64;
        if cursor == self.order.len() {
            self.next_epoch();
        }
        b
    }

    /// Batches in the current epoch, start to end. Other epochs may differ
    /// by a batch or so, since packing depends on the order.
    pub fn steps_per_epoch(&self) -> usize {
        let mut rows = 0usize;
        let mut used = self.seq;
        for &i in &self.order {
            let len = self.units[i as usize].len();
            if used + len > self.seq {
                rows += 1;
                used = 0;
            }
            used += len;
        }
        rows.div_ceil(self.batch)
    }

    /// Examples (and windows) packed per epoch.
    pub fn examples_per_epoch(&self) -> usize {
        self.units.len()
    }
}

/// `0..n` shuffled by ChaCha8 seeded with `seed + epoch`.
fn shuffled(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch)));
    order
}

/// Every example of `ds` once, in order, packed like [`Packer`] does; the
/// last batch is padded. Examples longer than `seq` are cut into windows.
///
/// # Panics
/// If `seq` or `batch` is 0.
pub fn eval_batches(ds: &Dataset, seq: usize, batch: usize) -> Vec<Batch> {
    assert!(seq > 0 && batch > 0, "eval batches of {batch} × {seq}");
    let units = units(ds, seq);
    let order: Vec<u32> = (0..units.len() as u32).collect();
    let mut cursor = 0;
    let mut out = Vec::new();
    while cursor < order.len() {
        let mut b = Batch::padding(batch, seq, ds.pad_id);
        b.fill(&units, &order, &mut cursor);
        out.push(b);
    }
    out
}
