//! The PEFT ops on the GPU (a part of [`super`], shaders/train_peft.wgsl;
//! the CPU oracle is `backend::cpu::train::peft_ops`): column scaling and
//! its reduction, element-wise and Kronecker products, DoRA's row norms.

use super::{ELEMENT_WG, View, bind, groups, nonempty, plain, to_u32};
use crate::Result;
use crate::backend::gpu::{Dispatch, GpuContext};

const PEFT: &str = include_str!("../../../shaders/train_peft.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct PeftParams {
    dims: [u32; 4],
    offs: [u32; 5],
    s: f32,
    count: u32,
    _pad: u32,
}

const _: () = assert!(size_of::<PeftParams>() == 48);

/// Entry `entry` over `count` outputs, operands `views` (each with its
/// length in f32) bound at 1, 2, … .
fn peft(
    ctx: &GpuContext,
    entry: &str,
    count: usize,
    views: &[(View, usize)],
    dims: [usize; 4],
    s: f32,
) -> Result<Dispatch> {
    nonempty(count, entry)?;
    let mut offs = [0u32; 5];
    let mut bindings = Vec::with_capacity(views.len() + 1);
    for (i, (v, len)) in views.iter().enumerate() {
        let (b, off) = bind(ctx, *v, *len, entry, "operand")?;
        offs[i] = off;
        bindings.push(b);
    }
    let mut d = [0u32; 4];
    for (k, v) in dims.iter().enumerate() {
        d[k] = to_u32(*v, entry, "dimension")?;
    }
    let params = PeftParams {
        dims: d,
        offs,
        s,
        count: to_u32(count, entry, "outputs")?,
        _pad: 0,
    };
    let u = ctx.uniform(&params, "peft op params");
    bindings.insert(0, u.as_entire_binding());
    let p = plain(ctx, "train/peft", entry, PEFT)?;
    Ok(ctx.dispatch(&p, &bindings, groups(count, ELEMENT_WG, entry)?))
}

/// `y = x ⊙ v` with `v (m)` repeated along `x (n)` ([`crate::graph::Op::MulCols`]).
pub(crate) fn mul_cols(
    ctx: &GpuContext,
    x: View,
    v: View,
    y: View,
    n: usize,
    m: usize,
) -> Result<Dispatch> {
    peft(
        ctx,
        "mul_cols",
        n,
        &[(x, n), (v, m), (y, n)],
        [n, m, 0, 0],
        0.0,
    )
}

/// `y = a ⊙ b` over `n` elements ([`crate::graph::Op::Mul`]).
pub(crate) fn mul(ctx: &GpuContext, a: View, b: View, y: View, n: usize) -> Result<Dispatch> {
    peft(ctx, "mul", n, &[(a, n), (b, n), (y, n)], [n, 0, 0, 0], 0.0)
}

/// `out (m) = Σ_rows a ⊙ b` for `a`, `b (rows, m)` ([`crate::graph::Op::ColDot`]).
pub(crate) fn col_dot(
    ctx: &GpuContext,
    a: View,
    b: View,
    out: View,
    rows: usize,
    m: usize,
) -> Result<Dispatch> {
    let n = rows * m;
    peft(
        ctx,
        "col_dot",
        m,
        &[(a, n), (b, n), (out, m)],
        [rows, m, 0, 0],
        0.0,
    )
}

/// `y = a (p, q) ⊗ b (m, n)` ([`crate::graph::Op::Kron`]).
pub(crate) fn kron(
    ctx: &GpuContext,
    a: View,
    b: View,
    y: View,
    (p, q): (usize, usize),
    (m, n): (usize, usize),
) -> Result<Dispatch> {
    let len = p * q * m * n;
    peft(
        ctx,
        "kron",
        len,
        &[(a, p * q), (b, m * n), (y, len)],
        [p, q, m, n],
        0.0,
    )
}

/// `da`, `db` of [`kron`] ([`crate::graph::Op::KronBack`]): two dispatches.
#[allow(clippy::too_many_arguments)]
pub(crate) fn kron_back(
    ctx: &GpuContext,
    a: View,
    b: View,
    dy: View,
    da: View,
    db: View,
    (p, q): (usize, usize),
    (m, n): (usize, usize),
) -> Result<Vec<Dispatch>> {
    let len = p * q * m * n;
    let dims = [p, q, m, n];
    Ok(vec![
        peft(
            ctx,
            "kron_back_a",
            p * q,
            &[(b, m * n), (dy, len), (da, p * q)],
            dims,
            0.0,
        )?,
        peft(
            ctx,
            "kron_back_b",
            m * n,
            &[(a, p * q), (dy, len), (db, m * n)],
            dims,
            0.0,
        )?,
    ])
}

/// DoRA's squared row norms ([`crate::graph::Op::DoraNorm`]) for `out` rows, rank `r`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dora_norm(
    ctx: &GpuContext,
    c: View,
    wa: View,
    b: View,
    gram: View,
    n2: View,
    (out, r): (usize, usize),
    s: f32,
) -> Result<Dispatch> {
    let views = [
        (c, out),
        (wa, r * out),
        (b, out * r),
        (gram, r * r),
        (n2, out),
    ];
    peft(ctx, "dora_norm", out, &views, [out, r, 0, 0], s)
}

/// `dwa`, `db`, `dgram` of [`dora_norm`] ([`crate::graph::Op::DoraNormBack`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dora_norm_back(
    ctx: &GpuContext,
    [wa, b, gram, dn2]: [View; 4],
    [dwa, db, dgram]: [View; 3],
    (out, r): (usize, usize),
    s: f32,
) -> Result<Vec<Dispatch>> {
    let dims = [out, r, 0, 0];
    Ok(vec![
        peft(
            ctx,
            "dora_back_wa",
            r * out,
            &[(b, out * r), (dn2, out), (dwa, r * out)],
            dims,
            s,
        )?,
        peft(
            ctx,
            "dora_back_b",
            out * r,
            &[
                (wa, r * out),
                (b, out * r),
                (gram, r * r),
                (dn2, out),
                (db, out * r),
            ],
            dims,
            s,
        )?,
        peft(
            ctx,
            "dora_back_gram",
            r * r,
            &[(b, out * r), (dn2, out), (dgram, r * r)],
            dims,
            s,
        )?,
    ])
}

/// `y = x (batch·seq, c)` with rows `0..n` of each sequence replaced by
/// `p (n, c)` ([`crate::graph::Op::PrefixRows`]).
pub(crate) fn prefix_rows(
    ctx: &GpuContext,
    x: View,
    p: View,
    y: View,
    (n, seq, c, batch): (usize, usize, usize, usize),
) -> Result<Dispatch> {
    let len = batch * seq * c;
    let views = [(x, len), (p, n * c), (y, len)];
    peft(ctx, "prefix_rows", len, &views, [seq, n, c, batch], 0.0)
}

/// `dx`, `dp` of [`prefix_rows`] ([`crate::graph::Op::PrefixRowsBack`]).
pub(crate) fn prefix_rows_back(
    ctx: &GpuContext,
    dy: View,
    dx: View,
    dp: View,
    (n, seq, c, batch): (usize, usize, usize, usize),
) -> Result<Vec<Dispatch>> {
    let len = batch * seq * c;
    let dims = [seq, n, c, batch];
    Ok(vec![
        peft(
            ctx,
            "prefix_back_x",
            len,
            &[(dy, len), (dx, len)],
            dims,
            0.0,
        )?,
        peft(
            ctx,
            "prefix_back_p",
            n * c,
            &[(dy, len), (dp, n * c)],
            dims,
            0.0,
        )?,
    ])
}

/// `y = m / √n2` over `n` elements ([`crate::graph::Op::RsqrtMul`]).
pub(crate) fn rsqrt_mul(
    ctx: &GpuContext,
    m: View,
    n2: View,
    y: View,
    n: usize,
) -> Result<Dispatch> {
    peft(
        ctx,
        "rsqrt_mul",
        n,
        &[(m, n), (n2, n), (y, n)],
        [n, 0, 0, 0],
        0.0,
    )
}

/// `dm`, `dn2` of [`rsqrt_mul`] ([`crate::graph::Op::RsqrtMulBack`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rsqrt_mul_back(
    ctx: &GpuContext,
    m: View,
    n2: View,
    dy: View,
    dm: View,
    dn2: View,
    n: usize,
) -> Result<Dispatch> {
    let views = [(m, n), (n2, n), (dy, n), (dm, n), (dn2, n)];
    peft(ctx, "rsqrt_mul_back", n, &views, [n, 0, 0, 0], 0.0)
}
