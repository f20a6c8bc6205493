//! Kernels that read quantized weights: `y = x · Wᵀ` and the embedding gather.
//!
//! A weight matrix is uploaded once, in its GGUF block layout, straight from
//! where its bytes lie (the memory map): no f32 expansion on the host or the
//! device. The WGSL decoders (`shaders/quant.wgsl`) read each format at
//! arbitrary byte offsets. A matrix larger than the device's storage-binding
//! limit is split by rows into parts, one dispatch per part.
//!
//! Two matmul kernels (`shaders/matmul.wgsl`): a tiled one for many tokens
//! (prompts, training) and a matrix-vector one for a few (generation), with a
//! subgroup-reduction variant of the latter where the device has subgroups.

use super::{Dispatch, GpuContext};
use crate::quant::GgmlType;
use crate::{Error, Result};

const QUANT_WGSL: &str = include_str!("../../../shaders/quant.wgsl");
const MATMUL_WGSL: &str = include_str!("../../../shaders/matmul.wgsl");
const EMBED_WGSL: &str = include_str!("../../../shaders/embed.wgsl");

/// The line of `matmul.wgsl` after which the subgroup kernel starts.
const SUBGROUP_MARKER: &str = "// @@subgroups@@";

/// Largest part (bytes): byte offsets inside a part are u32 in the shaders.
const MAX_PART_BYTES: u64 = 1 << 31;

/// Tokens × rows of one workgroup of the tiled kernel.
const TILE_TOKENS: usize = 64;
const TILE_ROWS: usize = 64;
/// Tokens × rows of one workgroup of the matrix-vector kernels.
const VEC_TOKENS: usize = 4;
const VEC_ROWS: usize = 4;
/// Invocations per workgroup of the embedding gather, 8 values each.
const EMBED_GROUP: usize = 64;

/// Most workgroups along one grid dimension (WebGPU's limit).
const MAX_GROUPS: u32 = 65_535;

/// Workgroups covering `n` groups of work with at most `max` along a
/// dimension: `(x, y, 1)` with `x · y ≥ n`, as [`super::groups_1d`] does for
/// `max` = 65535. The kernels take their linear group as
/// `wid.x + wid.y · nwg.x` and return past the end. (`max` is a parameter
/// so that tests fold small grids.)
fn grid(n: u32, max: u32) -> [u32; 3] {
    if n <= max {
        [n.max(1), 1, 1]
    } else {
        let y = n.div_ceil(max);
        [n.div_ceil(y), y, 1]
    }
}

/// The suffix of the format's decoder in `quant.wgsl` (`dq8_<suffix>`).
fn decoder(ty: GgmlType) -> &'static str {
    use GgmlType as T;
    match ty {
        T::F32 => "f32",
        T::F16 => "f16",
        T::BF16 => "bf16",
        T::Q4_0 => "q4_0",
        T::Q4_1 => "q4_1",
        T::Q5_0 => "q5_0",
        T::Q5_1 => "q5_1",
        T::Q8_0 => "q8_0",
        T::Q4_K => "q4_k",
        T::Q5_K => "q5_k",
        T::Q6_K => "q6_k",
    }
}

/// `quant.wgsl`, the `dq8` choosing `ty`'s decoder, then `body`.
fn with_decoder(ty: GgmlType, body: &str) -> String {
    format!(
        "{QUANT_WGSL}\nfn dq8(b: u32, k: u32) -> array<f32, 8> {{ return dq8_{}(b, k); }}\n{body}",
        decoder(ty)
    )
}

/// One row range of a [`GpuWeight`] in its own buffer.
#[derive(Debug)]
struct Part {
    /// `rows × row_bytes` bytes (padded to 16).
    buffer: wgpu::Buffer,
    /// Index of the part's first row in the whole matrix.
    row0: usize,
    /// Rows in the part.
    rows: usize,
}

/// A quantized matrix (rows × cols, GGUF layout) on the GPU, split by rows into parts
/// that each fit ctx.max_binding() (a part is a whole number of rows).
#[derive(Debug)]
pub struct GpuWeight {
    /// Block format.
    pub ty: GgmlType,
    /// Rows (output features; vocabulary size for an embedding table).
    pub rows: usize,
    /// Values per row (input features).
    pub cols: usize,
    /// Bytes of one row.
    row_bytes: usize,
    /// Row ranges, in order, covering all rows.
    parts: Vec<Part>,
}

impl GpuWeight {
    /// Upload from the bytes where they lie (the mmap), one copy, no f32
    /// expansion. Errors name the tensor `name`: a byte length that does not
    /// match the shape, `cols` not a whole number of blocks or zero
    /// ([`Error::Quant`]), a single row larger than the binding limit
    /// ([`Error::Gpu`]).
    pub fn upload(
        ctx: &GpuContext,
        name: &str,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &[u8],
    ) -> Result<GpuWeight> {
        let row_bytes = match ty.row_bytes(cols) {
            Some(b) if b > 0 => b,
            _ => {
                return Err(Error::Quant(format!(
                    "{name}: {cols} columns is not a positive whole number of {ty} blocks \
                     ({} values each)",
                    ty.block_size()
                )));
            }
        };
        if row_bytes.checked_mul(rows) != Some(data.len()) {
            return Err(Error::Quant(format!(
                "{name}: a {ty} matrix of {rows}×{cols} is {} bytes, got {}",
                row_bytes.saturating_mul(rows),
                data.len()
            )));
        }
        let limit = ctx.max_binding().min(MAX_PART_BYTES) as usize;
        if row_bytes > limit {
            return Err(Error::Gpu(format!(
                "{name}: one {ty} row of {cols} values is {row_bytes} bytes, more than the \
                 {limit}-byte storage binding limit of {}",
                ctx.adapter().name
            )));
        }
        let per_part = limit / row_bytes;
        let n_parts = rows.div_ceil(per_part);
        let mut parts = Vec::with_capacity(n_parts);
        let mut row0 = 0;
        for i in 0..n_parts {
            // Balanced: the first `rows % n_parts` parts get one row more.
            let n = rows / n_parts + usize::from(i < rows % n_parts);
            let label = if n_parts == 1 {
                name.to_string()
            } else {
                format!("{name} [part {i} of {n_parts}]")
            };
            let bytes = &data[row0 * row_bytes..(row0 + n) * row_bytes];
            parts.push(Part {
                buffer: ctx.upload(bytes, &label),
                row0,
                rows: n,
            });
            row0 += n;
        }
        Ok(GpuWeight {
            ty,
            rows,
            cols,
            row_bytes,
            parts,
        })
    }

    /// Number of parts (buffers) the rows are split into.
    pub fn parts(&self) -> usize {
        self.parts.len()
    }

    /// Device bytes held (including the padding of each part to 16 bytes).
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.buffer.size()).sum()
    }

    /// The matrix as the training kernels take it: its parts, borrowed.
    pub fn quant_matrix(&self) -> super::train::QuantMatrix<'_> {
        super::train::QuantMatrix {
            ty: self.ty,
            rows: self.rows,
            cols: self.cols,
            parts: self
                .parts
                .iter()
                .map(|p| super::train::QuantPart {
                    buffer: &p.buffer,
                    row0: p.row0,
                    rows: p.rows,
                })
                .collect(),
        }
    }
}

/// Where a matmul reads and writes (all offsets/strides in f32 elements).
#[derive(Clone, Copy, Debug)]
pub struct MatmulShape {
    /// Tokens: vectors of x in, vectors of y out.
    pub n_tok: usize,
    /// Element of x where token 0 starts.
    pub x_off: usize,
    /// Elements from one token of x to the next.
    pub x_stride: usize,
    /// Element of y where token 0's outputs start.
    pub y_off: usize,
    /// Elements from one token of y to the next (at least `rows` when
    /// `n_tok > 1`).
    pub y_stride: usize,
}

impl MatmulShape {
    /// `n_tok` tokens packed back to back: x is `(n_tok, cols)` and y
    /// `(n_tok, rows)`, both from element 0.
    pub fn packed(n_tok: usize, cols: usize, rows: usize) -> MatmulShape {
        MatmulShape {
            n_tok,
            x_off: 0,
            x_stride: cols,
            y_off: 0,
            y_stride: rows,
        }
    }
}

/// Which matmul kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulKernel {
    /// [`MatmulKernel::Vector`] (or [`MatmulKernel::Subgroup`] where the
    /// device has subgroups) for at most 4 tokens, else [`MatmulKernel::Tiled`].
    Auto,
    /// 64 tokens × 64 rows per workgroup, K in steps of 32 through workgroup memory.
    Tiled,
    /// 4 rows × 4 tokens per workgroup, K split across 64 invocations and
    /// summed in a tree in workgroup memory.
    Vector,
    /// As [`MatmulKernel::Vector`], summing with subgroup operations; an error
    /// where [`GpuContext::has_subgroups`] is false.
    Subgroup,
}

/// Uniform parameters of `matmul.wgsl` (its `Params`).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct MatmulParams {
    rows: u32,
    cols: u32,
    n_tok: u32,
    row_bytes: u32,
    x_off: u32,
    x_stride: u32,
    y_off: u32,
    y_stride: u32,
}

/// Uniform parameters of `embed.wgsl` (its `Params`).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct EmbedParams {
    n_tok: u32,
    cols: u32,
    row0: u32,
    rows: u32,
    row_bytes: u32,
    scale: f32,
    chunks: u32,
    _pad: u32,
}

const _: () = assert!(
    size_of::<MatmulParams>().is_multiple_of(16) && size_of::<EmbedParams>().is_multiple_of(16)
);

/// `v` as a shader u32, or an error naming `what`.
fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Gpu(format!("{what} ({v}) does not fit in 32 bits")))
}

/// Checks that `n` vectors of `len` f32 at `off + t·stride` lie inside
/// `buffer` and are addressable with u32 indices.
fn check_span(
    what: &str,
    buffer: &wgpu::Buffer,
    off: usize,
    stride: usize,
    n: usize,
    len: usize,
) -> Result<()> {
    let end = (n - 1)
        .checked_mul(stride)
        .and_then(|v| v.checked_add(off))
        .and_then(|v| v.checked_add(len));
    let have = buffer.size() / 4;
    match end {
        Some(e) if (e as u64) <= have && e <= u32::MAX as usize => Ok(()),
        _ => Err(Error::Gpu(format!(
            "{what}: {n} vectors of {len} f32 from element {off} with stride {stride} do not fit \
             a buffer of {have} f32"
        ))),
    }
}

/// Most tokens `Auto` gives the matrix-vector kernel. On a GPU, 4: beyond
/// that the tiled kernel's reuse of each decoded weight wins. On a software
/// adapter (lavapipe runs each workgroup's barriers and shared-memory tiles
/// at great cost), the matrix-vector kernel stays ahead up to a full tile of
/// 64 tokens (SmolLM2 and Gemma GPU tests: 8 min 47 s with 4, 4 min with 64).
pub(crate) fn vector_tokens(ctx: &GpuContext) -> usize {
    if ctx.adapter().software {
        TILE_TOKENS
    } else {
        VEC_TOKENS
    }
}

/// y[y_off + t*y_stride + r] = Σ_k x[x_off + t*x_stride + k] · W[r][k] for t < n_tok, r < rows:
/// one dispatch per part (each writes its own rows). Auto = the
/// matrix-vector kernel up to [`vector_tokens`] tokens, else Tiled
/// (Subgroup instead of Vector where the device has subgroups).
///
/// `x` and `y` are distinct f32 storage buffers bound whole; the spans the
/// shape names must lie inside them (else [`Error::Gpu`]). No tokens or no
/// rows: no dispatches.
pub(crate) fn matmul(
    ctx: &GpuContext,
    w: &GpuWeight,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
    s: MatmulShape,
    kernel: MatmulKernel,
) -> Result<Vec<Dispatch>> {
    matmul_grid(ctx, w, x, y, s, kernel, MAX_GROUPS)
}

/// [`matmul`] with at most `max_groups` workgroups along a grid dimension.
fn matmul_grid(
    ctx: &GpuContext,
    w: &GpuWeight,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
    s: MatmulShape,
    kernel: MatmulKernel,
    max_groups: u32,
) -> Result<Vec<Dispatch>> {
    if s.n_tok == 0 || w.rows == 0 {
        return Ok(Vec::new());
    }
    if x == y {
        return Err(Error::Gpu(
            "matmul: x and y must be different buffers".into(),
        ));
    }
    if s.n_tok > 1 && s.y_stride < w.rows {
        return Err(Error::Gpu(format!(
            "matmul: y stride {} is less than the {} rows (outputs would overlap)",
            s.y_stride, w.rows
        )));
    }
    check_span("matmul x", x, s.x_off, s.x_stride, s.n_tok, w.cols)?;
    check_span("matmul y", y, s.y_off, s.y_stride, s.n_tok, w.rows)?;

    let kernel = match kernel {
        MatmulKernel::Auto if s.n_tok <= vector_tokens(ctx) && ctx.has_subgroups() => {
            MatmulKernel::Subgroup
        }
        MatmulKernel::Auto if s.n_tok <= vector_tokens(ctx) => MatmulKernel::Vector,
        MatmulKernel::Auto => MatmulKernel::Tiled,
        MatmulKernel::Subgroup if !ctx.has_subgroups() => {
            return Err(Error::Gpu(format!(
                "the subgroup matmul kernel needs subgroup operations, which {} lacks \
                 (or were turned off)",
                ctx.adapter().name
            )));
        }
        k => k,
    };
    let (entry, rows_per_group, toks_per_group) = match kernel {
        MatmulKernel::Tiled => ("matmul_tiled", TILE_ROWS, TILE_TOKENS),
        MatmulKernel::Vector => ("matmul_vec", VEC_ROWS, VEC_TOKENS),
        _ => ("matmul_vec_sg", VEC_ROWS, VEC_TOKENS),
    };
    let pipeline = if kernel == MatmulKernel::Subgroup {
        ctx.pipeline(&format!("matmul-sg-{}", w.ty), entry, || {
            with_decoder(w.ty, MATMUL_WGSL)
        })?
    } else {
        ctx.pipeline(&format!("matmul-{}", w.ty), entry, || {
            let (base, _) = MATMUL_WGSL
                .split_once(SUBGROUP_MARKER)
                .expect("matmul.wgsl has the subgroup marker");
            with_decoder(w.ty, base)
        })?
    };
    let tok_groups = s.n_tok.div_ceil(toks_per_group);
    if tok_groups > MAX_GROUPS as usize {
        return Err(Error::Gpu(format!(
            "matmul: {} tokens is more than one dispatch takes",
            s.n_tok
        )));
    }

    let mut dispatches = Vec::with_capacity(w.parts.len());
    for part in &w.parts {
        let params = MatmulParams {
            rows: u32_of(part.rows, "rows")?,
            cols: u32_of(w.cols, "cols")?,
            n_tok: u32_of(s.n_tok, "tokens")?,
            row_bytes: u32_of(w.row_bytes, "row bytes")?,
            x_off: u32_of(s.x_off, "x offset")?,
            x_stride: u32_of(s.x_stride, "x stride")?,
            y_off: u32_of(s.y_off + part.row0, "y offset")?,
            y_stride: u32_of(s.y_stride, "y stride")?,
        };
        let uniform = ctx.uniform(&params, "matmul params");
        let row_groups = u32_of(part.rows.div_ceil(rows_per_group), "row groups")?;
        let mut groups = grid(row_groups, max_groups);
        groups[2] = tok_groups as u32;
        dispatches.push(ctx.dispatch(
            &pipeline,
            &[
                uniform.as_entire_binding(),
                part.buffer.as_entire_binding(),
                x.as_entire_binding(),
                y.as_entire_binding(),
            ],
            groups,
        ));
    }
    Ok(dispatches)
}

/// y[t*cols + c] = scale · W[tokens[t]][c]; tokens: u32 buffer of n_tok ids (caller guarantees
/// ids < rows); one dispatch per part (each writes the tokens whose ids fall in its rows).
pub(crate) fn embed(
    ctx: &GpuContext,
    w: &GpuWeight,
    tokens: &wgpu::Buffer,
    y: &wgpu::Buffer,
    n_tok: usize,
    scale: f32,
) -> Result<Vec<Dispatch>> {
    embed_grid(ctx, w, tokens, y, n_tok, scale, MAX_GROUPS)
}

/// [`embed`] with at most `max_groups` workgroups along a grid dimension.
fn embed_grid(
    ctx: &GpuContext,
    w: &GpuWeight,
    tokens: &wgpu::Buffer,
    y: &wgpu::Buffer,
    n_tok: usize,
    scale: f32,
    max_groups: u32,
) -> Result<Vec<Dispatch>> {
    if n_tok == 0 || w.rows == 0 {
        return Ok(Vec::new());
    }
    if (n_tok as u64).saturating_mul(4) > tokens.size() {
        return Err(Error::Gpu(format!(
            "embed: {n_tok} token ids do not fit a buffer of {} bytes",
            tokens.size()
        )));
    }
    check_span("embed y", y, 0, w.cols, n_tok, w.cols)?;
    let chunks = w.cols.div_ceil(8);
    let invocations = n_tok
        .checked_mul(chunks)
        .filter(|&n| n <= u32::MAX as usize)
        .ok_or_else(|| {
            Error::Gpu(format!(
                "embed: {n_tok} tokens × {} values is too many",
                w.cols
            ))
        })?;
    let pipeline = ctx.pipeline(&format!("embed-{}", w.ty), "embed", || {
        with_decoder(w.ty, EMBED_WGSL)
    })?;
    let groups = grid(
        u32_of(invocations.div_ceil(EMBED_GROUP), "groups")?,
        max_groups,
    );
    let mut dispatches = Vec::with_capacity(w.parts.len());
    for part in &w.parts {
        let params = EmbedParams {
            n_tok: n_tok as u32,
            cols: u32_of(w.cols, "cols")?,
            row0: u32_of(part.row0, "first row")?,
            rows: u32_of(part.rows, "rows")?,
            row_bytes: u32_of(w.row_bytes, "row bytes")?,
            scale,
            chunks: chunks as u32,
            _pad: 0,
        };
        let uniform = ctx.uniform(&params, "embed params");
        dispatches.push(ctx.dispatch(
            &pipeline,
            &[
                uniform.as_entire_binding(),
                part.buffer.as_entire_binding(),
                tokens.as_entire_binding(),
                y.as_entire_binding(),
            ],
            groups,
        ));
    }
    Ok(dispatches)
}

#[cfg(test)]
#[path = "matmul_tests.rs"]
mod tests;
