//! Softmax cross-entropy over vocabulary rows, with its gradient formed in the same pass, and
//! the graph node that carries a loss computed that way into autograd.

use super::ops::slice;
use super::vecmath::{self, with_avx2, Real};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The summed cross-entropy of `logits` (rows, vocab) against `targets` (rows, 1) and, when
/// `with_grad`, its gradient `softmax − onehot(target)`: one fused row pass on the CPU (the
/// logits are consumed: the gradient overwrites them), candle's ops elsewhere.
pub fn cross_entropy(
    logits: Tensor,
    targets: &Tensor,
    with_grad: bool,
) -> Result<(f64, Option<Tensor>)> {
    if logits.device().is_cpu() {
        fused_cross_entropy(logits, targets, with_grad)
    } else {
        composed_cross_entropy(&logits, targets, with_grad)
    }
}

/// A scalar graph node over `h` whose value is `value` and whose gradient w.r.t. `h` is
/// `grad` times the upstream gradient: a loss whose gradient was formed in the forward.
pub fn precomputed_loss(h: &Tensor, value: f64, grad: Tensor) -> Result<Tensor> {
    h.apply_op1(FusedHeadLoss { value, grad })
}

/// The composed form of [`cross_entropy`]: the summed cross-entropy of `logits` (rows, vocab) against `targets` (rows, 1) and, when
/// `with_grad`, its gradient `softmax − onehot(target)`, from candle's ops (any device).
fn composed_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    with_grad: bool,
) -> Result<(f64, Option<Tensor>)> {
    let max = logits.max_keepdim(1)?;
    let exp = logits.broadcast_sub(&max)?.exp()?;
    let sum_exp = exp.sum_keepdim(1)?;
    let lse = (sum_exp.log()? + max)?;
    let picked = logits.gather(targets, 1)?;
    let loss = (lse - picked)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    if !with_grad {
        return Ok((loss, None));
    }
    let probs = exp.broadcast_div(&sum_exp)?;
    let onehot = targets.broadcast_eq(
        &Tensor::arange(0u32, logits.dim(1)? as u32, logits.device())?.unsqueeze(0)?,
    )?;
    Ok((loss, Some((probs - onehot.to_dtype(logits.dtype())?)?)))
}

/// The same in one row-parallel pass on the CPU (the composed form makes eight over the
/// (rows × vocab) logits); the gradient overwrites the logits, which are consumed.
fn fused_cross_entropy(
    logits: Tensor,
    targets: &Tensor,
    with_grad: bool,
) -> Result<(f64, Option<Tensor>)> {
    let op = SoftmaxCrossEntropy {
        with_grad,
        loss: std::sync::Mutex::new(0.0),
    };
    let logits = logits.contiguous()?;
    logits.inplace_op2(&targets.contiguous()?, &op)?;
    let loss = *op.loss.lock().expect("not poisoned");
    Ok((loss, with_grad.then_some(logits)))
}

/// Row-wise `logsumexp(x) − x[target]` summed into `loss`; with `with_grad`, `x` is
/// overwritten with `softmax(x) − onehot(target)`.
struct SoftmaxCrossEntropy {
    with_grad: bool,
    loss: std::sync::Mutex<f64>,
}

impl SoftmaxCrossEntropy {
    /// In `T`'s precision, as PyTorch's f32 loss (f64 for the gradient checks).
    fn run<T: Real>(&self, x: &mut [T], targets: &[u32], vocab: usize) {
        let losses: Vec<f64> = x
            .par_chunks_mut(vocab)
            .zip(targets.par_iter())
            .map(|(row, &t)| row_cross_entropy(row, t as usize, self.with_grad))
            .collect();
        *self.loss.lock().expect("not poisoned") = losses.iter().sum();
    }
}

with_avx2! {
    /// `logsumexp(x) − x[t]` of one row; with `with_grad`, `x ← softmax(x) − onehot(t)`.
    fn row_cross_entropy<T: Real>(row: &mut [T], t: usize, with_grad: bool) -> f64 = row_cross_entropy_portable
}

#[inline(always)]
fn row_cross_entropy_portable<T: Real>(row: &mut [T], t: usize, with_grad: bool) -> f64 {
    let (max, picked) = (vecmath::max(row), row[t]);
    let sum = if with_grad {
        let sum = vecmath::exp_into_self(row, max);
        let inv = T::one() / sum;
        row.iter_mut().for_each(|v| *v *= inv);
        row[t] -= T::one();
        sum
    } else {
        vecmath::exp_sum(row, max)
    };
    max.to_f64() + sum.to_f64().ln() - picked.to_f64()
}

impl candle_core::InplaceOp2 for SoftmaxCrossEntropy {
    fn name(&self) -> &'static str {
        "softmax-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        xs: &mut CpuStorage,
        xl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<()> {
        let (_, vocab) = xl.shape().dims2()?;
        let targets = slice::<u32>(ts, tl)?;
        let Some((start, end)) = xl.contiguous_offsets() else {
            candle_core::bail!("softmax-cross-entropy: logits must be contiguous")
        };
        match xs {
            CpuStorage::F32(x) => self.run(&mut x[start..end], targets, vocab),
            CpuStorage::F64(x) => self.run(&mut x[start..end], targets, vocab),
            other => candle_core::bail!(
                "softmax-cross-entropy: unsupported dtype {:?}",
                other.dtype()
            ),
        }
        Ok(())
    }
}

/// The loss as a graph node over the hidden rows: its value and its gradient were computed
/// in the chunked pass; backward scales that gradient by the upstream one.
struct FusedHeadLoss {
    value: f64,
    grad: Tensor,
}

impl CustomOp1 for FusedHeadLoss {
    fn name(&self) -> &'static str {
        "fused-head-cross-entropy"
    }

    fn cpu_fwd(&self, h: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let value = match h {
            CpuStorage::F64(_) => CpuStorage::F64(vec![self.value]),
            _ => CpuStorage::F32(vec![self.value as f32]),
        };
        Ok((value, Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        h: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let value = crate::kernels::cuda::scalar(h.device(), self.value, h.dtype())?;
        Ok((value, Shape::from(())))
    }

    fn bwd(&self, _h: &Tensor, _loss: &Tensor, grad_loss: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            self.grad
                .broadcast_mul(&grad_loss.to_dtype(self.grad.dtype())?)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused CPU pass and the composed form (the GPU path) agree on loss and gradient.
    #[test]
    fn fused_cross_entropy_equals_the_composed_form() {
        let dev = Device::Cpu;
        let logits = (Tensor::randn(0f32, 3.0, (5, 1000), &dev).unwrap())
            .contiguous()
            .unwrap();
        let targets = Tensor::new(&[[3u32], [999], [0], [17], [3]], &dev).unwrap();
        let (lf, gf) = fused_cross_entropy(logits.copy().unwrap(), &targets, true).unwrap();
        let (lc, gc) = composed_cross_entropy(&logits, &targets, true).unwrap();
        assert!((lf - lc).abs() < 1e-4 * lc.abs(), "{lf} vs {lc}");
        let diff = (gf.unwrap() - gc.unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        let (l_eval, none) = fused_cross_entropy(logits, &targets, false).unwrap();
        assert!(none.is_none() && (l_eval - lf).abs() < 1e-9 * lf.abs());
    }
}
