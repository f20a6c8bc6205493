//! The small ops PEFT methods add around the frozen products: column
//! scaling and its reduction, element-wise and Kronecker products, and
//! DoRA's row norms. Sums over rows run in fixed chunks combined in order,
//! so results do not depend on the number of threads.

use rayon::prelude::*;

/// Rows summed by one task of a column reduction.
const CHUNK_ROWS: usize = 64;

/// `y = x ⊙ v` with `v` repeated along each row (`x.len()` a multiple of `v.len()`).
pub fn mul_cols(x: &[f32], v: &[f32], y: &mut [f32]) {
    let m = v.len();
    y.par_chunks_mut(m * 16)
        .zip(x.par_chunks(m * 16))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_exact_mut(m).zip(xc.chunks_exact(m)) {
                for ((y, &x), &v) in yr.iter_mut().zip(xr).zip(v) {
                    *y = x * v;
                }
            }
        });
}

/// `out[j] = Σᵢ a[i·m + j]·b[i·m + j]` over every row `i` (`m = out.len()`).
pub fn col_dot(a: &[f32], b: &[f32], out: &mut [f32]) {
    let m = out.len();
    let partial: Vec<Vec<f64>> = a
        .par_chunks(m * CHUNK_ROWS)
        .zip(b.par_chunks(m * CHUNK_ROWS))
        .map(|(ac, bc)| {
            let mut s = vec![0.0f64; m];
            for (ar, br) in ac.chunks_exact(m).zip(bc.chunks_exact(m)) {
                for ((s, &a), &b) in s.iter_mut().zip(ar).zip(br) {
                    *s += f64::from(a) * f64::from(b);
                }
            }
            s
        })
        .collect();
    for (j, o) in out.iter_mut().enumerate() {
        *o = partial.iter().map(|p| p[j]).sum::<f64>() as f32;
    }
}

/// `y = a ⊗ b` for `a (p, q)`, `b (m, n)`: `y (p·m, q·n)`.
pub fn kron(a: &[f32], (p, q): (usize, usize), b: &[f32], (m, n): (usize, usize), y: &mut [f32]) {
    y.par_chunks_mut(q * n).enumerate().for_each(|(row, yr)| {
        let (i, k) = (row / m, row % m);
        for j in 0..q {
            let aij = a[i * q + j];
            for l in 0..n {
                yr[j * n + l] = aij * b[k * n + l];
            }
        }
    });
    debug_assert_eq!(y.len(), p * m * q * n);
}

/// `da`, `db` of [`kron`] from `dy`.
#[allow(clippy::too_many_arguments)]
pub fn kron_back(
    a: &[f32],
    (p, q): (usize, usize),
    b: &[f32],
    (m, n): (usize, usize),
    dy: &[f32],
    da: &mut [f32],
    db: &mut [f32],
) {
    let w = q * n;
    // da[i, j] = Σ_{k,l} dy[i·m + k, j·n + l]·b[k, l]
    da.par_iter_mut().enumerate().for_each(|(ij, d)| {
        let (i, j) = (ij / q, ij % q);
        let mut s = 0.0f64;
        for k in 0..m {
            let row = &dy[(i * m + k) * w + j * n..][..n];
            for l in 0..n {
                s += f64::from(row[l]) * f64::from(b[k * n + l]);
            }
        }
        *d = s as f32;
    });
    // db[k, l] = Σ_{i,j} dy[i·m + k, j·n + l]·a[i, j]
    db.par_chunks_mut(n).enumerate().for_each(|(k, dr)| {
        let mut s = vec![0.0f64; n];
        for i in 0..p {
            let row = &dy[(i * m + k) * w..][..w];
            for j in 0..q {
                let aij = f64::from(a[i * q + j]);
                for l in 0..n {
                    s[l] += aij * f64::from(row[j * n + l]);
                }
            }
        }
        for (d, s) in dr.iter_mut().zip(s) {
            *d = s as f32;
        }
    });
}

/// DoRA's squared row norms of `W + s·B·A` ([`crate::graph::Op::DoraNorm`]):
/// `n2[i] = c[i] + 2s·Σₖ b[i,k]·wa[k,i] + s²·Σₖₗ b[i,k]·gram[k,l]·b[i,l]`.
pub fn dora_norm(c: &[f32], wa: &[f32], b: &[f32], gram: &[f32], s: f32, n2: &mut [f32]) {
    let out = c.len();
    let r = b.len() / out;
    let s = f64::from(s);
    n2.par_iter_mut().enumerate().for_each(|(i, n)| {
        let bi = &b[i * r..(i + 1) * r];
        let (mut cross, mut quad) = (0.0f64, 0.0f64);
        for k in 0..r {
            cross += f64::from(bi[k]) * f64::from(wa[k * out + i]);
            let mut gk = 0.0f64;
            for l in 0..r {
                gk += f64::from(gram[k * r + l]) * f64::from(bi[l]);
            }
            quad += f64::from(bi[k]) * gk;
        }
        *n = (f64::from(c[i]) + 2.0 * s * cross + s * s * quad) as f32;
    });
}

/// `dwa`, `db`, `dgram` of [`dora_norm`] from `dn2`.
#[allow(clippy::too_many_arguments)]
pub fn dora_norm_back(
    wa: &[f32],
    b: &[f32],
    gram: &[f32],
    dn2: &[f32],
    s: f32,
    dwa: &mut [f32],
    db: &mut [f32],
    dgram: &mut [f32],
) {
    let out = dn2.len();
    let r = b.len() / out;
    let s = f64::from(s);
    // dwa[k, i] = 2s·b[i, k]·dn2[i]
    dwa.par_chunks_mut(out).enumerate().for_each(|(k, row)| {
        for (i, d) in row.iter_mut().enumerate() {
            *d = (2.0 * s * f64::from(b[i * r + k]) * f64::from(dn2[i])) as f32;
        }
    });
    // db[i, k] = dn2[i]·(2s·wa[k, i] + s²·Σₗ (gram[k, l] + gram[l, k])·b[i, l])
    db.par_chunks_mut(r).enumerate().for_each(|(i, row)| {
        let bi = &b[i * r..(i + 1) * r];
        for (k, d) in row.iter_mut().enumerate() {
            let mut q = 0.0f64;
            for l in 0..r {
                q += (f64::from(gram[k * r + l]) + f64::from(gram[l * r + k])) * f64::from(bi[l]);
            }
            let v = 2.0 * s * f64::from(wa[k * out + i]) + s * s * q;
            *d = (f64::from(dn2[i]) * v) as f32;
        }
    });
    // dgram[k, l] = s²·Σᵢ dn2[i]·b[i, k]·b[i, l]
    dgram.par_iter_mut().enumerate().for_each(|(kl, d)| {
        let (k, l) = (kl / r, kl % r);
        let mut acc = 0.0f64;
        for i in 0..out {
            acc += f64::from(dn2[i]) * f64::from(b[i * r + k]) * f64::from(b[i * r + l]);
        }
        *d = (s * s * acc) as f32;
    });
}

/// `y = x` with rows `0..n` of each sequence of `seq` rows of width `c`
/// replaced by `p (n, c)`.
pub fn prefix_rows(x: &[f32], p: &[f32], (n, seq): (usize, usize), y: &mut [f32]) {
    let c = p.len() / n;
    y.par_chunks_mut(seq * c)
        .zip(x.par_chunks(seq * c))
        .for_each(|(ys, xs)| {
            ys[..n * c].copy_from_slice(p);
            ys[n * c..].copy_from_slice(&xs[n * c..]);
        });
}

/// `dx` (`dy` with the prefix rows zeroed) and `dp` (the prefix rows of
/// `dy` summed over the sequences, in order) of [`prefix_rows`].
pub fn prefix_rows_back(dy: &[f32], (n, seq): (usize, usize), dx: &mut [f32], dp: &mut [f32]) {
    let c = dp.len() / n;
    dp.fill(0.0);
    for (dys, dxs) in dy.chunks(seq * c).zip(dx.chunks_mut(seq * c)) {
        dp.iter_mut().zip(&dys[..n * c]).for_each(|(p, d)| *p += d);
        dxs[..n * c].fill(0.0);
        dxs[n * c..].copy_from_slice(&dys[n * c..]);
    }
}

/// `y = m / √n2`.
pub fn rsqrt_mul(m: &[f32], n2: &[f32], y: &mut [f32]) {
    for ((y, &m), &n) in y.iter_mut().zip(m).zip(n2) {
        *y = m / n.sqrt();
    }
}

/// `dm = dy / √n2`, `dn2 = −½·dy·m·n2^(−3/2)` of [`rsqrt_mul`].
pub fn rsqrt_mul_back(m: &[f32], n2: &[f32], dy: &[f32], dm: &mut [f32], dn2: &mut [f32]) {
    for i in 0..m.len() {
        let inv = 1.0 / n2[i].sqrt();
        dm[i] = dy[i] * inv;
        dn2[i] = -0.5 * dy[i] * m[i] * inv * inv * inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kron_matches_its_definition_and_back_is_its_adjoint() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // (2, 3)
        let b = [0.5, -1.0, 2.0, 0.25]; // (2, 2)
        let mut y = vec![0.0; 24];
        kron(&a, (2, 3), &b, (2, 2), &mut y);
        // Row 1 = i 0, k 1: a[0, j]·b[1, l].
        assert_eq!(&y[6..12], &[2.0, 0.25, 4.0, 0.5, 6.0, 0.75]);
        assert_eq!(y[23], 6.0 * 0.25);
        // ⟨dy, kron(a, b)⟩ is linear in each: ⟨da, a⟩ = ⟨db, b⟩ = ⟨dy, y⟩.
        let dy: Vec<f32> = (0..24).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
        let (mut da, mut db) = (vec![0.0; 6], vec![0.0; 4]);
        kron_back(&a, (2, 3), &b, (2, 2), &dy, &mut da, &mut db);
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f32>();
        let total = dot(&dy, &y);
        assert!((dot(&da, &a) - total).abs() < 1e-4);
        assert!((dot(&db, &b) - total).abs() < 1e-4);
    }

    #[test]
    fn dora_norm_is_the_row_norm_of_w_plus_sba() {
        let (out, inn, r, s) = (3, 4, 2, 0.7f32);
        let w: Vec<f32> = (0..out * inn).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<f32> = (0..r * inn).map(|i| (i as f32 * 0.91).cos()).collect();
        let b: Vec<f32> = (0..out * r).map(|i| (i as f32 * 1.3).sin()).collect();
        let c: Vec<f32> = (0..out)
            .map(|i| w[i * inn..(i + 1) * inn].iter().map(|v| v * v).sum())
            .collect();
        let mut wa = vec![0.0; r * out];
        let mut gram = vec![0.0; r * r];
        for k in 0..r {
            for i in 0..out {
                wa[k * out + i] = (0..inn).map(|j| a[k * inn + j] * w[i * inn + j]).sum();
            }
            for l in 0..r {
                gram[k * r + l] = (0..inn).map(|j| a[k * inn + j] * a[l * inn + j]).sum();
            }
        }
        let mut n2 = vec![0.0; out];
        dora_norm(&c, &wa, &b, &gram, s, &mut n2);
        for i in 0..out {
            let want: f32 = (0..inn)
                .map(|j| {
                    let ba: f32 = (0..r).map(|k| b[i * r + k] * a[k * inn + j]).sum();
                    (w[i * inn + j] + s * ba).powi(2)
                })
                .sum();
            assert!(
                (n2[i] - want).abs() < 1e-4 * want,
                "{i}: {} vs {want}",
                n2[i]
            );
        }
    }
}
