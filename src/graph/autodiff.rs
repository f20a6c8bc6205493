//! Reverse-mode differentiation of a forward graph.
//!
//! Walks the forward nodes backwards from the loss and appends, for each
//! node with a gradient flowing into it, the backward ops of its rule — but
//! only toward inputs that depend on a trainable parameter. The frozen base
//! weights are not tensors of the graph, so no gradient buffer can exist for
//! them; activations upstream of every parameter (the embedding, for LoRA)
//! get none either.

use super::{Graph, Node, Op, Phase, Shape, TensorId, TensorKind};
use crate::{Error, Result};

/// Which tensors depend on a trainable parameter.
fn requires_grad(g: &Graph) -> Vec<bool> {
    let mut rg: Vec<bool> = g
        .tensors
        .iter()
        .map(|t| matches!(t.kind, TensorKind::Param(_)))
        .collect();
    for n in &g.nodes {
        if n.inputs.iter().any(|&i| rg[i]) {
            for &o in &n.outputs {
                rg[o] = true;
            }
        }
    }
    rg
}

/// Append the backward pass of `g` (which must end in a loss and contain
/// only forward nodes) and record each parameter's gradient tensor.
pub fn differentiate(g: &mut Graph) -> Result<()> {
    let loss = g
        .loss
        .ok_or_else(|| Error::Invalid("the graph has no loss to differentiate".into()))?;
    if g.params.is_empty() {
        return Err(Error::Invalid(
            "nothing to train: the graph has no parameters".into(),
        ));
    }
    let rg = requires_grad(g);
    if !rg[loss] {
        return Err(Error::Invalid(
            "no trainable parameter reaches the loss".into(),
        ));
    }
    let mut grad: Vec<Option<TensorId>> = vec![None; g.tensors.len()];
    let forward: Vec<Node> = g.nodes.clone();
    for node in forward.iter().rev() {
        let layer = node.layer;
        let emit = |g: &mut Graph, op: Op, inputs: &[TensorId], outs: &[(&str, Shape)]| {
            g.push(op, inputs, outs, layer, Phase::Backward)
        };
        // The loss head computes its own input gradient in the forward pass.
        if let Op::LossHead { .. } = node.op {
            let x = node.inputs[0];
            if rg[x] {
                accumulate(g, &mut grad, x, node.outputs[1], layer);
            }
            continue;
        }
        let Some(dy) = grad[node.outputs[0]] else {
            continue;
        };
        let needs = |i: usize| rg[node.inputs[i]];
        let shape_of = |g: &Graph, i: usize| g.shape(node.inputs[i]);
        let name = |g: &Graph, i: usize| format!("d.{}", g.tensors[node.inputs[i]].name);
        let mut contrib: Vec<(usize, TensorId)> = Vec::new();
        match &node.op {
            Op::Embed { .. } => {}
            Op::RmsNorm { w, eps } => {
                if needs(0) {
                    let (n, s) = (name(g, 0), shape_of(g, 0));
                    let op = Op::RmsNormBack { w: *w, eps: *eps };
                    contrib.push((0, emit(g, op, &[node.inputs[0], dy], &[(&n, s)])[0]));
                }
            }
            Op::Linear { w } => {
                if needs(0) {
                    let (n, s) = (name(g, 0), shape_of(g, 0));
                    contrib.push((0, emit(g, Op::LinearBackX { w: *w }, &[dy], &[(&n, s)])[0]));
                }
            }
            Op::MatmulT => {
                if needs(0) {
                    let (n, s) = (name(g, 0), shape_of(g, 0));
                    let t = emit(g, Op::MatmulNN, &[dy, node.inputs[1]], &[(&n, s)])[0];
                    contrib.push((0, t));
                }
                if needs(1) {
                    let (n, s) = (name(g, 1), shape_of(g, 1));
                    let t = emit(g, Op::MatmulTN, &[dy, node.inputs[0]], &[(&n, s)])[0];
                    contrib.push((1, t));
                }
            }
            Op::MatmulTAdd => {
                if needs(0) {
                    contrib.push((0, dy));
                }
                if needs(1) {
                    let (n, s) = (name(g, 1), shape_of(g, 1));
                    let t = emit(g, Op::MatmulNN, &[dy, node.inputs[2]], &[(&n, s)])[0];
                    contrib.push((1, t));
                }
                if needs(2) {
                    let (n, s) = (name(g, 2), shape_of(g, 2));
                    let t = emit(g, Op::MatmulTN, &[dy, node.inputs[1]], &[(&n, s)])[0];
                    contrib.push((2, t));
                }
            }
            Op::MatmulNN => {
                // y = a·p: da = dy·pᵀ, dp = aᵀ·dy.
                if needs(0) {
                    let (n, s) = (name(g, 0), shape_of(g, 0));
                    let t = emit(g, Op::MatmulT, &[dy, node.inputs[1]], &[(&n, s)])[0];
                    contrib.push((0, t));
                }
                if needs(1) {
                    let (n, s) = (name(g, 1), shape_of(g, 1));
                    let t = emit(g, Op::MatmulTN, &[node.inputs[0], dy], &[(&n, s)])[0];
                    contrib.push((1, t));
                }
            }
            Op::MulCols => {
                if needs(0) {
                    let (n, s) = (name(g, 0), shape_of(g, 0));
                    let t = emit(g, Op::MulCols, &[dy, node.inputs[1]], &[(&n, s)])[0];
                    contrib.push((0, t));
                }
                if needs(1) {
                    let (n, s) = (name(g, 1), shape_of(g, 1));
                    let t = emit(g, Op::ColDot, &[dy, node.inputs[0]], &[(&n, s)])[0];
                    contrib.push((1, t));
                }
            }
            Op::Mul => {
                for (i, other) in [(0, 1), (1, 0)] {
                    if needs(i) {
                        let (n, s) = (name(g, i), shape_of(g, i));
                        let t = emit(g, Op::Mul, &[dy, node.inputs[other]], &[(&n, s)])[0];
                        contrib.push((i, t));
                    }
                }
            }
            Op::Kron => {
                if needs(0) || needs(1) {
                    let outs = [(name(g, 0), shape_of(g, 0)), (name(g, 1), shape_of(g, 1))];
                    let outs: Vec<(&str, Shape)> =
                        outs.iter().map(|(n, s)| (n.as_str(), *s)).collect();
                    let d = emit(
                        g,
                        Op::KronBack,
                        &[node.inputs[0], node.inputs[1], dy],
                        &outs,
                    );
                    for (i, &t) in d.iter().enumerate() {
                        if needs(i) {
                            contrib.push((i, t));
                        }
                    }
                }
            }
            Op::DoraNorm { s } => {
                // Inputs c, wa, b, gram: c is the frozen weight's (no gradient).
                if (1..4).any(needs) {
                    let outs = [
                        (name(g, 1), shape_of(g, 1)),
                        (name(g, 2), shape_of(g, 2)),
                        (name(g, 3), shape_of(g, 3)),
                    ];
                    let outs: Vec<(&str, Shape)> =
                        outs.iter().map(|(n, s)| (n.as_str(), *s)).collect();
                    let ins = [node.inputs[1], node.inputs[2], node.inputs[3], dy];
                    let d = emit(g, Op::DoraNormBack { s: *s }, &ins, &outs);
                    for (i, &t) in d.iter().enumerate() {
                        if needs(i + 1) {
                            contrib.push((i + 1, t));
                        }
                    }
                }
            }
            Op::RsqrtMul => {
                if needs(0) || needs(1) {
                    let outs = [(name(g, 0), shape_of(g, 0)), (name(g, 1), shape_of(g, 1))];
                    let outs: Vec<(&str, Shape)> =
                        outs.iter().map(|(n, s)| (n.as_str(), *s)).collect();
                    let ins = [node.inputs[0], node.inputs[1], dy];
                    let d = emit(g, Op::RsqrtMulBack, &ins, &outs);
                    for (i, &t) in d.iter().enumerate() {
                        if needs(i) {
                            contrib.push((i, t));
                        }
                    }
                }
            }
            Op::PrefixRows { n, seq } => {
                if needs(0) || needs(1) {
                    let outs = [(name(g, 0), shape_of(g, 0)), (name(g, 1), shape_of(g, 1))];
                    let outs: Vec<(&str, Shape)> =
                        outs.iter().map(|(n, s)| (n.as_str(), *s)).collect();
                    let op = Op::PrefixRowsBack { n: *n, seq: *seq };
                    let d = emit(g, op, &[dy], &outs);
                    for (i, &t) in d.iter().enumerate() {
                        if needs(i) {
                            contrib.push((i, t));
                        }
                    }
                }
            }
            Op::AddScaled { s } => {
                if needs(0) {
                    contrib.push((0, dy));
                }
                if needs(1) {
                    let t = if *s == 1.0 {
                        dy
                    } else {
                        let (n, sh) = (name(g, 1), shape_of(g, 1));
                        emit(g, Op::Scale { s: *s }, &[dy], &[(&n, sh)])[0]
                    };
                    contrib.push((1, t));
                }
            }
            Op::Add => {
                for i in 0..2 {
                    if needs(i) {
                        contrib.push((i, dy));
                    }
                }
            }
            Op::Scale { s } => {
                if needs(0) {
                    let (n, sh) = (name(g, 0), shape_of(g, 0));
                    contrib.push((0, emit(g, Op::Scale { s: *s }, &[dy], &[(&n, sh)])[0]));
                }
            }
            Op::Dropout { p, site } => {
                if needs(0) {
                    let (n, sh) = (name(g, 0), shape_of(g, 0));
                    let op = Op::Dropout { p: *p, site: *site };
                    contrib.push((0, emit(g, op, &[dy], &[(&n, sh)])[0]));
                }
            }
            Op::Rope { rope, head_dim } => {
                if needs(0) {
                    let (n, sh) = (name(g, 0), shape_of(g, 0));
                    let op = Op::RopeBack {
                        rope: *rope,
                        head_dim: *head_dim,
                    };
                    contrib.push((0, emit(g, op, &[dy], &[(&n, sh)])[0]));
                }
            }
            Op::Attention(geom) => {
                if (0..3).any(needs) {
                    let [q, k, v] = [node.inputs[0], node.inputs[1], node.inputs[2]];
                    let (o, lse) = (node.outputs[0], node.outputs[1]);
                    let outs = [
                        (name(g, 0), shape_of(g, 0)),
                        (name(g, 1), shape_of(g, 1)),
                        (name(g, 2), shape_of(g, 2)),
                    ];
                    let outs: Vec<(&str, Shape)> =
                        outs.iter().map(|(n, s)| (n.as_str(), *s)).collect();
                    let d = emit(g, Op::AttentionBack(*geom), &[q, k, v, o, lse, dy], &outs);
                    for (i, &t) in d.iter().enumerate() {
                        if needs(i) {
                            contrib.push((i, t));
                        }
                    }
                }
            }
            Op::Gated { act } => {
                if needs(0) || needs(1) {
                    let outs = [(name(g, 0), shape_of(g, 0)), (name(g, 1), shape_of(g, 1))];
                    let outs: Vec<(&str, Shape)> =
                        outs.iter().map(|(n, s)| (n.as_str(), *s)).collect();
                    let op = Op::GatedBack { act: *act };
                    let d = emit(g, op, &[node.inputs[0], node.inputs[1], dy], &outs);
                    for (i, &t) in d.iter().enumerate() {
                        if needs(i) {
                            contrib.push((i, t));
                        }
                    }
                }
            }
            other => {
                return Err(Error::Invalid(format!(
                    "cannot differentiate a graph that already has backward op {}",
                    other.name()
                )));
            }
        }
        for (i, t) in contrib {
            accumulate(g, &mut grad, node.inputs[i], t, layer);
        }
    }
    g.param_grads = g.params.iter().map(|p| grad[p.tensor]).collect();
    for (p, gt) in g.params.iter().zip(&g.param_grads) {
        let Some(t) = *gt else {
            return Err(Error::Invalid(format!(
                "parameter {} does not reach the loss",
                p.name
            )));
        };
        if matches!(g.tensors[t].kind, TensorKind::Param(_)) {
            return Err(Error::Invalid(format!(
                "parameter {} is its own gradient",
                p.name
            )));
        }
    }
    for t in g.param_grads.clone().into_iter().flatten() {
        g.tensors[t].kind = TensorKind::Output;
    }
    Ok(())
}

/// Add `t` to the gradient of `x` (summing when `x` feeds several nodes).
fn accumulate(
    g: &mut Graph,
    grad: &mut Vec<Option<TensorId>>,
    x: TensorId,
    t: TensorId,
    layer: Option<usize>,
) {
    if grad.len() < g.tensors.len() {
        grad.resize(g.tensors.len(), None);
    }
    grad[x] = Some(match grad[x] {
        None => t,
        Some(prev) => {
            let name = format!("d.{}", g.tensors[x].name);
            let shape = g.shape(x);
            g.push(
                Op::Add,
                &[prev, t],
                &[(&name, shape)],
                layer,
                Phase::Backward,
            )[0]
        }
    });
}
