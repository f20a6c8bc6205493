//! Integer GEMM of 4-bit weights (Q4_0, Q4_1) with activations quantized to
//! 8 bits: `y = x·Wᵀ` for many tokens at once, the frozen forward products of
//! training with `--fast`, and (with `Wᵀ` rounded to 5 bits by
//! [`PackedQ4::pack_transposed`]) its backward products `dY·W`.
//!
//! Weights are repacked in groups of 8 rows so that one 256-bit register holds
//! 4 consecutive quants of each of the 8 rows: `vpmaddubsw` against 4
//! activation bytes broadcast to every row multiplies 32 pairs at once, and
//! the per-block scale is applied to 8 outputs by one `vfmadd`. (Without the
//! repacking every output pays its own conversion and scale per block, and the
//! integer path is no faster than f32 FMA on AVX2.)
//!
//! Per 32-value block `b` of row `r` (`w = d·q + m`, `q` in 0..=15; Q4_0 is
//! `m = −8d`) and token `t` (quants `a`, scale `da`, `s = da·Σa`):
//! `y[t][r] += (Σ q·a)·(d·da) + m·s`, both terms fused multiply-adds in block
//! order (5-bit quants, `q` in 0..=31, alike). `Σ q·a` is exact in i32 (at
//! most 32·31·127), so the portable kernel here gives the AVX2 kernel's bits.

use super::GgmlType;
use super::blocks::{BlockQ4_0, BlockQ4_1, QK, as_blocks};
use super::q8;
use super::simd::{Level, f16_to_f32, level};
use rayon::prelude::*;

/// Rows per packed group (one 256-bit register of 8 × 4 bytes).
const GROUP: usize = 8;
/// Packed quant bytes per group and block: 8 rows × 32 nibbles.
const GROUP_BLOCK: usize = GROUP * QK / 2;
/// The same of 5-bit quants ([`PackedQ4::pack_transposed`]), a byte each.
const WIDE_BLOCK: usize = GROUP * QK;
/// Levels of the 5-bit rounding of `Wᵀ`.
const WIDE_MAX: u32 = 31;
/// Tokens per register tile.
const TILE: usize = 6;
/// Groups whose weights a task keeps hot while it runs its tokens.
const GROUPS_PER_PASS: usize = 16;
/// Parallel tasks per worker thread (for balance).
const TASKS_PER_THREAD: usize = 4;

/// A Q4_0 or Q4_1 matrix repacked for [`gemm`] ([`PackedQ4::pack`]), or
/// the transpose of a decoded matrix rounded to 5 bits
/// ([`PackedQ4::pack_transposed`]); buffers are reused.
#[derive(Debug, Default)]
pub struct PackedQ4 {
    rows: usize,
    cols: usize,
    /// 5-bit quants, a byte each, rather than 4-bit nibbles.
    wide: bool,
    /// 4-bit: `[group][block][j: 4][row: 8][4 bytes]`: byte `i` of row `r` in
    /// `j` is the source byte `4j + i` (low nibble quant `4j + i`, high
    /// `16 + 4j + i`). 5-bit: `[group][block][j: 8][row: 8][4 bytes]`, byte
    /// `i` of row `r` in `j` is quant `4j + i`.
    quants: Vec<u8>,
    /// `[group][block]`: the 8 rows' scales `d`, then their offsets `m`.
    scales: Vec<f32>,
}

impl PackedQ4 {
    /// An empty matrix; fill it with [`PackedQ4::pack`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether [`PackedQ4::pack`] takes matrices of type `ty`.
    pub fn supports(ty: GgmlType) -> bool {
        matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1)
    }

    /// Bytes this holds for a `rows × cols` matrix (scratch planning).
    pub fn bytes(rows: usize, cols: usize) -> usize {
        let (quants, scales) = Self::lens(rows, cols, GROUP_BLOCK);
        quants + 4 * scales
    }

    /// Bytes this holds for `Wᵀ` of a `rows × cols` `W` (scratch planning).
    pub fn bytes_transposed(rows: usize, cols: usize) -> usize {
        let (quants, scales) = Self::lens(cols, rows, WIDE_BLOCK);
        quants + 4 * scales
    }

    /// Lengths of the quants and scales of `rows` packed rows of `cols`
    /// values, with `block_bytes` of quants per group and block.
    fn lens(rows: usize, cols: usize, block_bytes: usize) -> (usize, usize) {
        let (groups, nb) = (rows.div_ceil(GROUP), cols / QK);
        (groups * nb * block_bytes, groups * nb * 2 * GROUP)
    }

    /// Packed quant bytes per group and block.
    fn block_bytes(&self) -> usize {
        if self.wide { WIDE_BLOCK } else { GROUP_BLOCK }
    }

    /// Take the shape `rows × cols` (packed rows, contraction) and size the
    /// buffers for it: returns the blocks per row.
    fn reset(&mut self, rows: usize, cols: usize, wide: bool) -> usize {
        self.rows = rows;
        self.cols = cols;
        self.wide = wide;
        let (quants, scales) = Self::lens(rows, cols, self.block_bytes());
        self.quants.resize(quants, 0);
        self.scales.resize(scales, 0.0);
        cols / QK
    }

    /// Each group's index, quants and scales, in parallel.
    fn par_groups(
        &mut self,
    ) -> impl IndexedParallelIterator<Item = (usize, (&mut [u8], &mut [f32]))> {
        let nb = self.cols / QK;
        let bb = self.block_bytes();
        self.quants
            .par_chunks_mut(nb * bb)
            .zip(self.scales.par_chunks_mut(nb * 2 * GROUP))
            .enumerate()
    }

    /// Repack `rows × cols` weights of type `ty` (`supports(ty)`) from `data`,
    /// their GGUF bytes (length checked by the caller's `QMatrix`).
    pub fn pack(&mut self, ty: GgmlType, rows: usize, cols: usize, data: &[u8]) {
        assert!(
            Self::supports(ty) && cols.is_multiple_of(QK),
            "PackedQ4: {ty:?} × {cols}"
        );
        let row_bytes = data.len() / rows.max(1);
        let nb = self.reset(rows, cols, false);
        self.par_groups().for_each(|(g, (qg, sg))| {
            for r in 0..GROUP {
                let row = g * GROUP + r;
                if row >= rows {
                    // Padding rows: zero quants and scales, never stored.
                    for b in 0..nb {
                        for j in 0..4 {
                            let o = b * GROUP_BLOCK + j * 32 + r * 4;
                            qg[o..o + 4].fill(0);
                        }
                        sg[b * 2 * GROUP + r] = 0.0;
                        sg[b * 2 * GROUP + GROUP + r] = 0.0;
                    }
                    continue;
                }
                let src = &data[row * row_bytes..(row + 1) * row_bytes];
                for b in 0..nb {
                    let (qs, d, m) = block(ty, src, b);
                    for j in 0..4 {
                        let o = b * GROUP_BLOCK + j * 32 + r * 4;
                        qg[o..o + 4].copy_from_slice(&qs[4 * j..4 * j + 4]);
                    }
                    sg[b * 2 * GROUP + r] = d;
                    sg[b * 2 * GROUP + GROUP + r] = m;
                }
            }
        });
    }

    /// Pack `Wᵀ` of a decoded `rows × cols` matrix `w` (row-major), rounded
    /// to 5 bits: per output row `i` of `Wᵀ` and block of 32 of `w`'s rows,
    /// `d = (max − min)/31`, `m = min`, `q = round((v − m)/d)` (half up), as
    /// Q4_1 rounds but with 32 levels. The scales stay f32. `dY·W` is then
    /// [`gemm`] of this and `dY` (the backward products of training with
    /// `--fast`); `rows` must be a multiple of 32.
    pub fn pack_transposed(&mut self, w: &[f32], rows: usize, cols: usize) {
        self.pack_transposed_at(level(), w, rows, cols)
    }

    fn pack_transposed_at(&mut self, lv: Level, w: &[f32], rows: usize, cols: usize) {
        assert!(
            rows.is_multiple_of(QK) && w.len() == rows * cols,
            "PackedQ4::pack_transposed: {rows} × {cols}"
        );
        let nb = self.reset(cols, rows, true);
        self.par_groups().for_each(|(g, (qg, sg))| {
            for b in 0..nb {
                let qb = &mut qg[b * WIDE_BLOCK..(b + 1) * WIDE_BLOCK];
                let sb = &mut sg[b * 2 * GROUP..(b + 1) * 2 * GROUP];
                match lv {
                    Level::Portable => round_block_t(w, cols, g * GROUP, b, qb, sb),
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the token proves AVX2 and FMA.
                    Level::Avx2(_) => unsafe { round_block_t_avx2(w, cols, g * GROUP, b, qb, sb) },
                }
            }
        });
    }
}

/// One packed block of `Wᵀ` (see [`PackedQ4::pack_transposed`]): rows
/// `c0..c0 + 8` of `Wᵀ` (columns of `w`, zero past `cols`), values from
/// `32b` on, rounded to 5 bits, into `q` (the packed layout) and `sc`
/// (scales, then offsets). The portable path, and the AVX2 one's for a
/// partial group.
#[inline(always)]
fn round_block_t(w: &[f32], cols: usize, c0: usize, b: usize, q: &mut [u8], sc: &mut [f32]) {
    let nc = GROUP.min(cols - c0);
    // v[k][r]: value `k` of the block, row `c0 + r` of Wᵀ.
    let mut v = [[0f32; GROUP]; QK];
    for (k, v) in v.iter_mut().enumerate() {
        v[..nc].copy_from_slice(&w[(b * QK + k) * cols + c0..][..nc]);
    }
    let (mut lo, mut hi) = (v[0], v[0]);
    for v in &v[1..] {
        for r in 0..GROUP {
            lo[r] = lo[r].min(v[r]);
            hi[r] = hi[r].max(v[r]);
        }
    }
    let mut id = [0f32; GROUP];
    for r in 0..GROUP {
        let d = (hi[r] - lo[r]) / WIDE_MAX as f32;
        id[r] = if d > 0.0 { 1.0 / d } else { 0.0 };
        sc[r] = d;
        sc[GROUP + r] = lo[r];
    }
    // Non-negative, so `+ 0.5` then truncation rounds half up.
    let quant = |k: usize| -> [u32; GROUP] {
        std::array::from_fn(|r| (((v[k][r] - lo[r]) * id[r] + 0.5) as u32).min(WIDE_MAX))
    };
    for j in 0..QK / 4 {
        let mut word = [0u32; GROUP];
        for i in 0..4 {
            let q = quant(4 * j + i);
            for r in 0..GROUP {
                word[r] |= q[r] << (8 * i);
            }
        }
        for (r, w) in word.iter().enumerate() {
            q[j * 32 + r * 4..j * 32 + r * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
    }
}

/// [`round_block_t`] in AVX2, for whole groups of 8 rows (the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn round_block_t_avx2(w: &[f32], cols: usize, c0: usize, b: usize, q: &mut [u8], sc: &mut [f32]) {
    use std::arch::x86_64::*;
    if c0 + GROUP > cols {
        return round_block_t(w, cols, c0, b, q, sc);
    }
    assert!((b * QK + QK - 1) * cols + c0 + GROUP <= w.len());
    assert!(q.len() >= WIDE_BLOCK && sc.len() >= 2 * GROUP);
    // SAFETY: AVX2 and FMA are enabled on this function; every load and
    // store is within the slices checked above.
    unsafe {
        let p = w.as_ptr().add(b * QK * cols + c0);
        let v: [__m256; QK] = std::array::from_fn(|k| _mm256_loadu_ps(p.add(k * cols)));
        let (mut lo, mut hi) = (v[0], v[0]);
        for v in &v[1..] {
            lo = _mm256_min_ps(lo, *v);
            hi = _mm256_max_ps(hi, *v);
        }
        let d = _mm256_div_ps(_mm256_sub_ps(hi, lo), _mm256_set1_ps(WIDE_MAX as f32));
        let pos = _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_GT_OQ);
        let id = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0), d), pos);
        _mm256_storeu_ps(sc.as_mut_ptr(), d);
        _mm256_storeu_ps(sc.as_mut_ptr().add(GROUP), lo);
        let (half, top) = (_mm256_set1_ps(0.5), _mm256_set1_epi32(WIDE_MAX as i32));
        let quant = |k: usize| {
            let x = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(v[k], lo), id), half);
            _mm256_min_epi32(_mm256_cvttps_epi32(x), top)
        };
        for j in 0..QK / 4 {
            let mut word = _mm256_setzero_si256();
            for i in 0..4 {
                let byte = _mm256_sllv_epi32(quant(4 * j + i), _mm256_set1_epi32(8 * i as i32));
                word = _mm256_or_si256(word, byte);
            }
            _mm256_storeu_si256(q.as_mut_ptr().add(j * 32).cast(), word);
        }
    }
}

/// Block `b` of a row: its 16 nibble bytes, scale and offset.
fn block(ty: GgmlType, row: &[u8], b: usize) -> ([u8; QK / 2], f32, f32) {
    let h = |x: [u8; 2]| f16_to_f32(u16::from_le_bytes(x));
    match ty {
        GgmlType::Q4_0 => {
            let blk = &as_blocks::<BlockQ4_0>(row)[b];
            let d = h(blk.d);
            (blk.qs, d, -8.0 * d)
        }
        GgmlType::Q4_1 => {
            let blk = &as_blocks::<BlockQ4_1>(row)[b];
            (blk.qs, h(blk.d), h(blk.m))
        }
        _ => unreachable!("PackedQ4::supports"),
    }
}

/// Rows of activations quantized to 8 bits in blocks of 32, for [`gemm`].
#[derive(Debug, Default)]
pub struct Q8Rows {
    n: usize,
    cols: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Q8Rows {
    /// No rows yet; fill with [`Q8Rows::quantize`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes this holds for `n × cols` activations (scratch planning).
    pub fn bytes(n: usize, cols: usize) -> usize {
        n * cols + 2 * 4 * n * (cols / QK)
    }

    /// Quantize `x`, rows of `cols` values (a multiple of 32), as
    /// [`QuantizedActivation`](super::QuantizedActivation) does one vector.
    pub fn quantize(&mut self, x: &[f32], cols: usize) {
        assert!(
            cols.is_multiple_of(QK) && x.len().is_multiple_of(cols),
            "Q8Rows: {cols} columns"
        );
        self.n = x.len() / cols;
        self.cols = cols;
        self.qs.resize(x.len(), 0);
        self.d.resize(x.len() / QK, 0.0);
        self.s.resize(x.len() / QK, 0.0);
        let lv = level();
        let rows = 16 * cols;
        x.par_chunks(rows)
            .zip(self.qs.par_chunks_mut(rows))
            .zip(self.d.par_chunks_mut(rows / QK))
            .zip(self.s.par_chunks_mut(rows / QK))
            .for_each(|(((x, q), d), s)| q8::quantize_blocks(lv, x, q, d, s));
    }
}

/// `y (n × rows) = x · Wᵀ` for packed `w` and quantized `x` (`x`'s columns
/// equal `w`'s), on the current rayon pool.
pub fn gemm(w: &PackedQ4, x: &Q8Rows, y: &mut [f32]) {
    gemm_at(level(), w, x, y)
}

fn gemm_at(lv: Level, w: &PackedQ4, x: &Q8Rows, y: &mut [f32]) {
    assert_eq!(w.cols, x.cols, "q4 gemm: inner dimensions");
    assert_eq!(y.len(), x.n * w.rows, "q4 gemm: output length");
    if w.rows == 0 || x.n == 0 {
        return;
    }
    let rows = w.rows;
    // Whole tiles per task, about TASKS_PER_THREAD tasks per thread.
    let tasks = TASKS_PER_THREAD * rayon::current_num_threads();
    let per_task = x.n.div_ceil(tasks).div_ceil(TILE) * TILE;
    y.par_chunks_mut(per_task * rows)
        .enumerate()
        .for_each(|(task, yc)| {
            let t0 = task * per_task;
            let nt = yc.len() / rows;
            match lv {
                Level::Portable => run_tokens::<Portable>(w, x, t0, nt, yc),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the token proves AVX2 and FMA.
                Level::Avx2(_) => unsafe { run_tokens_avx2(w, x, t0, nt, yc) },
            }
        });
}

/// Tokens `t0..t0 + nt` against every group, into `yc` (`nt × rows`).
#[inline(always)]
fn run_tokens<K: Kernel>(w: &PackedQ4, x: &Q8Rows, t0: usize, nt: usize, yc: &mut [f32]) {
    let nb = w.cols / QK;
    let groups = w.rows.div_ceil(GROUP);
    let mut out = [[0f32; GROUP]; TILE];
    for g0 in (0..groups).step_by(GROUPS_PER_PASS) {
        for tt in (0..nt).step_by(TILE) {
            let n = TILE.min(nt - tt);
            let xs: [usize; TILE] = std::array::from_fn(|i| t0 + tt + i.min(n - 1));
            for g in g0..groups.min(g0 + GROUPS_PER_PASS) {
                let bb = w.block_bytes();
                let q = &w.quants[g * nb * bb..(g + 1) * nb * bb];
                let sc = &w.scales[g * nb * 2 * GROUP..(g + 1) * nb * 2 * GROUP];
                if w.wide {
                    K::tile_wide(q, sc, x, xs, &mut out);
                } else {
                    K::tile(q, sc, x, xs, &mut out);
                }
                let r0 = g * GROUP;
                let nr = GROUP.min(w.rows - r0);
                for (i, o) in out.iter().enumerate().take(n) {
                    let dst = (tt + i) * w.rows + r0;
                    yc[dst..dst + nr].copy_from_slice(&o[..nr]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn run_tokens_avx2(w: &PackedQ4, x: &Q8Rows, t0: usize, nt: usize, yc: &mut [f32]) {
    run_tokens::<Avx2Kernel>(w, x, t0, nt, yc)
}

/// One group of 8 rows against [`TILE`] tokens (`xs`, token indices of
/// `x`; a partial tile repeats its last token).
trait Kernel {
    fn tile(q: &[u8], sc: &[f32], x: &Q8Rows, xs: [usize; TILE], out: &mut [[f32; GROUP]; TILE]);
    /// The same for 5-bit quants, a byte each.
    fn tile_wide(
        q: &[u8],
        sc: &[f32],
        x: &Q8Rows,
        xs: [usize; TILE],
        out: &mut [[f32; GROUP]; TILE],
    );
}

struct Portable;

impl Kernel for Portable {
    #[inline(always)]
    fn tile(q: &[u8], sc: &[f32], x: &Q8Rows, xs: [usize; TILE], out: &mut [[f32; GROUP]; TILE]) {
        portable_tile(q, sc, x, xs, out, GROUP_BLOCK, |qb, r, a| {
            let mut sum = 0i32;
            for j in 0..4 {
                for i in 0..4 {
                    let byte = qb[j * 32 + r * 4 + i];
                    sum += (byte & 15) as i32 * a[4 * j + i] as i32;
                    sum += (byte >> 4) as i32 * a[16 + 4 * j + i] as i32;
                }
            }
            sum
        })
    }

    #[inline(always)]
    fn tile_wide(
        q: &[u8],
        sc: &[f32],
        x: &Q8Rows,
        xs: [usize; TILE],
        out: &mut [[f32; GROUP]; TILE],
    ) {
        portable_tile(q, sc, x, xs, out, WIDE_BLOCK, |qb, r, a| {
            let mut sum = 0i32;
            for j in 0..QK / 4 {
                for i in 0..4 {
                    sum += qb[j * 32 + r * 4 + i] as i32 * a[4 * j + i] as i32;
                }
            }
            sum
        })
    }
}

/// The portable tile over packed blocks of `block_bytes`, with `dot(qb, r,
/// a)` the integer sum of row `r` of block `qb` against quants `a`.
#[inline(always)]
fn portable_tile(
    q: &[u8],
    sc: &[f32],
    x: &Q8Rows,
    xs: [usize; TILE],
    out: &mut [[f32; GROUP]; TILE],
    block_bytes: usize,
    dot: impl Fn(&[u8], usize, &[i8]) -> i32,
) {
    let nb = x.cols / QK;
    *out = [[0.0; GROUP]; TILE];
    for b in 0..nb {
        let qb = &q[b * block_bytes..(b + 1) * block_bytes];
        let (d, m) = sc[b * 2 * GROUP..(b + 1) * 2 * GROUP].split_at(GROUP);
        for (o, &t) in out.iter_mut().zip(&xs) {
            let a = &x.qs[(t * nb + b) * QK..(t * nb + b + 1) * QK];
            let (da, sa) = (x.d[t * nb + b], x.s[t * nb + b]);
            for r in 0..GROUP {
                o[r] = (dot(qb, r, a) as f32).mul_add(d[r] * da, o[r]);
                o[r] = m[r].mul_add(sa, o[r]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx2Kernel;

/// The blocks per row of a tile's operands, after checking that the AVX2
/// tiles' unchecked loads stay inside them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn check_tile(q: &[u8], sc: &[f32], x: &Q8Rows, xs: [usize; TILE], block_bytes: usize) -> usize {
    let nb = x.cols / QK;
    assert!(q.len() >= nb * block_bytes && sc.len() >= nb * 2 * GROUP);
    for &t in &xs {
        assert!((t + 1) * nb * QK <= x.qs.len() && (t + 1) * nb <= x.d.len());
    }
    nb
}

#[cfg(target_arch = "x86_64")]
impl Kernel for Avx2Kernel {
    #[inline(always)]
    fn tile(q: &[u8], sc: &[f32], x: &Q8Rows, xs: [usize; TILE], out: &mut [[f32; GROUP]; TILE]) {
        use std::arch::x86_64::*;
        let nb = check_tile(q, sc, x, xs, GROUP_BLOCK);
        // SAFETY: callers run this inside `#[target_feature(enable = "avx2,fma")]`;
        // every load is within the slices checked above.
        unsafe {
            let low = _mm256_set1_epi8(15);
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); TILE];
            for b in 0..nb {
                let qp = q.as_ptr().add(b * GROUP_BLOCK);
                let mut lo = [_mm256_setzero_si256(); 4];
                let mut hi = [_mm256_setzero_si256(); 4];
                for j in 0..4 {
                    let v = _mm256_loadu_si256(qp.add(j * 32).cast());
                    lo[j] = _mm256_and_si256(v, low);
                    hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                }
                let d = _mm256_loadu_ps(sc.as_ptr().add(b * 2 * GROUP));
                let m = _mm256_loadu_ps(sc.as_ptr().add(b * 2 * GROUP + GROUP));
                for (acc, &t) in acc.iter_mut().zip(&xs) {
                    let ap = x.qs.as_ptr().add((t * nb + b) * QK);
                    // 4 activation bytes from offset `o`, in every row's lane.
                    macro_rules! word {
                        ($o:expr) => {
                            _mm256_set1_epi32(ap.add($o).cast::<i32>().read_unaligned())
                        };
                    }
                    let mut s16 = _mm256_maddubs_epi16(lo[0], word!(0));
                    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[0], word!(16)));
                    for j in 1..4 {
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo[j], word!(4 * j)));
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[j], word!(16 + 4 * j)));
                    }
                    let sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
                    let da = _mm256_set1_ps(*x.d.get_unchecked(t * nb + b));
                    let sa = _mm256_set1_ps(*x.s.get_unchecked(t * nb + b));
                    *acc = _mm256_fmadd_ps(sum, _mm256_mul_ps(d, da), *acc);
                    *acc = _mm256_fmadd_ps(m, sa, *acc);
                }
            }
            for (o, a) in out.iter_mut().zip(&acc) {
                _mm256_storeu_ps(o.as_mut_ptr(), *a);
            }
        }
    }

    #[inline(always)]
    fn tile_wide(
        q: &[u8],
        sc: &[f32],
        x: &Q8Rows,
        xs: [usize; TILE],
        out: &mut [[f32; GROUP]; TILE],
    ) {
        use std::arch::x86_64::*;
        let nb = check_tile(q, sc, x, xs, WIDE_BLOCK);
        // SAFETY: as `tile`'s: AVX2 and FMA are enabled by the callers, and
        // every load is within the slices checked above.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            // Each token's quants, scales and sums, from block 0 on.
            let aps: [*const i8; TILE] = xs.map(|t| x.qs.as_ptr().add(t * nb * QK));
            let dps: [*const f32; TILE] = xs.map(|t| x.d.as_ptr().add(t * nb));
            let sps: [*const f32; TILE] = xs.map(|t| x.s.as_ptr().add(t * nb));
            let mut acc = [_mm256_setzero_ps(); TILE];
            for b in 0..nb {
                let qp = q.as_ptr().add(b * WIDE_BLOCK);
                let w: [__m256i; 8] =
                    std::array::from_fn(|j| _mm256_loadu_si256(qp.add(j * 32).cast()));
                let d = _mm256_loadu_ps(sc.as_ptr().add(b * 2 * GROUP));
                let m = _mm256_loadu_ps(sc.as_ptr().add(b * 2 * GROUP + GROUP));
                for ti in 0..TILE {
                    let ap = aps[ti].add(b * QK);
                    macro_rules! word {
                        ($j:expr) => {
                            _mm256_set1_epi32(ap.add(4 * $j).cast::<i32>().read_unaligned())
                        };
                    }
                    // Four words' 16-bit sums stay inside i16 (4·2·31·127).
                    let mut lo = _mm256_maddubs_epi16(w[0], word!(0));
                    let mut hi = _mm256_maddubs_epi16(w[4], word!(4));
                    for j in 1..4 {
                        lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(w[j], word!(j)));
                        hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(w[4 + j], word!(4 + j)));
                    }
                    let (lo, hi) = (_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, ones));
                    let sum = _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi));
                    let da = _mm256_set1_ps(*dps[ti].add(b));
                    let sa = _mm256_set1_ps(*sps[ti].add(b));
                    acc[ti] = _mm256_fmadd_ps(sum, _mm256_mul_ps(d, da), acc[ti]);
                    acc[ti] = _mm256_fmadd_ps(m, sa, acc[ti]);
                }
            }
            for (o, a) in out.iter_mut().zip(&acc) {
                _mm256_storeu_ps(o.as_mut_ptr(), *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize_row, quantize_row};

    fn rng(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// Rows of `ty` quantized from random values, and their exact decode.
    fn matrix(ty: GgmlType, rows: usize, cols: usize, seed: &mut u64) -> (Vec<u8>, Vec<f32>) {
        let rb = ty.row_bytes(cols).unwrap();
        let mut data = vec![0u8; rows * rb];
        let mut dec = vec![0f32; rows * cols];
        for r in 0..rows {
            let v: Vec<f32> = (0..cols)
                .map(|_| rng(seed) * (1.0 + r as f32 * 0.1))
                .collect();
            quantize_row(ty, &v, &mut data[r * rb..(r + 1) * rb]).unwrap();
            dequantize_row(
                ty,
                &data[r * rb..(r + 1) * rb],
                &mut dec[r * cols..(r + 1) * cols],
            )
            .unwrap();
        }
        (data, dec)
    }

    /// `y (n × out)` is `x`'s 8-bit values (dequantized) times `wᵀ`, `w` of
    /// `out` rows of `x.cols`, to `tol` of each sum's L1 norm.
    fn assert_products(y: &[f32], x: &Q8Rows, w: &[f32], tol: f64) {
        let k = x.cols;
        let out = w.len() / k;
        for t in 0..x.n {
            let a: Vec<f32> = (0..k)
                .map(|i| x.qs[t * k + i] as f32 * x.d[(t * k + i) / QK])
                .collect();
            for r in 0..out {
                let wr = &w[r * k..(r + 1) * k];
                let want: f64 = wr.iter().zip(&a).map(|(w, a)| f64::from(w * a)).sum();
                let l1: f64 = wr
                    .iter()
                    .zip(&a)
                    .map(|(w, a)| f64::from((w * a).abs()))
                    .sum();
                let got = f64::from(y[t * out + r]);
                assert!((got - want).abs() <= tol * l1, "t{t} r{r}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn matches_the_f32_product_of_the_decoded_weights_and_every_level_agrees() {
        let mut seed = 7;
        // 13 rows: a padded group; 7 tokens: a partial tile; 96 columns: 3 blocks.
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1] {
            let (rows, cols, n) = (13, 96, 7);
            let (data, dec) = matrix(ty, rows, cols, &mut seed);
            let x: Vec<f32> = (0..n * cols).map(|_| rng(&mut seed) * 4.0).collect();
            let mut w = PackedQ4::new();
            w.pack(ty, rows, cols, &data);
            let mut xq = Q8Rows::new();
            xq.quantize(&x, cols);
            let mut outs = Vec::new();
            for lv in super::super::simd::available_levels() {
                let mut y = vec![f32::NAN; n * rows];
                gemm_at(lv, &w, &xq, &mut y);
                outs.push(y);
            }
            for y in &outs[1..] {
                assert_eq!(y, &outs[0], "{ty:?}: the AVX2 kernel's bits differ");
            }
            let y = &outs[0];
            // Exactly the product of the 8-bit activations and the weights.
            assert_products(y, &xq, &dec, 1e-6);
            for t in 0..n {
                let xt = &x[t * cols..(t + 1) * cols];
                let amax = xt.iter().fold(0f32, |m, v| m.max(v.abs()));
                for r in 0..rows {
                    let wr = &dec[r * cols..(r + 1) * cols];
                    let exact: f32 = wr.iter().zip(xt).map(|(a, b)| a * b).sum();
                    let l1: f32 = wr.iter().map(|v| v.abs()).sum();
                    // Each activation moves at most half a step, amax/254.
                    let bound = l1 * amax / 254.0 + 1e-4;
                    let got = y[t * rows + r];
                    assert!(
                        (got - exact).abs() <= bound,
                        "{ty:?} t{t} r{r}: {got} vs {exact}"
                    );
                }
            }
            // Same weights, same quants: a product that ignored the 8-bit
            // rounding would not reproduce the integer sums this gives.
            let mut y2 = vec![0f32; n * rows];
            gemm(&w, &xq, &mut y2);
            assert_eq!(&y2, y);
        }
    }

    #[test]
    fn transposed_packing_rounds_each_block_of_32_rows_to_5_bits_and_gives_dy_times_w() {
        let mut seed = 5;
        // 64 rows: 2 blocks of the contraction; 13 columns: a padded group.
        let (rows, cols, n) = (64, 13, 7);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| rng(&mut seed) * (1.0 + (i % cols) as f32))
            .collect();
        let mut w = w;
        let mut dy: Vec<f32> = (0..n * rows).map(|_| rng(&mut seed) * 3.0).collect();
        // The largest sums the 16-bit chain holds: quants 31 against
        // activations ±127 (column 0, block 0; tokens 0 and 1).
        for k in 0..QK {
            w[k * cols] = if k == 0 { 0.0 } else { 1.0 };
            dy[k] = 2.0;
            dy[rows + k] = -2.0;
        }
        let mut dq = Q8Rows::new();
        dq.quantize(&dy, rows);
        // Wᵀ as the rounding rule gives it, written out here: per column `c`
        // of `w` and block of 32 rows, 32 levels from the min to the max.
        let mut wt = vec![0f32; cols * rows];
        for c in 0..cols {
            for b in 0..rows / QK {
                let v: Vec<f32> = (0..QK).map(|k| w[(b * QK + k) * cols + c]).collect();
                let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (hi - lo) / 31.0;
                for (k, &x) in v.iter().enumerate() {
                    let q = ((x - lo) / d).round();
                    assert!((0.0..=31.0).contains(&q));
                    wt[c * rows + b * QK + k] = lo + d * q;
                    // At most half a step from the value it rounds.
                    assert!((wt[c * rows + b * QK + k] - x).abs() <= 0.5001 * d);
                }
            }
        }
        let mut outs = Vec::new();
        for lv in super::super::simd::available_levels() {
            let mut p = PackedQ4::new();
            p.pack_transposed_at(lv, &w, rows, cols);
            let mut dx = vec![f32::NAN; n * cols];
            gemm_at(lv, &p, &dq, &mut dx);
            outs.push(dx);
        }
        for dx in &outs[1..] {
            assert_eq!(dx, &outs[0], "the AVX2 packing or kernel's bits differ");
        }
        assert_products(&outs[0], &dq, &wt, 1e-5);
    }

    #[test]
    fn packed_rows_give_each_rows_own_dot_product_through_the_q8_path() {
        // The integer matrix-vector path of generation computes the same sums.
        let mut seed = 11;
        let (rows, cols) = (8, 64);
        let (data, _) = matrix(GgmlType::Q4_1, rows, cols, &mut seed);
        let x: Vec<f32> = (0..cols).map(|_| rng(&mut seed)).collect();
        let mut w = PackedQ4::new();
        w.pack(GgmlType::Q4_1, rows, cols, &data);
        let mut xq = Q8Rows::new();
        xq.quantize(&x, cols);
        let mut y = vec![0f32; rows];
        gemm(&w, &xq, &mut y);
        let a = crate::quant::quantize_activation_q8(&x);
        let rb = GgmlType::Q4_1.row_bytes(cols).unwrap();
        for r in 0..rows {
            let want = crate::quant::dot_row_q8(GgmlType::Q4_1, &data[r * rb..(r + 1) * rb], &a);
            assert!(
                (y[r] - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{} vs {want}",
                y[r]
            );
        }
    }
}
