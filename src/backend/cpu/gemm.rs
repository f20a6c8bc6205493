//! Safe wrappers over the `gemm` crate's f32 kernels, for the two layouts the
//! CPU backend needs. Bounds are checked here so callers stay safe.

use gemm::Parallelism;

/// `c[i·ldc + j] (+)= Σ_k a[i·lda + k] · b[j·ldb + k]` for `i < m, j < n`:
/// C (m×n) = A (m×k) · Bᵀ where B is stored as n rows of k.
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
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        lda >= k && ldb >= k && ldc >= n,
        "gemm_nt: strides smaller than the rows"
    );
    assert!(a.len() >= (m - 1) * lda + k, "gemm_nt: A too short");
    assert!(b.len() >= (n - 1) * ldb + k, "gemm_nt: B too short");
    assert!(c.len() >= (m - 1) * ldc + n, "gemm_nt: C too short");
    // SAFETY: the asserts above keep every index the kernel touches in bounds:
    // A(i,k) at i·lda + k, B(k,j) at j·ldb + k, C(i,j) at i·ldc + j.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            ldb as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// `c[i·ldc + j] (+)= Σ_k a[i·lda + k] · b[k·ldb + j]`:
/// C (m×n) = A (m×k) · B (k×n), all row-major.
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
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        lda >= k && ldb >= n && ldc >= n,
        "gemm_nn: strides smaller than the rows"
    );
    assert!(a.len() >= (m - 1) * lda + k, "gemm_nn: A too short");
    assert!(
        k == 0 || b.len() >= (k - 1) * ldb + n,
        "gemm_nn: B too short"
    );
    assert!(c.len() >= (m - 1) * ldc + n, "gemm_nn: C too short");
    // SAFETY: bounds checked above: B(k,j) at k·ldb + j.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            1,
            ldb as isize,
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

    fn naive(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        b_at: impl Fn(usize, usize) -> f32,
    ) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b_at(p, j)).sum();
            }
        }
        c
    }

    #[test]
    fn both_layouts_match_a_naive_product() {
        let (m, n, k) = (7, 13, 37);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let b: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104729) % 89) as f32 / 89.0 - 0.5)
            .collect();
        // B as n rows of k (transposed use).
        let want = naive(m, n, k, &a, |p, j| b[j * k + p]);
        let mut c = vec![0.0; m * n];
        gemm_nt(m, n, k, &a, k, &b, k, &mut c, n, false);
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
        // B as k rows of n.
        let want = naive(m, n, k, &a, |p, j| b[p * n + j]);
        let mut c = vec![1.0; m * n];
        gemm_nn(m, n, k, &a, k, &b, n, &mut c, n, true);
        for (x, y) in c.iter().zip(&want) {
            assert!((x - (y + 1.0)).abs() < 1e-4, "{x} vs {y}+1");
        }
    }
}
