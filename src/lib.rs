//! edgetune: fine-tune quantized language models on the device in front of you.
//!
//! The base model is a GGUF file, memory-mapped and never expanded to f32
//! ([`gguf`]); its quantized blocks are decoded on the fly ([`quant`]); text
//! becomes token ids with the tokenizer stored in the file ([`tokenizer`]);
//! [`model`] reads the architecture and [`backend`] runs it; [`infer`] turns
//! logits into generated text and perplexities.
//!
//! See `ARCHITECTURE.md` for the shape of the whole.

pub mod backend;
pub mod error;
pub mod gguf;
pub mod infer;
pub mod model;
pub mod quant;
pub mod tokenizer;

pub use error::{Error, Result};
