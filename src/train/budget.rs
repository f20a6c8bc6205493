//! The memory bill of a training run, computed before it starts, and the
//! choice of micro-batch and recomputed layers that fits a budget.
//!
//! The bill is what the process's resident set will hold: the mapped weights
//! (every page is read each step), the adapter with its gradients' host
//! copies and AdamW moments, the activation arena the [`MemoryPlan`] sized,
//! the scratch of the quantized products and the loss head, and a measured
//! allowance for the runtime itself (code, tokenizer, thread stacks).

use crate::backend::cpu::train::{DEFAULT_LOSS_CHUNK, workspace_bytes};
use crate::graph::{DecoderGraph, Graph, MemoryPlan, autodiff, plan};
use crate::model::DecoderSpec;
use crate::peft::Method;
use crate::{Error, Result};
use serde::Serialize;
use std::collections::BTreeSet;

/// What the process holds besides weights, adapter, arena and scratch:
/// code, the tokenizer, allocator slack and thread stacks (measured on
/// SmolLM2; conservative for larger vocabularies).
pub const RUNTIME_BYTES: u64 = 40 << 20;

/// The planned peak of a training step, broken down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryReport {
    /// Mapped base weights (all of them are read every step).
    pub weights: u64,
    /// Adapter parameters, AdamW moments and host gradient buffers.
    pub adapter: u64,
    /// Activations and gradients: the planned arena.
    pub activations: u64,
    /// Decoded-weight and logit scratch, attention blocks per thread.
    pub workspace: u64,
    /// Runtime allowance ([`RUNTIME_BYTES`]) plus the tokenized dataset.
    pub runtime: u64,
    /// Sequences per forward/backward pass.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Layers recomputed in the backward pass.
    pub recomputed_layers: usize,
    /// Layers in the model.
    pub layers: usize,
    /// Forward passes only (MeZO): no gradients or moments.
    pub forward_only: bool,
}

impl MemoryReport {
    /// The whole planned peak.
    pub fn total(&self) -> u64 {
        self.weights + self.adapter + self.activations + self.workspace + self.runtime
    }
}

/// A planned step: the graph to run, its arena plan and its bill.
pub struct PlannedStep {
    /// The differentiated (and possibly recomputing) graph.
    pub graph: Graph,
    /// Arena placement.
    pub plan: MemoryPlan,
    /// The bill.
    pub report: MemoryReport,
}

/// Bytes of every tensor the decoder reads (a tied output matrix once).
pub fn weight_bytes(spec: &DecoderSpec) -> u64 {
    spec.weights()
        .into_iter()
        .map(|w| (w.row_bytes() * w.rows) as u64)
        .sum()
}

/// What is fixed for a run while the plan is searched.
pub struct StepShape<'a> {
    /// The model.
    pub spec: &'a DecoderSpec,
    /// The PEFT method.
    pub method: &'a dyn Method,
    /// Tokens per sequence.
    pub seq: usize,
    /// Worker threads.
    pub threads: usize,
    /// Bytes of the tokenized dataset held in memory.
    pub data_bytes: u64,
    /// Whether an eval-best copy of the adapter is kept.
    pub keep_best: bool,
    /// The step runs on a GPU: [`fit`] then prefers the largest pass that
    /// fits (small passes cost GPU dispatches and, when accumulating, a
    /// host round trip per pass) instead of the CPU's time estimate.
    pub gpu: bool,
    /// Steps are forward passes only (MeZO): no backward pass, no
    /// gradients, no recomputation; the perturbed point is a copy of the
    /// parameters instead of AdamW's two moments.
    pub zeroth_order: bool,
    /// Frozen forward products in 8-bit arithmetic (CPU): their scratch is
    /// planned ([`TrainConfig::fast`](super::TrainConfig::fast)).
    pub fast: bool,
}

/// Plan one step of `micro_batch` sequences with the first `recompute`
/// layers recomputed.
pub fn plan_step(
    s: &StepShape,
    micro_batch: usize,
    grad_accum: usize,
    recompute: usize,
) -> Result<PlannedStep> {
    let mut g = DecoderGraph::build(s.spec, micro_batch, s.seq, s.method);
    let recompute = if s.zeroth_order { 0 } else { recompute };
    if !s.zeroth_order {
        autodiff::differentiate(&mut g)?;
    }
    let layers: BTreeSet<usize> = (0..recompute.min(s.spec.layers.len())).collect();
    let graph = plan::recompute_layers(&g, &layers);
    let graph = if s.gpu {
        graph
    } else {
        plan::fuse_thin_products(&graph)
    };
    let plan = MemoryPlan::new(&graph);
    let n_params: u64 = graph.params.iter().map(|p| p.shape.numel() as u64).sum();
    // Values, two AdamW moments (MeZO: the perturbed point), the gradient
    // sum when accumulating, the best-eval copy.
    let copies = if s.zeroth_order {
        2 + u64::from(s.keep_best)
    } else {
        3 + u64::from(grad_accum > 1) + u64::from(s.keep_best)
    };
    let threads = s.threads.max(1) as u64;
    let widest_cols = s
        .spec
        .n_ff
        .max(s.spec.n_embd)
        .max(s.spec.n_head * s.spec.head_dim) as u64;
    let per_thread =
        4 * (2 * (s.seq * s.seq) as u64 + 4 * (s.seq * s.spec.head_dim) as u64 + 64 * widest_cols);
    let chunk = DEFAULT_LOSS_CHUNK.min(micro_batch * s.seq) as u64;
    let loss_partials = 4 * 8 * (chunk * s.spec.n_embd as u64 + 256 * s.spec.n_embd as u64);
    let report = MemoryReport {
        weights: weight_bytes(s.spec),
        // The method's constants (VeRA's projections, PiSSA's frozen
        // correction, DoRA's row norms) once.
        adapter: 4 * n_params * copies + graph.const_bytes(),
        activations: plan.arena_bytes(),
        workspace: workspace_bytes(&graph, s.spec.n_vocab, s.fast && !s.gpu)
            + threads * per_thread
            + loss_partials,
        runtime: RUNTIME_BYTES + s.data_bytes,
        micro_batch,
        grad_accum,
        recomputed_layers: layers.len(),
        layers: s.spec.layers.len(),
        forward_only: s.zeroth_order,
    };
    Ok(PlannedStep {
        graph,
        plan,
        report,
    })
}

/// How layer recomputation is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Recompute {
    /// Only as much as the budget needs.
    Auto,
    /// Every layer.
    All,
    /// None.
    Off,
}

/// Share of a step's time its forward pass takes, which a recomputed layer
/// runs again: frozen products, attention and the element-wise ops of the
/// forward in `edgetune bench train`'s profile (SmolLM2, 2 cores), rounded up.
const FORWARD_SHARE: f64 = 0.45;

/// Extra step time per halving of a pass's tokens below 1024: smaller
/// products run further from the GEMM's peak (SmolLM2 on 2 cores: passes of
/// one 256-token sequence cost about 15% more than passes of four).
const SMALL_PASS_COST: f64 = 0.075;

/// A plan's estimated step time relative to one pass of 1024 tokens or
/// more with nothing recomputed.
fn relative_time(r: &MemoryReport, seq: usize) -> f64 {
    let recomputed = r.recomputed_layers as f64 / r.layers.max(1) as f64;
    let rows = (r.micro_batch * seq).max(1) as f64;
    let small = SMALL_PASS_COST * (1024.0 / rows).log2().max(0.0);
    (1.0 + FORWARD_SHARE * recomputed) * (1.0 + small)
}

/// Choose micro-batch and recomputation for an effective batch of
/// `batch × grad_accum` sequences within `budget` bytes (`None`: no limit,
/// no recomputation unless asked). For each micro-batch that divides the
/// effective batch, the fewest recomputed layers that fit; of those plans,
/// the one estimated fastest (recomputing repeats a layer's forward, smaller
/// passes run slower products), the larger micro-batch on a tie; on a GPU
/// the largest micro-batch that fits. Refuses,
/// naming the smallest budget that would work, when nothing fits.
pub fn fit(
    s: &StepShape,
    batch: usize,
    grad_accum: usize,
    budget: Option<u64>,
    recompute: Recompute,
) -> Result<PlannedStep> {
    let n_layers = s.spec.layers.len();
    let effective = batch * grad_accum;
    let candidates: Vec<usize> = match (recompute, budget) {
        _ if s.zeroth_order => vec![0],
        (Recompute::All, _) => vec![n_layers],
        (Recompute::Off, _) | (Recompute::Auto, None) => vec![0],
        (Recompute::Auto, Some(_)) => (0..=n_layers).collect(),
    };
    let Some(budget) = budget else {
        return plan_step(s, batch, grad_accum, candidates[0]);
    };
    // Micro-batches that divide the effective batch, largest first (the
    // requested micro-batch and its divisors).
    let micro: Vec<usize> = (1..=batch)
        .rev()
        .filter(|&m| effective.is_multiple_of(m))
        .collect();
    let mut smallest: Option<PlannedStep> = None;
    let mut chosen: Option<PlannedStep> = None;
    for &m in &micro {
        let accum = effective / m;
        // The peak falls as layers are recomputed: binary search the fewest.
        let (mut lo, mut hi) = (0usize, candidates.len() - 1);
        let last = plan_step(s, m, accum, candidates[hi])?;
        if last.report.total() > budget {
            if smallest
                .as_ref()
                .is_none_or(|p| last.report.total() < p.report.total())
            {
                smallest = Some(last);
            }
            continue;
        }
        let mut best = last;
        while lo < hi {
            let mid = (lo + hi) / 2;
            let p = plan_step(s, m, accum, candidates[mid])?;
            if p.report.total() <= budget {
                hi = mid;
                best = p;
            } else {
                lo = mid + 1;
            }
        }
        let faster = chosen
            .as_ref()
            .is_none_or(|c| relative_time(&best.report, s.seq) < relative_time(&c.report, s.seq));
        if faster {
            chosen = Some(best);
        }
        if s.gpu {
            break;
        }
    }
    if let Some(plan) = chosen {
        return Ok(plan);
    }
    let need = smallest.map_or(0, |p| p.report.total());
    Err(Error::Invalid(format!(
        "a memory budget of {} cannot hold this run: the smallest plan (1 sequence of {} tokens \
         per pass, every layer recomputed) needs {}; raise --memory-budget to at least {}, or \
         lower --seq or the rank",
        fmt_bytes(budget),
        s.seq,
        fmt_bytes(need),
        fmt_bytes(need.div_ceil(1 << 20) << 20),
    )))
}

/// `1234567` → `"1.2 MB"` (powers of 1024, as budgets are given).
pub fn fmt_bytes(b: u64) -> String {
    let mb = b as f64 / (1u64 << 20) as f64;
    if mb >= 1024.0 {
        format!("{:.2} GB", mb / 1024.0)
    } else {
        format!("{mb:.0} MB")
    }
}

/// Parse `512MB`, `1.5GB`, `800M`, `2g`, `1048576` (bytes) into bytes.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.trim().parse().map_err(|_| {
        Error::Invalid(format!("'{s}' is not a size: write it like 512MB or 1.5GB"))
    })?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(Error::Invalid(format!(
                "'{s}': unknown size unit '{other}' (use KB, MB or GB)"
            )));
        }
    };
    if !v.is_finite() || v <= 0.0 {
        return Err(Error::Invalid(format!("'{s}' is not a positive size")));
    }
    Ok((v * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::model::tiny::{Cfg, write_model};
    use crate::peft::lora::{Lora, LoraConfig};
    use crate::quant::GgmlType;

    #[test]
    fn fit_takes_the_fastest_plan_that_fits_and_on_a_gpu_the_largest_pass() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_model(&Cfg::llama(GgmlType::Q8_0, 6), &path);
        let model = Model::open(&path).unwrap();
        let spec = model.spec();
        let lora = Lora::new(LoraConfig::default(), spec.layers.len()).unwrap();
        let shape = |gpu| StepShape {
            zeroth_order: false,
            spec,
            method: &lora,
            seq: 64,
            threads: 1,
            data_bytes: 0,
            keep_best: false,
            gpu,
            fast: false,
        };
        let s = shape(false);
        // Budgets between "one sequence, nothing recomputed" and "four
        // sequences, nothing recomputed".
        let low = plan_step(&s, 1, 4, 0).unwrap().report.total();
        let high = plan_step(&s, 4, 1, 0).unwrap().report.total();
        assert!(low < high);
        for budget in [low, (low + high) / 2, high - 1] {
            // Brute force: the fewest recomputed layers per micro-batch.
            let feasible: Vec<MemoryReport> = [4usize, 2, 1]
                .iter()
                .filter_map(|&m| {
                    (0..=spec.layers.len())
                        .map(|r| plan_step(&s, m, 4 / m, r).unwrap().report)
                        .find(|r| r.total() <= budget)
                })
                .collect();
            let fastest = feasible
                .iter()
                .min_by(|a, b| relative_time(a, 64).total_cmp(&relative_time(b, 64)))
                .unwrap();
            let got = fit(&s, 4, 1, Some(budget), Recompute::Auto).unwrap().report;
            assert_eq!(
                (got.micro_batch, got.recomputed_layers),
                (fastest.micro_batch, fastest.recomputed_layers),
                "budget {budget}"
            );
            assert!(got.total() <= budget);
            let on_gpu = fit(&shape(true), 4, 1, Some(budget), Recompute::Auto)
                .unwrap()
                .report;
            assert_eq!(
                on_gpu.micro_batch, feasible[0].micro_batch,
                "budget {budget}"
            );
        }
        // Recomputation adds time.
        let mut r = plan_step(&s, 4, 1, 0).unwrap().report;
        let plain = relative_time(&r, 256);
        r.recomputed_layers = r.layers;
        assert!(relative_time(&r, 256) > plain);
    }

    #[test]
    fn sizes_parse_in_the_usual_spellings() {
        assert_eq!(parse_bytes("512MB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5 GB").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("800m").unwrap(), 800 << 20);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        for bad in ["", "MB", "-5MB", "12 parsecs"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }
}
