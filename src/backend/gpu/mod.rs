//! The GPU backend: WGSL compute shaders through wgpu (Vulkan, Metal, DX12).
//! Quantized weights are uploaded once in their GGUF block layout, straight
//! from the memory map, and decoded inside the kernels; tensors larger than
//! the device's storage-binding limit are split by rows. A forward step is
//! recorded into one command encoder and submitted once.

mod bench;
mod context;
mod decoder;
pub mod matmul;
pub mod ops;
mod session;
pub mod train;
mod train_step;
#[cfg(test)]
mod train_tests;

pub use context::{AdapterSummary, GpuContext, GpuOptions, list_adapters};
pub(crate) use context::{Dispatch, groups_1d};
pub use decoder::GpuDecoder;
pub use matmul::GpuWeight;
pub use ops::KvFormat;
pub use session::GpuSession;
pub use train_step::GpuStep;

#[cfg(test)]
pub(crate) mod testing {
    //! One device shared by every GPU test of the process (software Vulkan
    //! is slow to start and slow to run: tests stay small and share it).
    use super::{GpuContext, GpuOptions};
    use std::sync::{Arc, OnceLock};

    fn open(max_binding: Option<u64>) -> Option<Arc<GpuContext>> {
        match GpuContext::new(&GpuOptions {
            allow_software: true,
            max_binding,
            ..Default::default()
        }) {
            Ok(c) => Some(c),
            Err(e) if std::env::var_os("EDGETUNE_REQUIRE_GPU").is_some() => {
                panic!("EDGETUNE_REQUIRE_GPU is set but no GPU opens: {e}")
            }
            Err(e) => {
                eprintln!("skipping GPU test: {e}");
                None
            }
        }
    }

    /// The shared device, or `None` (test skipped) where none exists and
    /// `EDGETUNE_REQUIRE_GPU` is not set.
    pub fn context() -> Option<Arc<GpuContext>> {
        static CTX: OnceLock<Option<Arc<GpuContext>>> = OnceLock::new();
        CTX.get_or_init(|| open(None)).clone()
    }

    /// A device whose storage bindings are limited to 4 KiB, so that small
    /// test tensors are split across several bindings.
    pub fn context_small_bindings() -> Option<Arc<GpuContext>> {
        static CTX: OnceLock<Option<Arc<GpuContext>>> = OnceLock::new();
        CTX.get_or_init(|| open(Some(4096))).clone()
    }
}
