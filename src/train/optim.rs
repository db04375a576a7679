//! AdamW with 32-bit state (PyTorch / bitsandbytes numerics) and global-norm clipping.
//! The moments are plain tensors we own, so a checkpoint can save and restore them.

use candle_core::{backprop::GradStore, Result, Tensor, Var};

#[derive(Clone, Debug)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

struct Slot {
    var: Var,
    /// Multiplies the scheduled learning rate (parameter groups with their own lr).
    lr_scale: f64,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    slots: Vec<Slot>,
    params: AdamWParams,
    /// Steps taken (t of the bias correction).
    step: usize,
}

impl AdamW {
    /// `vars` with the multiplier of their group's learning rate (1 for a single group).
    pub fn new(vars: Vec<(Var, f64)>, params: AdamWParams) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(var, lr_scale)| {
                Ok(Slot {
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                    var,
                    lr_scale,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            params,
            step: 0,
        })
    }

    /// One update at learning rate `lr`, from the gradients in `grads` (scaled by `grad_scale`,
    /// the clipping factor). A parameter without a gradient is left as it is.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let AdamWParams {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        let t = self.step as i32;
        let bc1 = 1.0 - beta1.powi(t);
        let bc2 = 1.0 - beta2.powi(t);
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let lr = lr * slot.lr_scale;
            let g = (g * grad_scale)?;
            slot.m = ((&slot.m * beta1)? + (&g * (1.0 - beta1))?)?;
            slot.v = ((&slot.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            // PyTorch's order: decoupled decay first, then the Adam step.
            let p = (slot.var.as_tensor() * (1.0 - lr * weight_decay))?;
            let denom = ((&slot.v / bc2)?.sqrt()? + eps)?;
            let update = ((&slot.m / bc1)? / denom)?;
            slot.var.set(&(p - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// The global L2 norm of all gradients of `vars` and the factor that clips it to `max_norm`,
/// as PyTorch's `clip_grad_norm_`: `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_factor(grads: &GradStore, vars: &[Var], max_norm: f64) -> Result<(f64, f64)> {
    let mut sum_sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sum_sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sum_sq.sqrt();
    let factor = if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    };
    Ok((norm, factor))
}
