//! Parameter-efficient fine-tuning methods.
//!
//! A method is a set of trainable tensors plus the rewrite it makes to the
//! forward graph around frozen ops ([`GraphHook`]): LoRA adds a low-rank
//! product beside a frozen linear. Each method lives in its own file; the
//! trainer sees only the [`Method`] trait, so a new method is a new file.

pub mod lora;

use crate::graph::{Graph, GraphHook};

/// A PEFT method: how it rewrites the graph, how its parameters start and
/// how fast each learns.
pub trait Method: GraphHook + Send + Sync {
    /// The method's name (`lora`, …).
    fn name(&self) -> &'static str;

    /// Initial values of every parameter of `g` (built with this method), in
    /// the order of `g.params`, drawn deterministically from `seed`.
    fn init(&self, g: &Graph, seed: u64) -> Vec<Vec<f32>>;

    /// Learning-rate multiplier of parameter `name` (1 for most; LoRA+ gives
    /// the B matrices a larger rate).
    fn lr_multiplier(&self, name: &str) -> f32 {
        let _ = name;
        1.0
    }
}
