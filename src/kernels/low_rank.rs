//! `y += s · (x Lᵀ) R`, row by row: a rank-r update added into the output of a larger product
//! (the LoRA linear's forward, `L = A`, `R = Bᵀ`, and its input gradient, `L = Bᵀ`, `R = A`).
//! As composed ops it is two thin GEMMs, an (n, r) and an (n, m) temporary and an addition
//! pass over y; here each row's r dot products and its update stay in cache.

use super::vecmath::{with_avx2, Real, LANES};
use rayon::prelude::*;

/// Rows per parallel task (a row is a few thousand multiply-adds).
const ROWS_PER_TASK: usize = 16;

/// `y (n, m) += s · (x (n, k) · l (r, k)ᵀ) · r_ (r, m)`, all row-major. Each row's update is
/// summed over the rank first and then added to y, as `y + delta` composes it.
pub(crate) fn add_low_rank<T: Real>(y: &mut [T], x: &[T], l: &[T], r_: &[T], rank: usize, s: T) {
    if rank == 0 || y.is_empty() {
        return;
    }
    let (k, m) = (l.len() / rank, r_.len() / rank);
    debug_assert_eq!(y.len() / m, x.len() / k.max(1));
    y.par_chunks_mut(m)
        .zip(x.par_chunks(k.max(1)))
        .with_min_len(ROWS_PER_TASK)
        .for_each_init(
            || vec![T::zero(); rank + m],
            |buf, (y, x)| {
                let (down, delta) = buf.split_at_mut(rank);
                row(y, x, l, r_, down, delta, s)
            },
        );
}

with_avx2! {
    fn row<T: Real>(y: &mut [T], x: &[T], l: &[T], r_: &[T], down: &mut [T], delta: &mut [T], s: T) -> () = row_portable
}

#[inline(always)]
fn row_portable<T: Real>(
    y: &mut [T],
    x: &[T],
    l: &[T],
    r_: &[T],
    down: &mut [T],
    delta: &mut [T],
    s: T,
) {
    let (k, m) = (x.len(), y.len());
    for (d, lj) in down.iter_mut().zip(l.chunks_exact(k.max(1))) {
        *d = dot(x, lj) * s;
    }
    delta.fill(T::zero());
    for (&d, rj) in down.iter().zip(r_.chunks_exact(m)) {
        for (o, &v) in delta.iter_mut().zip(rj) {
            *o += d * v;
        }
    }
    for (o, &v) in y.iter_mut().zip(delta.iter()) {
        *o += v;
    }
}

/// Σ a·b in `LANES` independent accumulators.
#[inline(always)]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (ca, cb) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    for (l, (&va, &vb)) in ta.iter().zip(tb).enumerate() {
        acc[l] += va * vb;
    }
    acc.into_iter().fold(T::zero(), |a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Equals the update computed in f64 the plain way, for shapes with and without a tail.
    #[test]
    fn equals_the_plain_sums() {
        for (n, k, m, rank) in [(37, 576, 192, 8), (5, 13, 7, 3), (1, 8, 1, 1)] {
            let val = |i: usize, salt: usize| ((i * 37 + salt) % 101) as f64 / 50.0 - 1.0;
            let x: Vec<f64> = (0..n * k).map(|i| val(i, 1)).collect();
            let l: Vec<f64> = (0..rank * k).map(|i| val(i, 2)).collect();
            let r: Vec<f64> = (0..rank * m).map(|i| val(i, 3)).collect();
            let y0: Vec<f64> = (0..n * m).map(|i| val(i, 4)).collect();
            let s = 0.75;
            let mut want = y0.clone();
            for i in 0..n {
                for j in 0..rank {
                    let d: f64 = (0..k).map(|c| x[i * k + c] * l[j * k + c]).sum::<f64>() * s;
                    for o in 0..m {
                        want[i * m + o] += d * r[j * m + o];
                    }
                }
            }
            let to32 = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<f32>>();
            let mut got64 = y0.clone();
            add_low_rank(&mut got64, &x, &l, &r, rank, s);
            let mut got32 = to32(&y0);
            add_low_rank(&mut got32, &to32(&x), &to32(&l), &to32(&r), rank, s as f32);
            for ((w, g64), g32) in want.iter().zip(&got64).zip(&got32) {
                assert!((w - g64).abs() < 1e-12, "{w} vs {g64}");
                assert!((w - *g32 as f64).abs() < 1e-4, "{w} vs {g32}");
            }
        }
    }
}
