//! edgetune: fine-tune quantized language models on the device in front of you.
//!
//! The base model is a GGUF file, memory-mapped and never expanded to f32
//! ([`gguf`]); its quantized blocks are decoded on the fly ([`quant`]); text
//! becomes token ids with the tokenizer stored in the file ([`tokenizer`]);
//! [`model`] reads the architecture and [`backend`] runs it; [`infer`] turns
//! logits into generated text and perplexities.
//!
//! ```no_run
//! use edgetune::{backend::cpu::CpuDecoder, infer, model::Model, tokenizer::Tokenizer};
//! use std::ops::ControlFlow;
//!
//! let model = Model::open("models/SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let tokenizer = Tokenizer::from_gguf(model.file())?;
//! let decoder = CpuDecoder::new(&model)?;
//! let prompt = tokenizer.encode("The capital of France is", true)?;
//! let out = infer::generate(&decoder, &tokenizer, &prompt, &Default::default(), &mut |piece| {
//!     print!("{piece}");
//!     ControlFlow::Continue(())
//! })?;
//! println!("\n{} tokens in {:.2} s", out.tokens.len(), out.generate_seconds);
//! # Ok::<(), edgetune::Error>(())
//! ```
//!
//! See `ARCHITECTURE.md` for the shape of the whole.

pub mod backend;
pub mod data;
pub mod error;
pub mod export;
pub mod gguf;
pub mod graph;
pub mod infer;
pub mod model;
pub mod peft;
pub mod quant;
pub mod serve;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
