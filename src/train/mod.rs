//! Training: the step loop, optimizers, schedules, checkpoints, memory budget.

pub mod checkpoint;
pub mod optim;
pub mod plot;
pub mod schedule;
