//! Causal-LM cross-entropy over label tokens, as transformers computes it: the logits at
//! position t−1 predict `labels[t]`, and positions labelled −100 never count.
//!
//! The vocabulary head and the loss are fused and chunked: only the rows that predict a label
//! go through the head, a few at a time, and the gradient w.r.t. those hidden rows is formed in
//! the same pass. The (rows × vocab) logits — 65 MB for a 4 × 128 batch of LLaMA-2 — never exist
//! at once, and backward costs one multiply. Same numbers as projecting every position.

use crate::adapters::Ctx;
use crate::data::batch::Batch;
use crate::model::ops::slice;
use crate::model::vecmath::{self, with_avx2, Real};
use crate::model::Llama;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Rows of the head computed together: bounds the logits temporary (≈ 33 MB for vocab 32000
/// on the CPU, where fewer rows make the GEMMs slower; 128 MB on a GPU).
fn chunk_rows(device: &Device) -> usize {
    if device.is_cpu() {
        256
    } else {
        1024
    }
}

/// The summed token loss of a batch (a scalar tensor that back-propagates when `with_grad`)
/// and how many label tokens it covers.
pub fn summed_loss(
    model: &Llama,
    batch: &Batch,
    ctx: &Ctx,
    with_grad: bool,
) -> Result<(Tensor, usize)> {
    let hidden = model.hidden(&batch.input_ids(model.device())?, ctx)?;
    summed_loss_of_hidden(model, &hidden, batch, with_grad)
}

/// The same from the normalised last hidden states (b, t, d).
pub fn summed_loss_of_hidden(
    model: &Llama,
    hidden: &Tensor,
    batch: &Batch,
    with_grad: bool,
) -> Result<(Tensor, usize)> {
    let (rows, targets) = batch.prediction_rows();
    let device = model.device();
    let d = hidden.dim(D::Minus1)?;
    let n = rows.len();
    let rows = Tensor::from_vec(rows, n, device)?;
    let selected = hidden.reshape(((), d))?.index_select(&rows, 0)?;
    let targets = Tensor::from_vec(targets, (n, 1), device)?;
    Ok((
        head_cross_entropy(model, &selected, &targets, with_grad)?,
        n,
    ))
}

/// `Σ_rows [logsumexp(h Wᵀ) − (h Wᵀ)[target]]` for hidden rows `h` (n, d) and targets (n, 1).
fn head_cross_entropy(
    model: &Llama,
    h: &Tensor,
    targets: &Tensor,
    with_grad: bool,
) -> Result<Tensor> {
    // transformers computes the loss in f32; f64 models (gradient checks) stay f64.
    let dtype = if model.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let w = model.head_weight().to_dtype(dtype)?;
    let hd = h.detach().to_dtype(dtype)?;
    let n = hd.dim(0)?;
    let mut total = 0f64;
    let mut grads = Vec::new();
    let chunk = chunk_rows(model.device());
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let tc = targets.narrow(0, start, len)?;
        let logits = hd.narrow(0, start, len)?.matmul(&w.t()?)?;
        let (loss, d_logits) = if logits.device().is_cpu() {
            fused_cross_entropy(logits, &tc, with_grad)?
        } else {
            composed_cross_entropy(&logits, &tc, with_grad)?
        };
        total += loss;
        if let Some(d) = d_logits {
            // ∂/∂h of the chunk's loss: (softmax − onehot(target)) W.
            grads.push(d.matmul(&w)?);
        }
    }
    if !with_grad {
        return Tensor::new(total, model.device())?.to_dtype(dtype);
    }
    let grad = Tensor::cat(&grads, 0)?.to_dtype(h.dtype())?;
    h.apply_op1(FusedHeadLoss { value: total, grad })
}

/// The summed cross-entropy of `logits` (rows, vocab) against `targets` (rows, 1) and, when
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
        let value = crate::cuda::scalar(h.device(), self.value, h.dtype())?;
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
