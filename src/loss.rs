//! Causal-LM cross-entropy over label tokens, as transformers computes it: the logits at
//! position t−1 predict `labels[t]`, and positions labelled −100 never count.

use crate::adapters::Ctx;
use crate::data::batch::Batch;
use crate::model::Llama;
use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var, D};

/// The summed token loss of a batch (a scalar tensor that back-propagates) and how many label
/// tokens it covers. Only the rows that predict a label go through the vocabulary head: the
/// same numbers as projecting every position, without the wasted work.
pub fn summed_loss(model: &Llama, batch: &Batch, ctx: &Ctx) -> Result<(Tensor, usize)> {
    let (rows, targets) = batch.prediction_rows();
    let device = model.device();
    let hidden = model.hidden(&batch.input_ids(device)?, ctx)?;
    let d = hidden.dim(D::Minus1)?;
    let n = rows.len();
    let rows = Tensor::from_vec(rows, n, device)?;
    let selected = hidden.reshape(((), d))?.index_select(&rows, 0)?;
    // transformers upcasts logits to f32 for the loss; f64 models (gradient checks) stay f64.
    let loss_dtype = if model.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let logits = model.head(&selected)?.to_dtype(loss_dtype)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let targets = Tensor::from_vec(targets, (n, 1), device)?;
    let picked = log_probs.gather(&targets, 1)?;
    Ok((picked.sum_all()?.neg()?, n))
}

/// One optimizer step over its micro-batches: the mean loss over all their label tokens, that
/// count, and the gradients of that mean. Each micro-batch back-propagates its summed loss
/// divided by the step's label-token count, so the accumulated gradient is the one of the whole
/// step as a single batch while only one micro-batch's activations are alive at a time.
pub fn step_loss_and_grads(
    model: &Llama,
    micro_batches: &[Batch],
    ctx: &Ctx,
    vars: &[Var],
) -> Result<(f64, usize, GradStore)> {
    let count: usize = micro_batches.iter().map(Batch::label_tokens).sum();
    let mut loss = 0f64;
    let mut total: Option<GradStore> = None;
    for batch in micro_batches {
        let (sum, _) = summed_loss(model, batch, ctx)?;
        let part = (sum / count as f64)?;
        loss += part.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let grads = part.backward()?;
        total = Some(match total {
            None => grads,
            Some(mut acc) => {
                for v in vars {
                    if let Some(g) = grads.get(v.as_tensor()) {
                        let sum = match acc.get(v.as_tensor()) {
                            Some(a) => (a + g)?,
                            None => g.clone(),
                        };
                        acc.insert(v.as_tensor(), sum);
                    }
                }
                acc
            }
        });
    }
    Ok((
        loss,
        count,
        total.expect("a step has at least one micro-batch"),
    ))
}
