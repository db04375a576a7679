//! `y += s · down · R`, row by row: a rank-r update added into the output of a larger product
//! (the LoRA linear's forward, `down = x Aᵀ`, `R = Bᵀ`, and its input gradient, `down = g B`,
//! `R = A`). Composed, the update is a thin GEMM into an (n, m) temporary and an addition pass
//! over y; here each element's update is summed over the rank in registers and added once.

use super::vecmath::{with_avx2, Real, LANES};
use rayon::prelude::*;
use std::ops::Range;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 16;

/// Output columns whose update is summed in registers at once (four AVX registers of f32).
const OUT_BLOCK: usize = 4 * LANES;

/// One rank-r update of a row-major `y` whose rows are `width` long: `y[:, cols] +=
/// (scale · down[:, ranks]) · r_` with `r_ (ranks.len(), cols.len())` row-major. Several updates
/// of disjoint column ranges (the LoRA linears of one fused projection) share a pass over y.
pub(crate) struct Update<'a, T> {
    pub cols: Range<usize>,
    pub ranks: Range<usize>,
    pub scale: T,
    pub r: &'a [T],
}

/// Applies `updates` to `y (n, width)` from `down (n, rank_total)`. Each element's update is
/// summed over the rank first and then added to y, as `y + delta` composes it.
pub(crate) fn add_low_rank<T: Real>(
    y: &mut [T],
    width: usize,
    down: &[T],
    rank_total: usize,
    updates: &[Update<T>],
) {
    if rank_total == 0 || width == 0 || y.is_empty() {
        return;
    }
    debug_assert_eq!(y.len() / width, down.len() / rank_total);
    y.par_chunks_mut(width)
        .zip(down.par_chunks(rank_total))
        .with_min_len(ROWS_PER_TASK)
        .for_each_init(
            || vec![T::zero(); rank_total],
            |scaled, (y, down)| {
                for u in updates {
                    let scaled = &mut scaled[..u.ranks.len()];
                    for (o, &d) in scaled.iter_mut().zip(&down[u.ranks.clone()]) {
                        *o = d * u.scale;
                    }
                    row(&mut y[u.cols.clone()], scaled, u.r)
                }
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
            let whole = |r| Update {
                cols: 0..m,
                ranks: 0..rank,
                scale: s,
                r,
            };
            let mut got64 = y0.clone();
            add_low_rank(&mut got64, m, &down, rank, &[whole(&r)]);
            let mut got32 = to32(&y0);
            let r32 = to32(&r);
            let update32 = Update {
                cols: 0..m,
                ranks: 0..rank,
                scale: s as f32,
                r: &r32[..],
            };
            add_low_rank(&mut got32, m, &to32(&down), rank, &[update32]);
            for ((w, g64), g32) in want.iter().zip(&got64).zip(&got32) {
                assert!((w - g64).abs() < 1e-12, "{w} vs {g64}");
                assert!((w - *g32 as f64).abs() < 1e-5, "{w} vs {g32}");
            }
        }
    }

    /// Two updates on disjoint column ranges from disjoint rank ranges equal each applied to
    /// its own columns alone, the columns between them untouched.
    #[test]
    fn updates_of_column_ranges_touch_their_columns_alone() {
        let (n, width, rank) = (21, 100, 6);
        let val = |i: usize, salt: usize| ((i * 37 + salt) % 101) as f64 / 50.0 - 1.0;
        let down: Vec<f64> = (0..n * 2 * rank).map(|i| val(i, 5)).collect();
        let r1: Vec<f64> = (0..rank * 40).map(|i| val(i, 6)).collect();
        let r2: Vec<f64> = (0..rank * 35).map(|i| val(i, 7)).collect();
        let y0: Vec<f64> = (0..n * width).map(|i| val(i, 8)).collect();
        let mut got = y0.clone();
        let updates = [
            Update {
                cols: 0..40,
                ranks: 0..rank,
                scale: 0.5,
                r: &r1[..],
            },
            Update {
                cols: 65..100,
                ranks: rank..2 * rank,
                scale: 2.0,
                r: &r2[..],
            },
        ];
        add_low_rank(&mut got, width, &down, 2 * rank, &updates);
        for i in 0..n {
            for o in 0..width {
                let (first, s, r, cols) = match o {
                    0..40 => (0, 0.5, &r1, 0..40),
                    65..100 => (rank, 2.0, &r2, 65..100),
                    _ => {
                        assert_eq!(got[i * width + o], y0[i * width + o]);
                        continue;
                    }
                };
                let w = cols.len();
                let delta: f64 = (0..rank)
                    .map(|j| down[i * 2 * rank + first + j] * s * r[j * w + o - cols.start])
                    .sum();
                let want = y0[i * width + o] + delta;
                assert!((want - got[i * width + o]).abs() < 1e-12);
            }
        }
    }
}
