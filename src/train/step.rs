//! Gradients of one micro-batch: through the whole graph, or with activation checkpointing
//! (keep only each layer's input; in backward recompute one layer at a time and
//! back-propagate `sum(out · upstream_grad)`), which gives exactly the same gradients.

use crate::ctx::Ctx;
use crate::data::batch::Batch;
use crate::loss::{packing_of, summed_loss, summed_loss_of_hidden};
use crate::model::Llama;
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// Gradients aligned with the trainable parameters; `None` where a parameter got none.
pub type Grads = Vec<Option<Tensor>>;

/// Adds the gradients of `vars` found in `store` into `acc`.
fn accumulate(acc: &mut Grads, store: &GradStore, vars: &[Var]) -> Result<()> {
    for (slot, var) in acc.iter_mut().zip(vars) {
        if let Some(g) = store.get(var.as_tensor()) {
            *slot = Some(match slot.take() {
                Some(sum) => (sum + g)?,
                None => g.clone(),
            });
        }
    }
    Ok(())
}

/// Back-propagates `summed loss / divisor` of `batch` into `acc`; returns the summed loss (f64)
/// and the number of label tokens.
pub fn accumulate_grads(
    model: &Llama,
    batch: &Batch,
    ctx: &Ctx,
    vars: &[Var],
    divisor: f64,
    checkpointing: bool,
    acc: &mut Grads,
) -> Result<(f64, usize)> {
    let (sum, n) = if checkpointing {
        checkpointed(model, batch, ctx, vars, divisor, acc)?
    } else {
        let (sum, n) = summed_loss(model, batch, ctx, true)?;
        accumulate(acc, &(&sum / divisor)?.backward()?, vars)?;
        (sum, n)
    };
    Ok((sum.to_dtype(DType::F64)?.to_scalar::<f64>()?, n))
}

fn checkpointed(
    model: &Llama,
    batch: &Batch,
    ctx: &Ctx,
    vars: &[Var],
    divisor: f64,
    acc: &mut Grads,
) -> Result<(Tensor, usize)> {
    let ids = batch.input_ids(model.device())?;
    let packing = packing_of(batch, model.device())?;
    let layers = model.num_layers();
    // Forward keeping only each layer's input; the last output becomes a leaf, so the head's
    // backward stops there with the gradient the layers need.
    let mut inputs = Vec::with_capacity(layers);
    let mut last = None;
    let hidden = model.hidden_with(&ids, packing.as_ref(), ctx, |l, out, input| {
        inputs.push(input);
        if l + 1 < layers {
            return Ok(out.detach());
        }
        let leaf = Var::from_tensor(&out.detach())?;
        let x = leaf.as_tensor().clone();
        last = Some(leaf);
        Ok(x)
    })?;
    let last = last.context("the model has no layers")?;
    let (sum, n) = summed_loss_of_hidden(model, &hidden, batch, packing.as_ref(), true)?;
    let store = (&sum / divisor)?.backward()?;
    let mut upstream = store
        .get(last.as_tensor())
        .context("no gradient reached the last hidden state")?
        .clone();
    drop(store);
    let rope = model.rope(ids.dim(1)?)?;
    // Layers in reverse, each recomputed from its saved input.
    for l in (0..model.num_layers()).rev() {
        // The embedding output needs no gradient: layer 0 keeps a plain input.
        let input = if l > 0 {
            Some(Var::from_tensor(&inputs[l])?)
        } else {
            None
        };
        let x = input.as_ref().map_or(&inputs[l], |v| v.as_tensor());
        let out = model.block(l, x, &rope, &ctx.for_layer(l), packing.as_ref())?;
        let store = (out * &upstream)?.sum_all()?.backward()?;
        accumulate(acc, &store, vars)?;
        if let Some(v) = &input {
            upstream = store
                .get(v.as_tensor())
                .with_context(|| format!("no gradient reached the input of layer {l}"))?
                .clone();
        }
    }
    Ok((sum, n))
}
