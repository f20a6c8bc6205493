//! Adapters on disk: the GGUF LoRA format llama.cpp loads.

pub mod gguf_lora;
