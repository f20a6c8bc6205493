//! A packed batch for step tests on tiny models (CPU and GPU executors).

use super::StepInputs;

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
