//! The backward product through a frozen 4-bit weight, `dx = dy · W`, in the
//! integer arithmetic of [`gemm`](super::gemm) (training with `--fast`).
//!
//! The contraction runs along W's rows, across its quant blocks, so the
//! forward layout does not serve: W is repacked transposed, in the layout of
//! [`PackedQ4`](super::PackedQ4) with rows and columns swapped (8 columns a
//! group, 32 rows a block), its 4-bit quants unchanged. A block's scale
//! `d[o][b]` varies along the contraction, so it moves into the activations:
//! for the 32 columns of block `b`, `a[t][o] = dy[t][o]·d[o][b]` is rounded to
//! 8 bits per 32 rows and multiplied with the quants in integers, and the
//! offsets add `Σₒ dy[t][o]·m[o][b]` in f32, one value per token and block.
//! Rounding `a` once per block of 32 columns costs about 1/32 of the product.
//!
//! The weights stay exact; only `dy·d` is rounded, relative to its largest
//! possible value in each block of 32 rows, `amax·dmax` (`amax` the block's
//! largest `|dy|`, `dmax` its largest `|d|`). The rounding runs in 16-bit
//! fixed point, two instructions per 16 values, since it is repeated for
//! every block of columns: once per token `u = round(32767·dy/amax)`, once
//! per weight `v = round(256·127·d/dmax)`, then per block of columns
//! `a = round(round(u·v/2¹⁵)/2⁸)` (`vpmulhrsw` twice), with scale
//! `amax·dmax/127·32768/32767`. That is within 0.51 of a step of the exact
//! `dy·d` (half a step, plus the two fixed-point roundings). Both levels
//! compute these roundings and sums the same way, so the portable kernel
//! gives the AVX2 kernel's bits.

#[cfg(target_arch = "x86_64")]
use super::Avx2Kernel;
use super::{GROUP, GROUP_BLOCK, Kernel, PackedQ4, Portable, Q8Rows, TASKS_PER_THREAD};
use crate::quant::GgmlType;
use crate::quant::blocks::QK;
use crate::quant::simd::{Level, level};
use rayon::prelude::*;

/// Tokens per register tile (fewer than the forward's 6: more would spill).
const TILE: usize = 4;
/// Column blocks (4 groups each) whose weights a task keeps hot while it
/// runs its tokens.
const BLOCKS_PER_PASS: usize = 4;

/// A Q4_0 or Q4_1 matrix repacked transposed for [`gemm_back`]; buffers are
/// reused by [`PackedQ4T::pack`].
#[derive(Debug, Default)]
pub struct PackedQ4T {
    /// W's rows: the contraction.
    rows: usize,
    /// W's columns: the outputs.
    cols: usize,
    /// `[group of 8 columns][block of 32 rows][j: 4][column: 8][4 bytes]`:
    /// byte `i` of column `r` in `j` holds the quants of rows `4j + i` (low
    /// nibble) and `16 + 4j + i` (high); rows past the last are zero.
    quants: Vec<u8>,
    /// `[column block][row]`: `round(256·127·d/dmax)`, zero past the last
    /// row.
    v: Vec<i16>,
    /// `[column block][row block]`: `dmax/127·32768/32767`, the scale of
    /// `a` per unit of `amax`.
    dmax: Vec<f32>,
    /// `[column block][row]`: the offsets `m` (Q4_0: `−8d`).
    m: Vec<f32>,
}

impl PackedQ4T {
    /// An empty matrix; fill it with [`PackedQ4T::pack`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes this holds for a `rows × cols` matrix (scratch planning).
    pub fn bytes(rows: usize, cols: usize) -> usize {
        let (rb, nb) = (rows.div_ceil(QK), cols / QK);
        cols / GROUP * rb * GROUP_BLOCK + nb * (rb * QK * 6 + rb * 4)
    }

    /// Bytes [`gemm_back`] allocates for `n` tokens through a matrix of
    /// `rows` rows: each token's block maxima, and a rounded tile per task
    /// (at most 16 at once).
    pub fn scratch_bytes(n: usize, rows: usize) -> usize {
        let rb = rows.div_ceil(QK);
        n * rb * 8 + 16 * TILE * (rb * QK + rb * 4)
    }

    /// Repack `rows × cols` weights of type `ty` ([`PackedQ4::supports`])
    /// from `data`, their GGUF bytes (length checked by the caller's
    /// `QMatrix`).
    pub fn pack(&mut self, ty: GgmlType, rows: usize, cols: usize, data: &[u8]) {
        assert!(
            PackedQ4::supports(ty) && cols.is_multiple_of(QK),
            "PackedQ4T: {ty:?} × {cols}"
        );
        let (rb, nb) = (rows.div_ceil(QK), cols / QK);
        let pad = rb * QK;
        let row_bytes = data.len() / rows.max(1);
        // Block size and the offset of its 16 quant bytes.
        let (bs, at) = if ty == GgmlType::Q4_0 {
            (18, 2)
        } else {
            (20, 4)
        };
        self.rows = rows;
        self.cols = cols;
        self.quants.resize(cols / GROUP * rb * GROUP_BLOCK, 0);
        self.v.resize(nb * pad, 0);
        self.m.resize(nb * pad, 0.0);
        self.dmax.resize(nb * rb, 0.0);
        // The 16 quant bytes of row `o`'s block `b` (zero past the last row).
        let quant_bytes = |o: usize, b: usize| -> u128 {
            if o >= rows {
                return 0;
            }
            let p = o * row_bytes + b * bs + at;
            u128::from_le_bytes(data[p..p + 16].try_into().unwrap())
        };
        const LOW: u128 = u128::from_le_bytes([15; 16]);
        let per_block = QK / GROUP * rb * GROUP_BLOCK;
        self.quants
            .par_chunks_mut(per_block)
            .zip(self.v.par_chunks_mut(pad))
            .zip(self.m.par_chunks_mut(pad))
            .zip(self.dmax.par_chunks_mut(rb))
            .enumerate()
            .for_each(|(b, (((qb, v), m), dmax))| {
                // Rows k and 16 + k of each row block, for the block's 32
                // columns: columns 0..16 are the low nibbles, 16..32 the high.
                for ob in 0..rb {
                    for k in 0..QK / 2 {
                        let lo = quant_bytes(ob * QK + k, b);
                        let hi = quant_bytes(ob * QK + QK / 2 + k, b);
                        let first = (lo & LOW) | (hi & LOW) << 4;
                        let second = (lo >> 4 & LOW) | (hi & !LOW);
                        let at = ob * GROUP_BLOCK + (k / 4) * 32 + k % 4;
                        let bytes = first.to_le_bytes().into_iter().chain(second.to_le_bytes());
                        for (c, byte) in bytes.enumerate() {
                            qb[(c / GROUP) * rb * GROUP_BLOCK + at + (c % GROUP) * 4] = byte;
                        }
                    }
                }
                let mut d = [0f32; QK];
                for (ob, dm) in dmax.iter_mut().enumerate() {
                    let os = ob * QK..rows.min(ob * QK + QK);
                    for (o, dk) in os.clone().zip(d.iter_mut()) {
                        let (_, dv, off) =
                            super::block(ty, &data[o * row_bytes..(o + 1) * row_bytes], b);
                        (*dk, m[o]) = (dv, off);
                    }
                    let dk = &d[..os.len()];
                    let big = dk.iter().fold(0f32, |a, x| a.max(x.abs()));
                    let k = if big > 0.0 { 127.0 / big } else { 0.0 };
                    for (vo, &dv) in v[os].iter_mut().zip(dk) {
                        *vo = ((dv * k) * 256.0).round_ties_even() as i16;
                    }
                    *dm = big / 127.0 * (32768.0 / 32767.0);
                }
                v[rows..].fill(0);
                m[rows..].fill(0.0);
            });
    }
}

/// `dx (n × cols) = dy (n × rows) · W` for packed `w`, on the current rayon
/// pool; `dx` is overwritten.
pub fn gemm_back(w: &PackedQ4T, dy: &[f32], dx: &mut [f32]) {
    gemm_back_at(level(), w, dy, dx)
}

fn gemm_back_at(lv: Level, w: &PackedQ4T, dy: &[f32], dx: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    assert!(
        rows > 0 && dy.len().is_multiple_of(rows),
        "q4 gemm_back: dy length"
    );
    let n = dy.len() / rows;
    assert_eq!(dx.len(), n * cols, "q4 gemm_back: output length");
    if n == 0 || cols == 0 {
        return;
    }
    let tasks = TASKS_PER_THREAD * rayon::current_num_threads();
    let per_task = n.div_ceil(tasks).div_ceil(TILE) * TILE;
    dx.par_chunks_mut(per_task * cols)
        .zip(dy.par_chunks(per_task * rows))
        .for_each(|(dxc, dyc)| match lv {
            Level::Portable => run_tokens::<Portable>(w, dyc, dxc),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the token proves AVX2 and FMA.
            Level::Avx2(_) => unsafe { run_tokens_avx2(w, dyc, dxc) },
        });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn run_tokens_avx2(w: &PackedQ4T, dy: &[f32], dx: &mut [f32]) {
    run_tokens::<Avx2Kernel>(w, dy, dx)
}

/// The tokens of `dy` (rows of `w.rows`) into `dx` (rows of `w.cols`).
#[inline(always)]
fn run_tokens<K: BackKernel>(w: &PackedQ4T, dy: &[f32], dx: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    let nt = dy.len() / rows;
    let (rb, nb) = (rows.div_ceil(QK), cols / QK);
    let pad = rb * QK;
    // Each token's largest |dy| per block of 32 rows, and `dy` in 16-bit
    // fixed point relative to it (zero past the last row).
    let mut amax = vec![0f32; nt * rb];
    let mut u = vec![0i16; nt * pad];
    for (t, (row, ut)) in dy
        .chunks_exact(rows)
        .zip(u.chunks_exact_mut(pad))
        .enumerate()
    {
        for (ob, (blk, ub)) in row.chunks(QK).zip(ut.chunks_exact_mut(QK)).enumerate() {
            let a = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            amax[t * rb + ob] = a;
            let k = if a > 0.0 { 32767.0 / a } else { 0.0 };
            for (uo, &y) in ub.iter_mut().zip(blk) {
                *uo = (y * k).round_ties_even() as i16;
            }
        }
    }
    // The offsets' share, Σₒ dy[t][o]·m[o][b], for every token and column
    // block: one small f32 GEMM.
    let mut offsets = vec![0f32; nt * nb];
    // SAFETY: `dy` is `nt × rows` (row stride `rows`), `w.m` is `nb × pad`,
    // read as `rows × nb` (column stride `pad`), `offsets` is `nt × nb`.
    unsafe {
        gemm::gemm(
            nt,
            nb,
            rows,
            offsets.as_mut_ptr(),
            1,
            nb as isize,
            false,
            dy.as_ptr(),
            1,
            rows as isize,
            w.m.as_ptr(),
            pad as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    // One tile of `dy·d` for one column block, rounded to 8 bits.
    let mut x = Q8Rows {
        n: TILE,
        cols: pad,
        qs: vec![0; TILE * pad],
        d: vec![0.0; TILE * rb],
        s: Vec::new(),
    };
    let xs: [usize; TILE] = std::array::from_fn(|i| i);
    let mut out = [[0f32; GROUP]; TILE];
    let mut off = [0f32; TILE];
    let groups_per_block = QK / GROUP;
    for b0 in (0..nb).step_by(BLOCKS_PER_PASS) {
        for tt in (0..nt).step_by(TILE) {
            let n = TILE.min(nt - tt);
            for b in b0..nb.min(b0 + BLOCKS_PER_PASS) {
                let v = &w.v[b * pad..(b + 1) * pad];
                let dmax = &w.dmax[b * rb..(b + 1) * rb];
                for (i, c) in off.iter_mut().enumerate() {
                    // A partial tile repeats its last token.
                    let t = tt + i.min(n - 1);
                    let qs = &mut x.qs[i * pad..(i + 1) * pad];
                    K::scaled_q8(&u[t * pad..(t + 1) * pad], v, qs);
                    for ob in 0..rb {
                        x.d[i * rb + ob] = amax[t * rb + ob] * dmax[ob];
                    }
                    *c = offsets[t * nb + b];
                }
                for g in b * groups_per_block..(b + 1) * groups_per_block {
                    let q = &w.quants[g * rb * GROUP_BLOCK..(g + 1) * rb * GROUP_BLOCK];
                    K::tile::<false, TILE>(q, &[], &x, xs, &mut out);
                    for (i, (o, c)) in out.iter().zip(off).enumerate().take(n) {
                        let dst = &mut dx[(tt + i) * cols + g * GROUP..][..GROUP];
                        for (d, v) in dst.iter_mut().zip(o) {
                            *d = v + c;
                        }
                    }
                }
            }
        }
    }
}

/// The rounding of `dy·d` to 8 bits, on top of the integer tile.
trait BackKernel: Kernel {
    /// `q[o] = round(round(u[o]·v[o]/2¹⁵)/2⁸)` (halves rounded up, as
    /// `vpmulhrsw` rounds), for whole blocks of 32.
    fn scaled_q8(u: &[i16], v: &[i16], q: &mut [i8]);
}

/// `round(a·b/2¹⁵)`, halves up: `vpmulhrsw` on one lane.
#[inline(always)]
fn mulhrs(a: i16, b: i16) -> i16 {
    ((i32::from(a) * i32::from(b) + (1 << 14)) >> 15) as i16
}

impl BackKernel for Portable {
    #[inline(always)]
    fn scaled_q8(u: &[i16], v: &[i16], q: &mut [i8]) {
        for ((qo, &a), &b) in q.iter_mut().zip(u).zip(v) {
            *qo = mulhrs(mulhrs(a, b), 128) as i8;
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl BackKernel for Avx2Kernel {
    #[inline(always)]
    fn scaled_q8(u: &[i16], v: &[i16], q: &mut [i8]) {
        use std::arch::x86_64::*;
        let n = q.len();
        assert!(n.is_multiple_of(QK) && u.len() >= n && v.len() >= n);
        // SAFETY: callers run this inside `#[target_feature(enable = "avx2,fma")]`;
        // every access is within the lengths checked above.
        unsafe {
            let half = _mm256_set1_epi16(128);
            for o in (0..n).step_by(QK) {
                let a: [__m256i; 2] = std::array::from_fn(|k| {
                    let at = o + 16 * k;
                    let uv = _mm256_mulhrs_epi16(
                        _mm256_loadu_si256(u.as_ptr().add(at).cast()),
                        _mm256_loadu_si256(v.as_ptr().add(at).cast()),
                    );
                    _mm256_mulhrs_epi16(uv, half)
                });
                // Lanes come out as [a0 0..8, a1 0..8, a0 8..16, a1 8..16].
                let p = _mm256_permute4x64_epi64(_mm256_packs_epi16(a[0], a[1]), 0b11_01_10_00);
                _mm256_storeu_si256(q.as_mut_ptr().add(o).cast(), p);
            }
        }
    }
}

#[cfg(test)]
pub(super) fn gemm_back_levels(w: &PackedQ4T, dy: &[f32], dx: &mut [f32], lv: Level) {
    gemm_back_at(lv, w, dy, dx)
}
