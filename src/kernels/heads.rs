//! Attention heads in and out: `(b, t, n·hd) → (b, n, t, hd)` with the rotary embedding applied
//! on the way in (queries, keys) or not (values), and `(b, n, t, hd) → (b, t, n·hd)` on the way
//! out. On the CPU each is one row-parallel pass each way; composed, RoPE alone takes six passes
//! forward (narrow, neg, cat, two products, a sum) plus a copy for the transpose, and more back.
//! On other devices the composed form runs (its kernels exist there).

use super::ops::{per_float_dtype, slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType, D};
use rayon::prelude::*;
use std::sync::Arc;

/// Rotary tables for t positions: `cos`/`sin` (t, hd) — or (rows, 1, t, hd) when each batch row
/// has its own positions — as tensors of the compute dtype and as f64 rows for the fused CPU op.
/// Each row repeats its hd/2 angles twice (LLaMA's layout).
#[derive(Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
    /// 1: one table shared by every batch row; b: a table per row.
    rows: usize,
    cos64: Arc<Vec<f64>>,
    sin64: Arc<Vec<f64>>,
}

impl Rope {
    /// From `angles` (t, hd/2) in f64, shared by every batch row.
    pub fn new(
        angles: &[f64],
        t: usize,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        Self::per_row(angles, 1, t, dtype, device)
    }

    /// From `angles` (rows, t, hd/2) in f64: batch row r is rotated by its own table
    /// (left-padded sequences decoded together sit at different positions).
    pub fn per_row(
        angles: &[f64],
        rows: usize,
        t: usize,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let half = angles.len() / (rows * t).max(1);
        let row = |f: fn(f64) -> f64| -> Vec<f64> {
            angles
                .chunks(half)
                .flat_map(|a| a.iter().chain(a).map(|&v| f(v)))
                .collect()
        };
        let (cos64, sin64) = (row(f64::cos), row(f64::sin));
        let tensor = |v: &Vec<f64>| {
            let table = Tensor::from_vec(v.clone(), (rows * t, 2 * half), device)?;
            match rows {
                1 => table.to_dtype(dtype),
                _ => table.reshape((rows, 1, t, 2 * half))?.to_dtype(dtype),
            }
        };
        Ok(Self {
            cos: tensor(&cos64)?,
            sin: tensor(&sin64)?,
            rows,
            cos64: Arc::new(cos64),
            sin64: Arc::new(sin64),
        })
    }

    /// The f64 cos and sin rows of positions `0..len` (`hd` values each) when every batch row
    /// shares one table that long.
    pub(crate) fn shared_rows(&self, len: usize, hd: usize) -> Option<(&[f64], &[f64])> {
        let n = len * hd;
        (self.rows == 1 && self.cos64.len() >= n).then(|| (&self.cos64[..n], &self.sin64[..n]))
    }
}

/// `x · cos + rotate_half(x) · sin`, the composed reference (and the GPU path).
fn apply_rope(x: &Tensor, rope: &Rope) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&rope.cos)? + rotated.broadcast_mul(&rope.sin)?
}

/// Which way an op moves heads.
#[derive(Clone, Copy, PartialEq)]
enum Dir {
    /// (b, t, n·hd) → (b, n, t, hd)
    Split,
    /// (b, n, t, hd) → (b, t, n·hd)
    Merge,
}

/// A head split or merge, rotating each row by its position's angles times `sign` (±1) when
/// `rope` is set. Rotations are orthogonal, so the backward is the opposite move with `−sign`.
#[derive(Clone)]
struct Heads {
    dir: Dir,
    heads: usize,
    rope: Option<(Rope, f64)>,
}

impl Heads {
    /// (t, n, hd) of the move and the output shape, from the input dims.
    fn geometry(&self, dims: &[usize]) -> Result<(usize, usize, usize, Shape)> {
        Ok(match (self.dir, dims) {
            (Dir::Split, &[b, t, nhd]) => {
                let hd = nhd / self.heads;
                (t, self.heads, hd, Shape::from((b, self.heads, t, hd)))
            }
            (Dir::Merge, &[b, n, t, hd]) => (t, n, hd, Shape::from((b, t, n * hd))),
            _ => candle_core::bail!("attention heads: unexpected input shape {dims:?}"),
        })
    }

    fn run<T: WithDType>(&self, x: &[T], (t, n, hd): (usize, usize, usize)) -> Vec<T> {
        let half = hd / 2;
        let mut y = vec![T::zero(); x.len()];
        // One output row (hd values) per task chunk; rows are indexed (b, n, t) for Split and
        // (b, t, n) for Merge, and read from the other layout.
        y.par_chunks_mut(hd).enumerate().for_each(|(r, out)| {
            let (bi, ni, ti) = match self.dir {
                Dir::Split => (r / (n * t), (r / t) % n, r % t),
                Dir::Merge => (r / (t * n), r % n, (r / n) % t),
            };
            let src = match self.dir {
                Dir::Split => ((bi * t + ti) * n + ni) * hd,
                Dir::Merge => ((bi * n + ni) * t + ti) * hd,
            };
            let xr = &x[src..src + hd];
            match &self.rope {
                None => out.copy_from_slice(xr),
                Some((rope, sign)) => {
                    let p = if rope.rows == 1 { ti } else { bi * t + ti };
                    let cos = &rope.cos64[p * hd..(p + 1) * hd];
                    let sin = &rope.sin64[p * hd..(p + 1) * hd];
                    for i in 0..hd {
                        let rotated = if i < half {
                            -xr[i + half].to_f64()
                        } else {
                            xr[i - half].to_f64()
                        };
                        out[i] = T::from_f64(xr[i].to_f64() * cos[i] + sign * rotated * sin[i]);
                    }
                }
            }
        });
        y
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "attention-heads"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (t, n, hd, shape) = self.geometry(xl.dims())?;
        let y = per_float_dtype!(xs.dtype(), "attention-heads", T => self.run(slice::<T>(xs, xl)?, (t, n, hd)));
        Ok((y, shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let back = Heads {
            dir: match self.dir {
                Dir::Split => Dir::Merge,
                Dir::Merge => Dir::Split,
            },
            heads: self.heads,
            rope: self.rope.clone().map(|(r, sign)| (r, -sign)),
        };
        Ok(Some(dy.contiguous()?.apply_op1(back)?))
    }
}

/// `x` (b, t, n·hd) as `n` heads (b, n, t, hd), rotated by `rope` when given.
pub fn split_heads(x: &Tensor, n: usize, rope: Option<&Rope>) -> Result<Tensor> {
    if !x.device().is_cpu() {
        let (b, t, nhd) = x.dims3()?;
        let heads = x
            .reshape((b, t, n, nhd / n))?
            .transpose(1, 2)?
            .contiguous()?;
        return match rope {
            Some(rope) => apply_rope(&heads, rope),
            None => Ok(heads),
        };
    }
    x.contiguous()?.apply_op1(Heads {
        dir: Dir::Split,
        heads: n,
        rope: rope.map(|r| (r.clone(), 1.0)),
    })
}

/// [`split_heads`]'s values for one position's row `x` (n·hd) on the CPU: (n, hd), rotated by
/// `rope`'s first position.
pub(crate) fn split_row(x: &[f32], n: usize, rope: &Rope) -> Vec<f32> {
    let heads = Heads {
        dir: Dir::Split,
        heads: n,
        rope: Some((rope.clone(), 1.0)),
    };
    heads.run(x, (1, n, x.len() / n.max(1)))
}

/// Heads (b, n, t, hd) back to (b, t, n·hd).
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, n, t, hd) = x.dims4()?;
    if !x.device().is_cpu() {
        return x.transpose(1, 2)?.contiguous()?.reshape((b, t, n * hd));
    }
    x.contiguous()?.apply_op1(Heads {
        dir: Dir::Merge,
        heads: n,
        rope: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused op equals the composed form, values and input gradients (f64).
    #[test]
    fn fused_heads_equal_the_composed_form() {
        let dev = Device::Cpu;
        let (b, t, n, hd) = (2, 5, 3, 8);
        let angles: Vec<f64> = (0..t * hd / 2).map(|i| 0.37 * i as f64).collect();
        let rope = Rope::new(&angles, t, DType::F64, &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, t, n * hd), &dev).unwrap()).unwrap();
        let up = Tensor::randn(0f64, 1.0, (b, t, n * hd), &dev).unwrap();
        for with_rope in [false, true] {
            let r = with_rope.then_some(&rope);
            // Split, then merge back: (b, t, n·hd) → (b, n, t, hd) → (b, t, n·hd).
            let fused = merge_heads(&split_heads(x.as_tensor(), n, r).unwrap()).unwrap();
            let heads = x.reshape((b, t, n, hd)).unwrap().transpose(1, 2).unwrap();
            let heads = if with_rope {
                apply_rope(&heads, &rope).unwrap()
            } else {
                heads
            };
            let composed = heads
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, n * hd))
                .unwrap();
            let diff = (&fused - &composed)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
            let g = |y: &Tensor| {
                let grads = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                grads.get(x.as_tensor()).unwrap().clone()
            };
            let gd = (g(&fused) - g(&composed))
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(gd.to_scalar::<f64>().unwrap() < 1e-12);
        }
    }

    /// A per-row table rotates each batch row as its own shared table would, fused and composed.
    #[test]
    fn per_row_tables_rotate_each_row_by_its_own_positions() {
        let dev = Device::Cpu;
        let (b, t, n, hd) = (3, 2, 2, 8);
        let angles: Vec<f64> = (0..b * t * hd / 2).map(|i| 0.21 * i as f64 + 0.5).collect();
        let rope = Rope::per_row(&angles, b, t, DType::F64, &dev).unwrap();
        let x = Tensor::randn(0f64, 1.0, (b, t, n * hd), &dev).unwrap();
        let fused = split_heads(&x, n, Some(&rope)).unwrap();
        let heads = x.reshape((b, t, n, hd)).unwrap().transpose(1, 2).unwrap();
        let composed = apply_rope(&heads, &rope).unwrap();
        let per_row = t * hd / 2;
        for r in 0..b {
            let own =
                Rope::new(&angles[r * per_row..(r + 1) * per_row], t, DType::F64, &dev).unwrap();
            let alone = split_heads(&x.narrow(0, r, 1).unwrap(), n, Some(&own)).unwrap();
            for batched in [&fused, &composed] {
                let diff = (batched.narrow(0, r, 1).unwrap() - &alone).unwrap();
                let diff = diff
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(diff < 1e-12, "row {r}: {diff}");
            }
        }
    }
}
