//! Causal-LM cross-entropy over label tokens, as transformers computes it: the logits at
//! position t−1 predict `labels[t]`, and positions labelled −100 never count.

use crate::adapters::Ctx;
use crate::data::batch::Batch;
use crate::model::Llama;
use candle_core::{DType, Result, Tensor, D};

/// The summed token loss of a batch (a scalar tensor that back-propagates) and how many label
/// tokens it covers.
pub fn summed_loss(model: &Llama, batch: &Batch, ctx: &Ctx) -> Result<(Tensor, usize)> {
    let hidden = model.hidden(&batch.input_ids(model.device())?, ctx)?;
    summed_loss_of_hidden(model, &hidden, batch)
}

/// The same from the normalised last hidden states (b, t, d). Only the rows that predict a
/// label go through the vocabulary head: the same numbers as projecting every position,
/// without the wasted work.
pub fn summed_loss_of_hidden(
    model: &Llama,
    hidden: &Tensor,
    batch: &Batch,
) -> Result<(Tensor, usize)> {
    let (rows, targets) = batch.prediction_rows();
    let device = model.device();
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
