//! Inverted dropout as one op, as `torch.nn.Dropout` in training mode: element i of a call is
//! dropped when `mix_seed(seed, i) < p · 2⁶⁴`, else scaled by 1/(1 − p). The mask is a hash, not
//! a tensor: it costs no memory, every core (or GPU thread) computes its own part, CPU and CUDA
//! draw the same one, and backward applies it again to the gradient.

use super::mix_seed;
use crate::model::ops::{per_float_dtype, slice, ELEMENTWISE_CHUNK as CHUNK};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

#[derive(Clone, Copy)]
struct Dropout {
    seed: u64,
    threshold: u64,
    scale: f32,
}

impl Dropout {
    /// `x · mask` with the mask in `x`'s dtype: a dropped NaN or ∞ still poisons the output, as
    /// PyTorch's (the non-finite guard must see it).
    fn apply<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let scale = T::from_f64(self.scale as f64);
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (ys, xs))| {
                let first = (c * CHUNK) as u64;
                for (i, (o, &v)) in ys.iter_mut().zip(xs).enumerate() {
                    let keep = mix_seed(self.seed, first + i as u64) >= self.threshold;
                    *o = v * if keep { scale } else { T::zero() };
                }
            });
        y
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = per_float_dtype!(xs.dtype(), "dropout", T => self.apply(slice::<T>(xs, xl)?));
        Ok((y, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda::dropout(xs, xl, self.seed, self.threshold, self.scale)?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.apply_op1(*self)?))
    }
}

/// Dropout with probability `p` (0 ≤ p < 1) whose mask is derived from `seed`.
pub fn dropout(x: &Tensor, seed: u64, p: f64) -> Result<Tensor> {
    let op = Dropout {
        seed,
        threshold: (p * u64::MAX as f64) as u64,
        scale: (1.0 / (1.0 - p)) as f32,
    };
    x.contiguous()?.apply_op1(op)
}
