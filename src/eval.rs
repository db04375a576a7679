//! Mean token cross-entropy over every label token of a dataset.

use crate::ctx::Ctx;
use crate::data::batch::in_order;
use crate::data::chat::Encoded;
use crate::loss::summed_loss;
use crate::model::Llama;
use anyhow::Result;
use candle_core::DType;

/// (sum of token losses / number of label tokens, number of label tokens), dropout off.
pub fn evaluate(model: &Llama, examples: &[Encoded], batch_size: usize) -> Result<(f64, usize)> {
    let ctx = Ctx::eval();
    let mut total = 0f64;
    let mut tokens = 0usize;
    for batch in in_order(examples, batch_size) {
        let (sum, n) = summed_loss(model, &batch, &ctx, false)?;
        total += sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        tokens += n;
    }
    Ok((total / tokens.max(1) as f64, tokens))
}
