//! `x · wᵀ` for an `x` of a few rows, as a decoding step has (one per sequence): each pair of
//! rows of `w` is read once and multiplied with four rows of `x` at a time in registers. A GEMM
//! packs all of `w` first, which at a handful of rows costs about as much as the product (the
//! 32000 × d vocabulary head, every step).

use rayon::prelude::*;

/// Rows of `x` for which the skinny product is used (one row is a GEMV, which candle's GEMM
/// does well).
pub const ROWS: std::ops::RangeInclusive<usize> = 2..=16;

/// Rows of `w` per task.
const TASK_ROWS: usize = 64;

/// Whether this CPU runs the kernel (AVX2 and FMA); elsewhere the GEMM is used.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x (m, k) · wᵀ` for `w (n, k)`, both row-major; returns `(m, n)` row-major. Call only when
/// [`available`].
pub fn xwt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(available(), "skinny: needs AVX2 and FMA");
    assert_eq!(x.len(), m * k, "skinny: x is (m, k)");
    assert_eq!(w.len(), n * k, "skinny: w is (n, k)");
    // Each task fills an (m, its rows) block, copied into y's rows afterwards.
    let blocks: Vec<Vec<f32>> = w
        .par_chunks(TASK_ROWS * k)
        .map(|rows| {
            let mut block = vec![0f32; m * (rows.len() / k)];
            // SAFETY: available() was checked above.
            unsafe { avx2::block(x, rows, m, k, &mut block) };
            block
        })
        .collect();
    let mut y = vec![0f32; m * n];
    for (b, block) in blocks.iter().enumerate() {
        let (j0, width) = (b * TASK_ROWS, block.len() / m.max(1));
        for (r, row) in y.chunks_exact_mut(n).enumerate() {
            row[j0..j0 + width].copy_from_slice(&block[r * width..(r + 1) * width]);
        }
    }
    y
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(a, b)| a * b).sum()
    }

    /// A whole-row dot product, four accumulators deep.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot8(a: &[f32], b: &[f32]) -> f32 {
        let k = a.len();
        let z = _mm256_setzero_ps();
        let mut acc = [z, z, z, z];
        let mut i = 0;
        while i + 32 <= k {
            for (u, s) in acc.iter_mut().enumerate() {
                let (x, y) = (
                    _mm256_loadu_ps(a.as_ptr().add(i + 8 * u)),
                    _mm256_loadu_ps(b.as_ptr().add(i + 8 * u)),
                );
                *s = _mm256_fmadd_ps(x, y, *s);
            }
            i += 32;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        lanes.iter().sum::<f32>() + dot(&a[i..], &b[i..])
    }

    /// `out (m, rows)` = `x (m, k)` · `w_rows`ᵀ.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block(x: &[f32], w_rows: &[f32], m: usize, k: usize, out: &mut [f32]) {
        let rows = w_rows.len() / k;
        let whole = k / 8 * 8;
        let (quads, pairs) = (m / 4 * 4, rows / 2 * 2);
        for j in (0..pairs).step_by(2) {
            for r in (0..quads).step_by(4) {
                let sums = four_by_two(x.as_ptr().add(r * k), w_rows.as_ptr().add(j * k), k, whole);
                for (p, col) in sums.iter().enumerate() {
                    let wr = &w_rows[(j + p) * k..(j + p + 1) * k];
                    for (q, s) in col.iter().enumerate() {
                        let xr = &x[(r + q) * k..(r + q + 1) * k];
                        out[(r + q) * rows + j + p] = s + dot(&xr[whole..], &wr[whole..]);
                    }
                }
            }
        }
        // The rows of x past the last four, and the last row of w when their number is odd.
        for r in 0..m {
            for j in 0..rows {
                if r >= quads || j >= pairs {
                    out[r * rows + j] = dot8(&x[r * k..(r + 1) * k], &w_rows[j * k..(j + 1) * k]);
                }
            }
        }
    }

    /// Four rows of x (stride k) times two rows of w (stride k) over the first `whole`
    /// elements: `[w row][x row]` sums, eight accumulators held in registers.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn four_by_two(x: *const f32, w: *const f32, k: usize, whole: usize) -> [[f32; 4]; 2] {
        let z = _mm256_setzero_ps();
        let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
        let (mut b0, mut b1, mut b2, mut b3) = (z, z, z, z);
        let mut i = 0;
        while i < whole {
            let w0 = _mm256_loadu_ps(w.add(i));
            let w1 = _mm256_loadu_ps(w.add(k + i));
            let x0 = _mm256_loadu_ps(x.add(i));
            a0 = _mm256_fmadd_ps(x0, w0, a0);
            b0 = _mm256_fmadd_ps(x0, w1, b0);
            let x1 = _mm256_loadu_ps(x.add(k + i));
            a1 = _mm256_fmadd_ps(x1, w0, a1);
            b1 = _mm256_fmadd_ps(x1, w1, b1);
            let x2 = _mm256_loadu_ps(x.add(2 * k + i));
            a2 = _mm256_fmadd_ps(x2, w0, a2);
            b2 = _mm256_fmadd_ps(x2, w1, b2);
            let x3 = _mm256_loadu_ps(x.add(3 * k + i));
            a3 = _mm256_fmadd_ps(x3, w0, a3);
            b3 = _mm256_fmadd_ps(x3, w1, b3);
            i += 8;
        }
        let h = |v: __m256| {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), v);
            lanes.iter().sum::<f32>()
        };
        [[h(a0), h(a1), h(a2), h(a3)], [h(b0), h(b1), h(b2), h(b3)]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Equal to the f64 product within f32 rounding, for row counts around the blocks of four,
    /// odd numbers of w rows and widths with a tail.
    #[test]
    fn skinny_product_equals_the_f64_product() {
        if !available() {
            return;
        }
        for &(m, k, n) in &[
            (1, 16, 3),
            (3, 13, 70),
            (4, 64, 129),
            (11, 37, 65),
            (16, 256, 200),
            (5, 8, 1),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 97) as f32 / 48.0 - 1.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 104729) % 89) as f32 / 44.0 - 1.0)
                .collect();
            let y = xwt(&x, &w, m, k, n);
            for r in 0..m {
                for j in 0..n {
                    let terms = (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64);
                    let want: f64 = terms.clone().sum();
                    let scale: f64 = terms.map(f64::abs).sum();
                    let got = y[r * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * scale.max(1.0),
                        "({m},{k},{n}) [{r},{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
