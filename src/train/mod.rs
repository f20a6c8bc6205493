//! Training: the step loop, optimizers, schedules, checkpoints, memory budget.
//!
//! [`train`] is the whole run as one library call: it loads and checks the
//! data, plans memory (fitting `--memory-budget` by micro-batch and layer
//! recomputation, or refusing before any work), then steps AdamW over the
//! adapter, evaluates, checkpoints atomically and writes `adapter.gguf`, a
//! loss curve and a summary into the output folder. Progress arrives as
//! [`TrainEvent`]s through a callback that can cancel.

pub mod adapter;
pub mod bench;
pub mod budget;
pub mod checkpoint;
pub mod config;
mod device;
pub mod mezo;
pub mod optim;
pub mod plot;
mod run;
pub mod schedule;

pub use budget::{MemoryReport, Recompute};
pub use config::{Duration, Optimizer, TrainConfig};
pub use device::TrainDevice;
pub use run::{
    ADAPTER_FILE, CHECKPOINT_FILE, CURVE_FILE, SUMMARY_FILE, TrainEvent, TrainRequest,
    TrainSummary, graph_seq, train,
};
