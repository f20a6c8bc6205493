//! f32 GEMM through the `gemm` crate, in the layouts the CPU backend needs:
//! C = A·Bᵀ with B stored as n rows of k (decoded weight rows, keys), and
//! C = A·B (attention weights times values). Bounds are checked with
//! overflow-checked arithmetic.

use gemm::Parallelism;

/// Index one past the last element of an `rows × cols` row-major matrix with
/// row stride `ld`, or a panic naming `what` if it overflows.
fn extent(rows: usize, cols: usize, ld: usize, what: &str) -> usize {
    assert!(ld >= cols, "gemm: {what} stride {ld} < row length {cols}");
    let e = (rows - 1)
        .checked_mul(ld)
        .and_then(|v| v.checked_add(cols))
        .filter(|&v| v <= isize::MAX as usize);
    e.unwrap_or_else(|| panic!("gemm: {what} extent overflows"))
}

/// `c[i·ldc + j] = Σ_p a[i·lda + p] · b[j·ldb + p]` for `i < m, j < n`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= extent(m, n, ldc, "C"), "gemm_nt: C too short");
    // SAFETY: C's extent was checked against `c`, which is borrowed mutably.
    unsafe { gemm_nt_raw(m, n, k, a, lda, b, ldb, c.as_mut_ptr(), ldc) }
}

/// [`gemm_nt`] writing through a raw pointer, so that threads can fill
/// disjoint column bands of one output without each holding a `&mut` to all of it.
///
/// # Safety
/// `c` must be valid for writes at `c + i·ldc + j` for every `i < m, j < n`,
/// and no other thread may access those elements during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_nt_raw(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.len() >= extent(m, k, lda, "A"), "gemm_nt: A too short");
    assert!(b.len() >= extent(n, k, ldb, "B"), "gemm_nt: B too short");
    extent(m, n, ldc, "C");
    // SAFETY: A(i,p) at i·lda + p and B(p,j) at j·ldb + p are in bounds (checked
    // above); C's elements are the caller's to write (the contract).
    unsafe { kernel(m, n, k, a, lda, b, (ldb, 1), c, ldc) }
}

/// `c[i·ldc + j] = Σ_p a[i·lda + p] · b[p·ldb + j]`: C (m×n) = A (m×k) · B (k×n).
#[allow(clippy::too_many_arguments)]
pub fn gemm_nn(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.len() >= extent(m, k, lda, "A"), "gemm_nn: A too short");
    assert!(
        k == 0 || b.len() >= extent(k, n, ldb, "B"),
        "gemm_nn: B too short"
    );
    assert!(c.len() >= extent(m, n, ldc, "C"), "gemm_nn: C too short");
    // SAFETY: every index is in bounds (checked above); C is borrowed mutably.
    unsafe { kernel(m, n, k, a, lda, b, (1, ldb), c.as_mut_ptr(), ldc) }
}

/// A row-major matrix operand of [`matmul_into`]: `rows × cols` values with
/// row stride `ld`, read transposed when `t`.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    /// The values.
    pub data: &'a [f32],
    /// Row stride of the stored matrix.
    pub ld: usize,
    /// Use the transpose of the stored matrix.
    pub t: bool,
}

impl<'a> Operand<'a> {
    /// A contiguous matrix with `cols` values per stored row.
    pub fn new(data: &'a [f32], cols: usize) -> Operand<'a> {
        Operand {
            data,
            ld: cols,
            t: false,
        }
    }

    /// The same matrix, transposed.
    pub fn t(self) -> Operand<'a> {
        Operand { t: !self.t, ..self }
    }

    /// A view with another row stride.
    pub fn ld(self, ld: usize) -> Operand<'a> {
        Operand { ld, ..self }
    }

    /// (row stride, column stride) of the logical matrix.
    fn strides(&self) -> (isize, isize) {
        if self.t {
            (1, self.ld as isize)
        } else {
            (self.ld as isize, 1)
        }
    }

    /// Check that a logical `rows × cols` matrix is in bounds.
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let (r, c) = if self.t { (cols, rows) } else { (rows, cols) };
        assert!(
            self.data.len() >= extent(r, c, self.ld, what),
            "matmul_into: {what} too short"
        );
    }
}

/// `C (m × n, row stride ldc) = [C +] A (m × k) · B (k × n)` with operands in
/// any orientation, threaded by `gemm` itself when `threads > 1`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_into(
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    b: Operand,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    a.check(m, k, "A");
    b.check(k, n, "B");
    assert!(
        c.len() >= extent(m, n, ldc, "C"),
        "matmul_into: C too short"
    );
    if k == 0 {
        if !accumulate {
            for row in c.chunks_mut(ldc).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    let (a_rs, a_cs) = a.strides();
    let (b_rs, b_cs) = b.strides();
    let par = if threads > 1 && m * n * k >= 1 << 18 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: every operand's extent was checked above; `c` is borrowed
    // mutably for the call.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// The one call into `gemm`: C (row stride `ldc`) = A (row stride `lda`) · B,
/// where B(p, j) is at `b[j·b_col + p·b_row]` for `(b_col, b_row)`.
///
/// # Safety
/// Every element the product reads or writes is in bounds of `a`, `b` and `c`.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    (b_col, b_row): (usize, usize),
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            false,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            b_col as isize,
            b_row as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_naive_product_with_strides() {
        let (m, n, k) = (7, 13, 37);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let b: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104729) % 89) as f32 / 89.0 - 0.5)
            .collect();
        // C with a wider row stride than n: the padding must stay untouched.
        let ldc = n + 3;
        let mut c = vec![7.0; m * ldc];
        gemm_nt(m, n, k, &a, k, &b, k, &mut c, ldc);
        for i in 0..m {
            for j in 0..ldc {
                let got = c[i * ldc + j];
                if j >= n {
                    assert_eq!(got, 7.0);
                    continue;
                }
                let want: f32 = (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum();
                assert!((got - want).abs() < 1e-4, "{got} vs {want}");
            }
        }
    }

    #[test]
    fn nn_matches_a_naive_product() {
        let (m, n, k) = (5, 9, 11);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.5).collect();
        let mut c = vec![0.0; m * n];
        gemm_nn(m, n, k, &a, k, &b, n, &mut c, n);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                assert!((c[i * n + j] - want).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn matmul_into_handles_every_orientation_and_accumulates() {
        let (m, n, k) = (6, 5, 7);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 17) as f32 - 8.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 13) % 11) as f32 * 0.25).collect();
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let want = |i: usize, j: usize| (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f32>();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let oa = if ta {
                Operand::new(&at, m).t()
            } else {
                Operand::new(&a, k)
            };
            let ob = if tb {
                Operand::new(&bt, k).t()
            } else {
                Operand::new(&b, n)
            };
            let mut c = vec![1.0; m * n];
            matmul_into(m, n, k, oa, ob, &mut c, n, true, 1);
            for i in 0..m {
                for j in 0..n {
                    assert!((c[i * n + j] - 1.0 - want(i, j)).abs() < 1e-3, "{ta} {tb}");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "overflows")]
    fn overflowing_strides_are_caught() {
        let mut c = vec![0.0; 4];
        gemm_nt(2, 2, 2, &[0.0; 4], 2, &[0.0; 4], 2, &mut c, usize::MAX / 2);
    }
}
