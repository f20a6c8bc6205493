//! Backends that execute model ops.
pub mod cpu;
