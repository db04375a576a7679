//! Causal-LM cross-entropy over label tokens, as transformers computes it: the logits at
//! position t−1 predict `labels[t]`, and positions labelled −100 never count.
//!
//! The vocabulary head and the loss are fused and chunked: only the rows that predict a label
//! go through the head, a few at a time, and the gradient w.r.t. those hidden rows is formed in
//! the same pass. The (rows × vocab) logits — 65 MB for a 4 × 128 batch of LLaMA-2 — never exist
//! at once, and backward costs one multiply. Same numbers as projecting every position.

use crate::ctx::Ctx;
use crate::data::batch::Batch;
use crate::kernels::cross_entropy::{cross_entropy, precomputed_loss};
use crate::model::packing::Packing;
use crate::model::Llama;
use candle_core::{DType, Device, Result, Tensor, D};

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
    let ids = batch.input_ids(model.device())?;
    let packing = packing_of(batch, model.device())?;
    let hidden = model.hidden_with(&ids, packing.as_ref(), ctx, |_, x, _| Ok(x))?;
    summed_loss_of_hidden(model, &hidden, batch, packing.as_ref(), with_grad)
}

/// The packing of `batch`'s padding (None where it has none): the model then computes the
/// real tokens alone.
pub fn packing_of(batch: &Batch, device: &Device) -> Result<Option<Packing>> {
    let len = batch.lengths().iter().copied().max().unwrap_or(0);
    Packing::new(batch.lengths(), len, device)
}

/// The same from the normalised last hidden states (b, t, d), or the real rows (n, d) of
/// `packing`.
pub fn summed_loss_of_hidden(
    model: &Llama,
    hidden: &Tensor,
    batch: &Batch,
    packing: Option<&Packing>,
    with_grad: bool,
) -> Result<(Tensor, usize)> {
    let (rows, targets) = batch.prediction_rows();
    let rows = match packing {
        Some(p) => p.packed_rows(&rows),
        None => rows,
    };
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
        let (loss, d_logits) = cross_entropy(logits, &tc, with_grad)?;
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
    precomputed_loss(h, total, grad)
}
