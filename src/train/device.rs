//! Where a run's steps execute.

use crate::Result;
use crate::backend::TrainStep;
use crate::backend::cpu::train::CpuStep;
use crate::backend::gpu::{GpuContext, GpuStep};
use crate::graph::{Graph, MemoryPlan};
use crate::model::Model;
use std::sync::Arc;

/// The device that runs training steps.
#[derive(Clone, Default)]
pub enum TrainDevice {
    /// The CPU backend on this many worker threads (0: one per core).
    #[default]
    Cpu,
    /// The GPU backend on this context.
    Gpu(Arc<GpuContext>),
}

impl std::fmt::Debug for TrainDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrainDevice::Cpu => f.write_str("Cpu"),
            TrainDevice::Gpu(c) => write!(f, "Gpu({})", c.adapter().name),
        }
    }
}

impl TrainDevice {
    /// For people: `cpu` or `gpu: <adapter name>`.
    pub fn name(&self) -> String {
        match self {
            TrainDevice::Cpu => "cpu".into(),
            TrainDevice::Gpu(c) => format!("gpu: {}", c.adapter().name),
        }
    }

    /// Prepare a planned step of `model` on this device; `fast` takes the
    /// CPU's 8-bit frozen-weight products ([`CpuStep::set_fast`]; the GPU ignores it).
    pub fn step<'m>(
        &self,
        model: &'m Model,
        graph: Graph,
        plan: MemoryPlan,
        threads: usize,
        fast: bool,
    ) -> Result<Box<dyn TrainStep + 'm>> {
        Ok(match self {
            TrainDevice::Cpu => {
                let mut s = CpuStep::new(model, graph, plan, threads)?;
                s.set_fast(fast);
                Box::new(s)
            }
            TrainDevice::Gpu(ctx) => Box::new(GpuStep::new(ctx.clone(), model, graph, plan)?),
        })
    }
}
