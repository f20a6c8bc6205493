//! Step tests on tiny models (CPU and GPU executors): a packed batch, and
//! a tiny model with a differentiated LoRA graph over it.

use super::{DecoderGraph, Graph, StepInputs, autodiff};
use crate::model::Model;
use crate::model::tiny::{Cfg, values, write_model};
use crate::peft::Method;
use crate::peft::lora::{Lora, LoraConfig};

/// Two sequences of 8 tokens: row 0 one example, row 1 two (the second
/// starting at index 5); token 1's target is masked, as a prompt token's
/// would be.
pub struct TinyBatch {
    pub tokens: Vec<u32>,
    pub targets: Vec<u32>,
    pub positions: Vec<u32>,
    pub seg_start: Vec<u32>,
}

/// The batch over a vocabulary of `vocab` tokens.
pub fn tiny_batch(vocab: u32) -> TinyBatch {
    let tokens: Vec<u32> = (0..16).map(|i| (i * 7 + 3) % vocab).collect();
    let seg_start: Vec<u32> = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 5, 5].to_vec();
    let positions: Vec<u32> = (0..16).map(|i| (i % 8) - seg_start[i as usize]).collect();
    let mut targets = vec![u32::MAX; 16];
    for i in 0..16 {
        // The next token of the same example.
        if i % 8 != 7 && seg_start[i + 1] == seg_start[i] && i != 1 {
            targets[i] = tokens[i + 1];
        }
    }
    TinyBatch {
        tokens,
        targets,
        positions,
        seg_start,
    }
}

/// The step inputs of `b` (dropout seed 5).
pub fn inputs(b: &TinyBatch, loss_scale: f32) -> StepInputs<'_> {
    StepInputs {
        tokens: &b.tokens,
        targets: &b.targets,
        positions: &b.positions,
        seg_start: &b.seg_start,
        loss_scale,
        seed: 5,
    }
}

/// A tiny model of a [`Cfg`] on disk, a differentiated LoRA graph over
/// [`tiny_batch`] and its parameters, B given values (it starts at zero) so
/// that A's gradients are not zero.
pub struct LoraCase {
    _dir: tempfile::TempDir,
    pub model: Model,
    pub graph: Graph,
    pub params: Vec<Vec<f32>>,
    pub batch: TinyBatch,
}

/// The [`LoraCase`] of `cfg` with `lora`.
pub fn lora_case(cfg: &Cfg, lora: LoraConfig) -> LoraCase {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_model(cfg, &path);
    let model = Model::open(&path).unwrap();
    let lora = Lora::new(lora, model.spec().layers.len()).unwrap();
    let mut graph = DecoderGraph::build(model.spec(), 2, 8, &lora);
    autodiff::differentiate(&mut graph).unwrap();
    let mut params = lora.init(&graph, 3);
    for (p, v) in graph.params.iter().zip(params.iter_mut()) {
        if p.name.ends_with("lora_b") {
            *v = values(p.tensor as u64, v.len(), 0.3);
        }
    }
    LoraCase {
        _dir: dir,
        model,
        graph,
        params,
        batch: tiny_batch(cfg.n_vocab as u32),
    }
}

/// Rank 2, α 4, every target, with `dropout`: the LoRA of the executors'
/// gradient tests.
pub fn small_lora(dropout: f32) -> LoraConfig {
    LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout,
        ..LoraConfig::default()
    }
}
