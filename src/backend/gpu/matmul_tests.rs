//! The weight-reading kernels against the CPU decoders: every format, every
//! matmul kernel, shapes that are not multiples of the tiles, offset and
//! strided operands, tensors split over several bindings, the embedding
//! gather, and the upload errors. Sizes stay small: software Vulkan is slow.

use super::super::testing;
use super::*;
use crate::quant::{dequantize_row, quantize_row};

/// SplitMix64: deterministic test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(1e-7), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
    fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
}

/// Written into y before a kernel runs: what it must not overwrite.
const SENTINEL: f32 = 1234.5;

/// Row length for `ty`: not a multiple of 8 (nor 32) for the float types, a
/// few blocks for the block types.
fn cols_for(ty: GgmlType) -> usize {
    match ty.block_size() {
        1 => 75,
        32 => 96,
        _ => 256,
    }
}

/// `rows × cols` normal weights quantized with `quantize_row`.
fn quantized(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let rb = ty.row_bytes(cols).unwrap();
    let mut data = vec![0u8; rows * rb];
    for row in data.chunks_exact_mut(rb) {
        quantize_row(ty, &rng.normals(cols), row).unwrap();
    }
    data
}

/// Random block bytes (every quant bit pattern) with finite, normal f16
/// scales; float types as in [`quantized`].
fn random_blocks(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    use GgmlType as T;
    let fields: &[usize] = match ty {
        T::F32 | T::F16 | T::BF16 => return quantized(rng, ty, rows, cols),
        T::Q4_0 | T::Q5_0 | T::Q8_0 => &[0],
        T::Q4_1 | T::Q5_1 | T::Q4_K | T::Q5_K => &[0, 2],
        T::Q6_K => &[208],
    };
    let rb = ty.row_bytes(cols).unwrap();
    let mut data: Vec<u8> = (0..rows * rb).map(|_| rng.next() as u8).collect();
    for block in data.chunks_exact_mut(ty.type_size()) {
        for &f in fields {
            let v = (0.002 + 0.05 * rng.uniform()) * if rng.next() & 1 == 0 { 1.0 } else { -1.0 };
            block[f..f + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
    }
    data
}

/// The CPU decoding of every row.
fn decoded(ty: GgmlType, rows: usize, cols: usize, data: &[u8]) -> Vec<f32> {
    let rb = ty.row_bytes(cols).unwrap();
    let mut out = vec![0f32; rows * cols];
    for (r, o) in out.chunks_exact_mut(cols).enumerate() {
        dequantize_row(ty, &data[r * rb..(r + 1) * rb], o).unwrap();
    }
    out
}

fn f32_buffer(ctx: &GpuContext, v: &[f32]) -> wgpu::Buffer {
    ctx.upload(bytemuck::cast_slice(v), "test f32")
}

fn run(ctx: &GpuContext, dispatches: &[Dispatch]) {
    let mut encoder = ctx.encoder();
    GpuContext::record(&mut encoder, dispatches);
    ctx.submit_and_wait(encoder).unwrap();
}

/// Runs one matmul of a random `rows × cols` `ty` matrix and checks every
/// output against an f64 dot of the CPU-decoded rows (relative to the
/// largest output), and every other element of y for the sentinel.
/// Returns the number of parts the weight had.
fn check_matmul(
    ctx: &GpuContext,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    s: MatmulShape,
    kernel: MatmulKernel,
) -> usize {
    check_matmul_grid(ctx, ty, rows, cols, s, kernel, MAX_GROUPS)
}

/// [`check_matmul`] with grids folded past `max_groups` along a dimension.
fn check_matmul_grid(
    ctx: &GpuContext,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    s: MatmulShape,
    kernel: MatmulKernel,
    max_groups: u32,
) -> usize {
    let mut rng = Rng((ty as u64) << 32 ^ (rows as u64) << 16 ^ s.n_tok as u64);
    let data = quantized(&mut rng, ty, rows, cols);
    let w = GpuWeight::upload(ctx, "blk.0.test.weight", ty, rows, cols, &data).unwrap();
    assert_eq!((w.rows, w.cols, w.ty), (rows, cols, ty));
    assert!(w.bytes() >= data.len() as u64);
    let x_len = s.x_off + (s.n_tok - 1) * s.x_stride + cols + 5;
    // NaN outside the tokens' spans: any value read there poisons a result.
    let mut x = vec![f32::NAN; x_len];
    for t in 0..s.n_tok {
        let at = s.x_off + t * s.x_stride;
        x[at..at + cols].copy_from_slice(&rng.normals(cols));
    }
    // A whole token's worth of sentinels past the last one.
    let y_len = s.y_off + s.n_tok * s.y_stride + rows;
    let xb = f32_buffer(ctx, &x);
    let yb = f32_buffer(ctx, &vec![SENTINEL; y_len]);
    let dispatches = matmul_grid(ctx, &w, &xb, &yb, s, kernel, max_groups).unwrap();
    assert_eq!(dispatches.len(), w.parts());
    run(ctx, &dispatches);
    let got = ctx.read_f32(&yb, 0, y_len).unwrap();

    let wf = decoded(ty, rows, cols, &data);
    let mut want: Vec<Option<f64>> = vec![None; y_len];
    for t in 0..s.n_tok {
        let xt = &x[s.x_off + t * s.x_stride..][..cols];
        for r in 0..rows {
            let dot = wf[r * cols..(r + 1) * cols]
                .iter()
                .zip(xt)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>();
            want[s.y_off + t * s.y_stride + r] = Some(dot);
        }
    }
    let scale = want.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
    assert!(scale > 0.0);
    for (i, (&g, w)) in got.iter().zip(&want).enumerate() {
        match w {
            Some(v) => assert!(
                (g as f64 - v).abs() <= 1e-4 * scale,
                "{ty} {kernel:?} {s:?} rows {rows}: y[{i}] = {g}, want {v} (scale {scale})"
            ),
            None => assert_eq!(
                g, SENTINEL,
                "{ty} {kernel:?} {s:?} rows {rows}: y[{i}] written outside the outputs"
            ),
        }
    }
    w.parts()
}

/// n_tok tokens with offsets and strides that are not the packed ones.
fn shape(n_tok: usize, rows: usize, cols: usize) -> MatmulShape {
    MatmulShape {
        n_tok,
        x_off: 5,
        x_stride: cols + 3,
        y_off: 7,
        y_stride: rows + 9,
    }
}

#[test]
fn tiled_every_format() {
    let Some(ctx) = testing::context() else {
        return;
    };
    for ty in GgmlType::ALL {
        let cols = cols_for(ty);
        for n_tok in [67, 3] {
            check_matmul(
                &ctx,
                ty,
                70,
                cols,
                shape(n_tok, 70, cols),
                MatmulKernel::Tiled,
            );
        }
    }
}

#[test]
fn vector_every_format() {
    let Some(ctx) = testing::context() else {
        return;
    };
    for ty in GgmlType::ALL {
        let cols = cols_for(ty);
        for n_tok in [1, 3, 67] {
            check_matmul(
                &ctx,
                ty,
                70,
                cols,
                shape(n_tok, 70, cols),
                MatmulKernel::Vector,
            );
        }
    }
}

#[test]
fn subgroup_every_format() {
    let Some(ctx) = testing::context() else {
        return;
    };
    if !ctx.has_subgroups() {
        eprintln!("skipping: {} has no subgroups", ctx.adapter().name);
        return;
    }
    for ty in GgmlType::ALL {
        let cols = cols_for(ty);
        for n_tok in [1, 3, 6] {
            check_matmul(
                &ctx,
                ty,
                70,
                cols,
                shape(n_tok, 70, cols),
                MatmulKernel::Subgroup,
            );
        }
    }
}

#[test]
fn auto_and_packed_shapes() {
    let Some(ctx) = testing::context() else {
        return;
    };
    for n_tok in [1, 4, 5, 64, 65] {
        let s = MatmulShape::packed(n_tok, 256, 64);
        check_matmul(&ctx, GgmlType::Q4_K, 64, 256, s, MatmulKernel::Auto);
    }
    // One column past the tile, odd F16 rows not 4-byte aligned.
    check_matmul(
        &ctx,
        GgmlType::F16,
        5,
        33,
        MatmulShape::packed(66, 33, 5),
        MatmulKernel::Tiled,
    );
    check_matmul(
        &ctx,
        GgmlType::F16,
        5,
        1,
        MatmulShape::packed(2, 1, 5),
        MatmulKernel::Vector,
    );
}

/// Row lengths for the split tests: rows of 72–300 bytes, so a 4 KiB binding
/// holds fewer than 70 of them.
fn split_cols(ty: GgmlType) -> usize {
    match ty.block_size() {
        32 => 128,
        _ => cols_for(ty),
    }
}

#[test]
fn split_matmul_every_format() {
    let Some(ctx) = testing::context_small_bindings() else {
        return;
    };
    for ty in GgmlType::ALL {
        let cols = split_cols(ty);
        for (n_tok, kernel) in [(67, MatmulKernel::Tiled), (3, MatmulKernel::Vector)] {
            let parts = check_matmul(&ctx, ty, 70, cols, shape(n_tok, 70, cols), kernel);
            assert!(parts > 1, "{ty}: {parts} part");
        }
    }
}

/// Grids folded into two dimensions (as past 65535 workgroups), with more
/// groups than work: every kernel, matmul and embed.
#[test]
fn folded_grids() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let mut kernels = vec![MatmulKernel::Tiled, MatmulKernel::Vector];
    if ctx.has_subgroups() {
        kernels.push(MatmulKernel::Subgroup);
    }
    for kernel in kernels {
        // Tiled: 3 row tiles as 2 × 2; vector: 33 row groups as 2 × 17.
        let s = shape(5, 130, 96);
        check_matmul_grid(&ctx, GgmlType::Q5_0, 130, 96, s, kernel, 2);
    }
    // 8 tokens × 64 chunks of 8 values: 8 workgroups as 3 × 3.
    check_embed_grid(&ctx, GgmlType::Q4_K, 70, 512, false, 3);
}

/// A real 262144-row vocabulary: 65537 workgroups of the vector kernel.
/// Slow on software Vulkan (seconds): run with `--ignored`.
#[test]
#[ignore]
fn vector_grid_past_65535_groups() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let rows = 4 * 65_535 + 9;
    let s = MatmulShape::packed(1, 32, rows);
    check_matmul(&ctx, GgmlType::Q4_0, rows, 32, s, MatmulKernel::Vector);
}

/// Runs `embed` of a random `rows × cols` table for `tokens` and checks every
/// output against the CPU decoding (nearly exact); with `only_first_part`,
/// records only part 0's dispatch and checks that the other tokens' outputs
/// keep the sentinel.
fn check_embed(
    ctx: &GpuContext,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    only_first_part: bool,
) -> usize {
    check_embed_grid(ctx, ty, rows, cols, only_first_part, MAX_GROUPS)
}

/// [`check_embed`] with grids folded past `max_groups` along a dimension.
fn check_embed_grid(
    ctx: &GpuContext,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    only_first_part: bool,
    max_groups: u32,
) -> usize {
    let mut rng = Rng(ty as u64 + 99);
    let data = random_blocks(&mut rng, ty, rows, cols);
    let w = GpuWeight::upload(ctx, "token_embd.weight", ty, rows, cols, &data).unwrap();
    // Both ends of the table, a repeat, and the first and last rows of part 0.
    let first_rows = w.parts[0].rows as u32;
    let last = rows as u32 - 1;
    let tokens: Vec<u32> = vec![3, 0, last, 17, first_rows.min(last), 3, first_rows - 1, 29];
    let n_tok = tokens.len();
    let tb = ctx.upload(bytemuck::cast_slice(&tokens), "tokens");
    let yb = f32_buffer(ctx, &vec![SENTINEL; n_tok * cols]);
    let scale = 0.75f32;
    let dispatches = embed_grid(ctx, &w, &tb, &yb, n_tok, scale, max_groups).unwrap();
    assert_eq!(dispatches.len(), w.parts());
    if only_first_part {
        run(ctx, &dispatches[..1]);
    } else {
        run(ctx, &dispatches);
    }
    let got = ctx.read_f32(&yb, 0, n_tok * cols).unwrap();
    let wf = decoded(ty, rows, cols, &data);
    for (t, &id) in tokens.iter().enumerate() {
        let row = &wf[id as usize * cols..][..cols];
        for c in 0..cols {
            let g = got[t * cols + c];
            if only_first_part && id >= first_rows {
                assert_eq!(g, SENTINEL, "{ty}: token {t} (id {id}) written by part 0");
                continue;
            }
            let want = scale * row[c];
            assert!(
                (g - want).abs() <= 1e-6 * want.abs() + 1e-30,
                "{ty}: token {t} (id {id}) value {c}: {g}, want {want}"
            );
        }
    }
    w.parts()
}

#[test]
fn embed_every_format() {
    let Some(ctx) = testing::context() else {
        return;
    };
    for ty in GgmlType::ALL {
        check_embed(&ctx, ty, 70, cols_for(ty), false);
    }
}

#[test]
fn split_embed_every_format() {
    let Some(ctx) = testing::context_small_bindings() else {
        return;
    };
    for ty in GgmlType::ALL {
        let parts = check_embed(&ctx, ty, 70, split_cols(ty), false);
        assert!(parts > 1, "{ty}: {parts} part");
        check_embed(&ctx, ty, 70, split_cols(ty), true);
    }
}

#[test]
fn upload_errors_name_the_tensor() {
    let Some(ctx) = testing::context_small_bindings() else {
        return;
    };
    let name = "blk.3.ffn_down.weight";
    let short = vec![0u8; 18 * 4 - 1];
    match GpuWeight::upload(&ctx, name, GgmlType::Q4_0, 2, 64, &short) {
        Err(Error::Quant(m)) => assert!(m.contains(name), "{m}"),
        other => panic!("wrong length accepted: {other:?}"),
    }
    match GpuWeight::upload(&ctx, name, GgmlType::Q4_0, 2, 48, &[0u8; 64]) {
        Err(Error::Quant(m)) => assert!(m.contains(name), "{m}"),
        other => panic!("partial block accepted: {other:?}"),
    }
    // One F32 row of 2048 values is 8 KiB, twice the 4 KiB binding limit.
    match GpuWeight::upload(&ctx, name, GgmlType::F32, 1, 2048, &[0u8; 8192]) {
        Err(Error::Gpu(m)) => assert!(m.contains(name), "{m}"),
        other => panic!("oversized row accepted: {other:?}"),
    }
    let w = GpuWeight::upload(&ctx, name, GgmlType::F32, 0, 16, &[]).unwrap();
    assert_eq!((w.parts(), w.bytes()), (0, 0));
}

#[test]
fn matmul_checks_its_operands() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let data = quantized(&mut Rng(1), GgmlType::Q8_0, 8, 64);
    let w = GpuWeight::upload(&ctx, "w", GgmlType::Q8_0, 8, 64, &data).unwrap();
    let x = f32_buffer(&ctx, &[0.0; 128]);
    let y = f32_buffer(&ctx, &[0.0; 16]);
    let k = MatmulKernel::Auto;
    assert!(matmul(&ctx, &w, &x, &y, MatmulShape::packed(2, 64, 8), k).is_ok());
    // x too short for a third token, y too short for a third token.
    assert!(matmul(&ctx, &w, &x, &y, MatmulShape::packed(3, 64, 8), k).is_err());
    let big_x = f32_buffer(&ctx, &[0.0; 192]);
    assert!(matmul(&ctx, &w, &big_x, &y, MatmulShape::packed(3, 64, 8), k).is_err());
    // Overlapping outputs, and x bound as y.
    let s = MatmulShape {
        y_stride: 4,
        ..MatmulShape::packed(2, 64, 8)
    };
    assert!(matmul(&ctx, &w, &x, &y, s, k).is_err());
    assert!(matmul(&ctx, &w, &x, &x, MatmulShape::packed(1, 64, 8), k).is_err());
    // Nothing to do.
    assert!(
        matmul(&ctx, &w, &x, &y, MatmulShape::packed(0, 64, 8), k)
            .unwrap()
            .is_empty()
    );
}

/// Float rows need not be whole groups of 8: the values a decoder returns past
/// `cols` (the next row's) are zeroed, never multiplied. Row 1 starts with
/// infinities, which row 0's last group reads past its end.
#[test]
fn float_rows_never_multiply_past_cols() {
    let Some(ctx) = testing::context() else {
        return;
    };
    let (rows, cols) = (3, 75);
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        let mut wf = Rng(7).normals(rows * cols);
        wf[cols..cols + 8].fill(f32::INFINITY);
        let rb = ty.row_bytes(cols).unwrap();
        let mut data = vec![0u8; rows * rb];
        for (r, row) in data.chunks_exact_mut(rb).enumerate() {
            quantize_row(ty, &wf[r * cols..(r + 1) * cols], row).unwrap();
        }
        let w = GpuWeight::upload(&ctx, "w", ty, rows, cols, &data).unwrap();
        let wd = decoded(ty, rows, cols, &data);
        let n_tok = 5;
        let x = Rng(8).normals(n_tok * cols);
        let xb = f32_buffer(&ctx, &x);
        for kernel in [MatmulKernel::Tiled, MatmulKernel::Vector] {
            let yb = f32_buffer(&ctx, &vec![0.0; n_tok * rows]);
            let s = MatmulShape::packed(n_tok, cols, rows);
            run(&ctx, &matmul(&ctx, &w, &xb, &yb, s, kernel).unwrap());
            let got = ctx.read_f32(&yb, 0, n_tok * rows).unwrap();
            for t in 0..n_tok {
                for r in [0, 2] {
                    let want: f64 = (0..cols)
                        .map(|k| wd[r * cols + k] as f64 * x[t * cols + k] as f64)
                        .sum();
                    let g = got[t * rows + r] as f64;
                    assert!(
                        (g - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "{ty} {kernel:?} token {t} row {r}: {g}, want {want}"
                    );
                }
            }
        }
    }
}

/// The baseline matmul source is cut at the subgroup marker: it must appear
/// once, with no subgroup operation before it.
#[test]
fn subgroup_marker_splits_the_source_once() {
    assert_eq!(MATMUL_WGSL.matches(SUBGROUP_MARKER).count(), 1);
    let (base, sg) = MATMUL_WGSL.split_once(SUBGROUP_MARKER).unwrap();
    assert!(base.contains("fn matmul_tiled(") && base.contains("fn matmul_vec("));
    assert!(!base.contains("subgroupAdd(") && !base.contains("@builtin(subgroup"));
    assert!(sg.contains("fn matmul_vec_sg("));
}
