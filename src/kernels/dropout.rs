//! Inverted dropout as one op, as `torch.nn.Dropout` in training mode: element i of a call is
//! dropped when `element_hash(seed, i) < p · 2³²`, else scaled by 1/(1 − p). The mask is a
//! hash, not a tensor: it costs no memory, every core (or GPU thread) computes its own part,
//! CPU and CUDA draw the same one, and backward applies it again to the gradient.

use super::ops::{per_float_dtype, slice, ELEMENTWISE_CHUNK as CHUNK};
use super::vecmath::with_avx2;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// One call's mask: public to the crate for ops that drop inside themselves (the fused LoRA
/// linear drops its adapters' inputs as [`dropout`] would).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dropout {
    seed: u64,
    threshold: u32,
    scale: f32,
}

/// Chris Wellons' `lowbias32`: a 32-bit bijection with very low avalanche bias, in 32-bit
/// multiplies and shifts that SIMD units have (64-bit multiplies they mostly lack).
#[inline(always)]
fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The uniform 32-bit draw of element `i` under `seed`: two rounds, each keyed by one half of
/// the seed and fed one half of the index.
#[inline(always)]
fn element_hash(seed: u64, i: u64) -> u32 {
    let h = lowbias32(i as u32 ^ seed as u32);
    lowbias32(h ^ (i >> 32) as u32 ^ (seed >> 32) as u32)
}

with_avx2! {
    /// `ys = xs · mask` for elements `first..` of the call.
    fn apply_chunk<T: WithDType>(ys: &mut [T], xs: &[T], first: u64, op: Dropout) -> () = apply_chunk_portable
}

#[inline(always)]
fn apply_chunk_portable<T: WithDType>(ys: &mut [T], xs: &[T], first: u64, op: Dropout) {
    let scale = T::from_f64(op.scale as f64);
    for (i, (o, &v)) in ys.iter_mut().zip(xs).enumerate() {
        let keep = element_hash(op.seed, first + i as u64) >= op.threshold;
        *o = v * if keep { scale } else { T::zero() };
    }
}

impl Dropout {
    /// The mask [`dropout`] draws for `seed` and probability `p`.
    pub(crate) fn new(seed: u64, p: f64) -> Self {
        Dropout {
            seed,
            threshold: (p * 2f64.powi(32)).min(u32::MAX as f64) as u32,
            scale: (1.0 / (1.0 - p)) as f32,
        }
    }

    /// `x · mask` with the mask in `x`'s dtype: a dropped NaN or ∞ still poisons the output, as
    /// PyTorch's (the non-finite guard must see it).
    pub(crate) fn apply<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (ys, xs))| apply_chunk(ys, xs, (c * CHUNK) as u64, *self));
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
        let y = crate::kernels::cuda::dropout(xs, xl, self.seed, self.threshold, self.scale)?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.apply_op1(*self)?))
    }
}

/// Dropout with probability `p` (0 ≤ p < 1) whose mask is derived from `seed`.
pub fn dropout(x: &Tensor, seed: u64, p: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Dropout::new(seed, p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// A fraction p dropped (within 6σ of a binomial), the rest scaled by 1/(1 − p), the same
    /// mask for the same seed and another for another seed; a dropped NaN stays NaN.
    #[test]
    fn drops_a_fraction_p_and_scales_the_rest() {
        let n = 1 << 20;
        let ones = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
        let mask = |seed| dropout(&ones, seed, 0.1).unwrap().to_vec1::<f32>().unwrap();
        let (a, b) = (mask(7), mask(8));
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        assert!(
            (dropped - 0.1).abs() < 6.0 * (0.09 / n as f64).sqrt(),
            "{dropped}"
        );
        assert!(a.iter().all(|&v| v == 0.0 || v == (1.0f64 / 0.9) as f32));
        assert_eq!(a, mask(7));
        let same = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| (**x == 0.0) == (**y == 0.0))
            .count();
        assert!(same < n - n / 10, "seeds 7 and 8 gave nearly the same mask");
        let first_dropped = a.iter().position(|&v| v == 0.0).unwrap();
        let mut poisoned = vec![1f32; n];
        poisoned[first_dropped] = f32::NAN;
        let y = dropout(&Tensor::new(poisoned, &Device::Cpu).unwrap(), 7, 0.1).unwrap();
        assert!(y.to_vec1::<f32>().unwrap()[first_dropped].is_nan());
    }
}
