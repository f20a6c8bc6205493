//! Memory planning: layer recomputation and arena placement by liveness.
//!
//! [`recompute_layers`] rewrites a differentiated graph so that chosen
//! layers keep only their input (the residual stream) through the forward
//! pass and run their forward ops again just before their backward.
//! [`MemoryPlan::new`] then walks the nodes in order and gives every arena
//! tensor an offset in one f32 buffer, reusing the space of tensors whose
//! last reader has run; the buffer's length is the exact peak of
//! activations and gradients, known before the step runs.

use super::{Graph, Node, Op, Phase, TensorId, TensorKind};
use std::collections::{BTreeSet, HashMap};

/// Arena offsets are multiples of this many f32 (64 bytes).
const ALIGN: usize = 16;

/// How to plan a step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// Layers whose activations are recomputed in the backward pass instead
    /// of kept.
    pub recompute: BTreeSet<usize>,
}

/// Return `g` with each layer of `layers` recomputed: its forward ops
/// (except the one producing its checkpointed output) are cloned just
/// before its first backward op, and its backward ops read the clones, so
/// the originals die within the forward pass.
pub fn recompute_layers(g: &Graph, layers: &BTreeSet<usize>) -> Graph {
    if layers.is_empty() {
        return g.clone();
    }
    let checkpoints: BTreeSet<TensorId> = g.checkpoints.iter().copied().collect();
    let mut out = Graph {
        nodes: Vec::with_capacity(g.nodes.len() * 2),
        ..g.clone()
    };
    // Per layer: the forward nodes to clone.
    let mut forward: HashMap<usize, Vec<&Node>> = HashMap::new();
    for n in &g.nodes {
        if let (Phase::Forward, Some(l)) = (n.phase, n.layer)
            && layers.contains(&l)
            && !n.outputs.iter().any(|o| checkpoints.contains(o))
        {
            forward.entry(l).or_default().push(n);
        }
    }
    let mut remap: HashMap<TensorId, TensorId> = HashMap::new();
    let mut done: BTreeSet<usize> = BTreeSet::new();
    for n in &g.nodes {
        let mut n = n.clone();
        if let (Phase::Backward, Some(l)) = (n.phase, n.layer)
            && layers.contains(&l)
        {
            if done.insert(l) {
                for f in &forward[&l] {
                    let mut c = (*f).clone();
                    c.phase = Phase::Recompute;
                    for i in c.inputs.iter_mut() {
                        *i = *remap.get(i).unwrap_or(i);
                    }
                    for o in c.outputs.iter_mut() {
                        let t = out.tensors[*o].clone();
                        out.tensors.push(t);
                        let new = out.tensors.len() - 1;
                        remap.insert(*o, new);
                        *o = new;
                    }
                    out.nodes.push(c);
                }
            }
            for i in n.inputs.iter_mut() {
                *i = *remap.get(i).unwrap_or(i);
            }
        }
        out.nodes.push(n);
    }
    out
}

/// Widest inner dimension of a product [`fuse_thin_products`] fuses.
pub const THIN_K: usize = 16;

/// Return `g` with each thin `MatmulNN` (inner dimension at most
/// [`THIN_K`]: LoRA's `d(xA)·A` in the backward pass) whose only reader is
/// an `Add` folded into that `Add` as one [`Op::MatmulNNAdd`]: the CPU
/// computes `base + dy·p` in one pass over the output instead of writing,
/// reading and adding an `N × k` product. (The GPU runs the unfused graph.)
pub fn fuse_thin_products(g: &Graph) -> Graph {
    let mut readers = vec![0usize; g.tensors.len()];
    let mut producer = vec![usize::MAX; g.tensors.len()];
    for (k, n) in g.nodes.iter().enumerate() {
        for &i in &n.inputs {
            readers[i] += 1;
        }
        for &o in &n.outputs {
            producer[o] = k;
        }
    }
    let mut drop = vec![false; g.nodes.len()];
    let mut out = g.clone();
    for (k, n) in g.nodes.iter().enumerate() {
        if !matches!(n.op, Op::Add) {
            continue;
        }
        for side in 0..2 {
            let t = n.inputs[side];
            let m = producer[t];
            if m == usize::MAX || drop[m] || readers[t] != 1 {
                continue;
            }
            let mm = &g.nodes[m];
            if matches!(mm.op, Op::MatmulNN)
                && g.shape(mm.inputs[1]).rows <= THIN_K
                && g.tensors[t].kind == TensorKind::Activation
            {
                drop[m] = true;
                let node = &mut out.nodes[k];
                node.op = Op::MatmulNNAdd;
                node.inputs = vec![n.inputs[1 - side], mm.inputs[0], mm.inputs[1]];
                break;
            }
        }
    }
    let mut keep = drop.iter().map(|d| !d);
    out.nodes.retain(|_| keep.next().unwrap());
    out
}

/// Where each tensor of a graph lives during a step.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    /// Offset in f32 elements of each arena tensor (`None` for parameters
    /// and tensors nothing writes).
    pub offsets: Vec<Option<usize>>,
    /// Arena length in f32 elements: the peak.
    pub arena_len: usize,
    /// Sum of all arena tensors' sizes, as if nothing were reused.
    pub unplanned_len: usize,
}

impl MemoryPlan {
    /// Place every arena tensor of `g` by liveness.
    pub fn new(g: &Graph) -> MemoryPlan {
        let nt = g.tensors.len();
        let end = g.nodes.len();
        let mut def = vec![usize::MAX; nt];
        let mut last = vec![0usize; nt];
        for (i, n) in g.nodes.iter().enumerate() {
            for &o in &n.outputs {
                def[o] = i;
                last[o] = last[o].max(i);
            }
            for &t in &n.inputs {
                last[t] = last[t].max(i);
            }
        }
        let in_arena = |t: usize| {
            def[t] != usize::MAX
                && !matches!(
                    g.tensors[t].kind,
                    TensorKind::Param(_) | TensorKind::Const(_)
                )
        };
        for (t, l) in last.iter_mut().enumerate() {
            if g.tensors[t].kind == TensorKind::Output {
                *l = end;
            }
        }
        let mut dies_at: Vec<Vec<TensorId>> = vec![Vec::new(); end + 1];
        for t in (0..nt).filter(|&t| in_arena(t)) {
            dies_at[last[t]].push(t);
        }
        let mut offsets = vec![None; nt];
        // Live blocks as offset → (len, tensor).
        let mut live: std::collections::BTreeMap<usize, usize> = std::collections::BTreeMap::new();
        let mut arena_len = 0;
        let mut unplanned_len = 0;
        for (i, n) in g.nodes.iter().enumerate() {
            for &o in &n.outputs {
                if !in_arena(o) || offsets[o].is_some() {
                    continue;
                }
                let len = g.tensors[o].shape.numel().div_ceil(ALIGN) * ALIGN;
                unplanned_len += len;
                let off = best_fit(&live, len);
                live.insert(off, len);
                arena_len = arena_len.max(off + len);
                offsets[o] = Some(off);
            }
            for &t in &dies_at[i] {
                if let Some(off) = offsets[t] {
                    live.remove(&off);
                }
            }
        }
        MemoryPlan {
            offsets,
            arena_len,
            unplanned_len,
        }
    }

    /// Arena size in bytes.
    pub fn arena_bytes(&self) -> u64 {
        self.arena_len as u64 * 4
    }
}

/// The start of the smallest gap between live blocks that holds `len`, or
/// the end of the last block.
fn best_fit(live: &std::collections::BTreeMap<usize, usize>, len: usize) -> usize {
    let mut best: Option<(usize, usize)> = None; // (gap, offset)
    let mut cursor = 0;
    for (&off, &l) in live {
        let gap = off - cursor;
        if gap >= len && best.is_none_or(|(b, _)| gap < b) {
            best = Some((gap, cursor));
        }
        cursor = off + l;
    }
    best.map_or(cursor, |(_, o)| o)
}
