//! The CPU backend: the reference every other backend is tested against, and
//! the fallback without a GPU. Multithreaded with rayon; quantized weights are
//! decoded on the fly from the memory map.

pub mod attention;
mod decoder;
pub mod gemm;
pub mod invariant;
pub mod matmul;
pub mod ops;
mod session;
pub mod train;

pub use crate::backend::Logits;
pub(crate) use decoder::thread_pool;

/// Worker threads for a request of `threads` (0: one per core).
pub fn resolve_threads(threads: usize) -> usize {
    match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}
pub use decoder::{CpuDecoder, CpuOptions, KvCache, SeqPass};
pub use matmul::MatvecMode;
pub use session::CpuSession;
