//! Causal-LM cross-entropy over label tokens, as transformers computes it: the logits at
//! position t−1 predict `labels[t]`, and positions labelled −100 never count.
//!
//! The vocabulary head and the loss are fused and chunked: only the rows that predict a label
//! go through the head, a few at a time, and the gradient w.r.t. those hidden rows is formed in
//! the same pass. The (rows × vocab) logits — 65 MB for a 4 × 128 batch of LLaMA-2 — never exist
//! at once, and backward costs one multiply. Same numbers as projecting every position.

use crate::adapters::Ctx;
use crate::data::batch::Batch;
use crate::model::Llama;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, D};

/// Rows of the head computed together: bounds the logits temporary (≈ 8 MB for vocab 32000
/// on the CPU, where small chunks stay in cache; 128 MB on a GPU, where they fill it).
fn chunk_rows(device: &Device) -> usize {
    if device.is_cpu() {
        64
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
        let max = logits.max_keepdim(1)?;
        let exp = logits.broadcast_sub(&max)?.exp()?;
        let sum_exp = exp.sum_keepdim(1)?;
        let lse = (sum_exp.log()? + max)?;
        let picked = logits.gather(&tc, 1)?;
        total += (lse - picked)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        if with_grad {
            // ∂/∂h of the chunk's loss: (softmax − onehot(target)) W.
            let probs = exp.broadcast_div(&sum_exp)?;
            grads.push((probs.matmul(&w)? - w.index_select(&tc.flatten_all()?, 0)?)?);
        }
    }
    if !with_grad {
        return Tensor::new(total, model.device())?.to_dtype(dtype);
    }
    let grad = Tensor::cat(&grads, 0)?.to_dtype(h.dtype())?;
    h.apply_op1(FusedHeadLoss { value: total, grad })
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
