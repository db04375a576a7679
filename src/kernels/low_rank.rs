//! `y += s · down · R`, row by row: a rank-r update added into the output of a larger product
//! (the LoRA linear's forward, `down = x Aᵀ`, `R = Bᵀ`, and its input gradient, `down = g B`,
//! `R = A`). Composed, the update is a thin GEMM into an (n, m) temporary and an addition pass
//! over y; here each element's update is summed over the rank in registers and added once.

use super::vecmath::{with_avx2, Real, LANES};
use rayon::prelude::*;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 16;

/// Output columns whose update is summed in registers at once (four AVX registers of f32).
const OUT_BLOCK: usize = 4 * LANES;

/// `y (n, m) += (s · down (n, r)) · r_ (r, m)`, all row-major. Each element's update is
/// summed over the rank first and then added to y, as `y + delta` composes it.
pub(crate) fn add_low_rank<T: Real>(y: &mut [T], down: &[T], r_: &[T], rank: usize, s: T) {
    if rank == 0 || y.is_empty() {
        return;
    }
    let m = r_.len() / rank;
    debug_assert_eq!(y.len() / m, down.len() / rank);
    y.par_chunks_mut(m)
        .zip(down.par_chunks(rank))
        .with_min_len(ROWS_PER_TASK)
        .for_each_init(
            || vec![T::zero(); rank],
            |scaled, (y, down)| {
                for (o, &d) in scaled.iter_mut().zip(down) {
                    *o = d * s;
                }
                row(y, scaled, r_)
            },
        );
}

with_avx2! {
    fn row<T: Real>(y: &mut [T], down: &[T], r_: &[T]) -> () = row_portable
}

#[inline(always)]
fn row_portable<T: Real>(y: &mut [T], down: &[T], r_: &[T]) {
    let m = y.len();
    let whole = m / OUT_BLOCK * OUT_BLOCK;
    for (b, yb) in y[..whole].chunks_exact_mut(OUT_BLOCK).enumerate() {
        let first = b * OUT_BLOCK;
        let mut acc = [T::zero(); OUT_BLOCK];
        for (&d, rj) in down.iter().zip(r_.chunks_exact(m)) {
            let rj: &[T; OUT_BLOCK] = rj[first..first + OUT_BLOCK].try_into().expect("a block");
            for (a, &v) in acc.iter_mut().zip(rj) {
                *a += d * v;
            }
        }
        for (o, a) in yb.iter_mut().zip(acc) {
            *o += a;
        }
    }
    for (o, yo) in y.iter_mut().enumerate().skip(whole) {
        let mut a = T::zero();
        for (&d, rj) in down.iter().zip(r_.chunks_exact(m)) {
            a += d * rj[o];
        }
        *yo += a;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Equals the update computed in f64 the plain way, for shapes with and without a tail.
    #[test]
    fn equals_the_plain_sums() {
        for (n, m, rank) in [(37, 192, 8), (5, 70, 7), (1, 1, 1)] {
            let val = |i: usize, salt: usize| ((i * 37 + salt) % 101) as f64 / 50.0 - 1.0;
            let down: Vec<f64> = (0..n * rank).map(|i| val(i, 2)).collect();
            let r: Vec<f64> = (0..rank * m).map(|i| val(i, 3)).collect();
            let y0: Vec<f64> = (0..n * m).map(|i| val(i, 4)).collect();
            let s = 0.75;
            let mut want = y0.clone();
            for i in 0..n {
                for o in 0..m {
                    let delta: f64 = (0..rank)
                        .map(|j| down[i * rank + j] * s * r[j * m + o])
                        .sum();
                    want[i * m + o] += delta;
                }
            }
            let to32 = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<f32>>();
            let mut got64 = y0.clone();
            add_low_rank(&mut got64, &down, &r, rank, s);
            let mut got32 = to32(&y0);
            add_low_rank(&mut got32, &to32(&down), &to32(&r), rank, s as f32);
            for ((w, g64), g32) in want.iter().zip(&got64).zip(&got32) {
                assert!((w - g64).abs() < 1e-12, "{w} vs {g64}");
                assert!((w - *g32 as f64).abs() < 1e-5, "{w} vs {g32}");
            }
        }
    }
}
