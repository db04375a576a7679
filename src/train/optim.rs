//! Paged AdamW with 32-bit state (PyTorch's `AdamW` numerics) and global-norm clipping.
//!
//! "Paged": the moments never live on the compute device. They sit in host memory in fixed-size
//! pages; each update brings one parameter's gradient and values through a host staging buffer,
//! updates page by page and writes the parameter back. Device memory for optimizer state is
//! therefore zero, whatever the adapter size; on the CPU the staging is the only copy. The state
//! is plain `f32` we own, so checkpoints save and restore it exactly.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

/// Elements per state page (256 KiB of f32).
pub const PAGE: usize = 1 << 16;

#[derive(Clone, Debug)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One parameter's place in the paged state.
struct Slot {
    name: String,
    var: Var,
    /// Multiplies the scheduled learning rate (parameter groups with their own lr).
    lr_scale: f64,
    /// First element in the flat state.
    offset: usize,
    len: usize,
}

pub struct AdamW {
    params: AdamWParams,
    slots: Vec<Slot>,
    /// First and second moments, `PAGE` elements per page (the last one may be shorter).
    exp_avg: Vec<Vec<f32>>,
    exp_avg_sq: Vec<Vec<f32>>,
    /// Updates taken (t of the bias correction).
    step: u64,
}

fn pages(total: usize) -> Vec<Vec<f32>> {
    (0..total.div_ceil(PAGE))
        .map(|p| vec![0f32; PAGE.min(total - p * PAGE)])
        .collect()
}

impl AdamW {
    /// Named parameters with the multiplier of their group's learning rate (1 for one group).
    pub fn new(named_vars: Vec<(String, Var, f64)>, params: AdamWParams) -> Self {
        let mut offset = 0;
        let slots: Vec<Slot> = named_vars
            .into_iter()
            .map(|(name, var, lr_scale)| {
                let len = var.elem_count();
                let slot = Slot {
                    name,
                    var,
                    lr_scale,
                    offset,
                    len,
                };
                offset += len;
                slot
            })
            .collect();
        Self {
            params,
            slots,
            exp_avg: pages(offset),
            exp_avg_sq: pages(offset),
            step: 0,
        }
    }

    /// Updates taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One update at learning rate `lr` from `grads` (aligned with the parameters, `None` = no
    /// gradient: left unchanged), each multiplied by `grad_scale` (the clipping factor).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let AdamWParams {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        // PyTorch's single-tensor AdamW, op for op: f64 scalars, f32 element math.
        let bc1 = 1.0 - beta1.powi(self.step as i32);
        let bc2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt() as f32;
        let (b1, b2, eps) = ((1.0 - beta1) as f32, beta2 as f32, eps as f32);
        let one_minus_b2 = (1.0 - beta2) as f32;
        let scale = grad_scale as f32;
        for (slot, grad) in self.slots.iter().zip(grads) {
            let Some(grad) = grad else { continue };
            let lr = lr * slot.lr_scale;
            let step_size = (lr / bc1) as f32;
            let decay = (1.0 - lr * weight_decay) as f32;
            let dtype = slot.var.dtype();
            let g: Vec<f32> = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let mut p: Vec<f32> = slot.var.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let mut done = 0;
            while done < slot.len {
                let flat = slot.offset + done;
                let (page, start) = (flat / PAGE, flat % PAGE);
                let n = (PAGE - start).min(slot.len - done);
                let m = &mut self.exp_avg[page][start..start + n];
                let v = &mut self.exp_avg_sq[page][start..start + n];
                let p = &mut p[done..done + n];
                let g = &g[done..done + n];
                for i in 0..n {
                    let gi = g[i] * scale;
                    p[i] *= decay;
                    m[i] += b1 * (gi - m[i]);
                    v[i] = v[i] * b2 + one_minus_b2 * gi * gi;
                    let denom = v[i].sqrt() / bc2_sqrt + eps;
                    p[i] -= step_size * (m[i] / denom);
                }
                done += n;
            }
            let updated =
                Tensor::from_vec(p, slot.var.shape(), slot.var.device())?.to_dtype(dtype)?;
            slot.var.set(&updated)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`{param}.exp_avg`, `{param}.exp_avg_sq`) for a checkpoint.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for slot in &self.slots {
            for (suffix, pages) in [("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq)] {
                let flat = gather(pages, slot.offset, slot.len);
                let t = Tensor::from_vec(flat, slot.var.shape(), &candle_core::Device::Cpu)?;
                out.insert(format!("{}.{suffix}", slot.name), t);
            }
        }
        Ok(out)
    }

    /// Restores moments saved by `state_tensors` and the update count.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        steps_taken: u64,
    ) -> Result<()> {
        for slot in &self.slots {
            for (suffix, is_sq) in [("exp_avg", false), ("exp_avg_sq", true)] {
                let key = format!("{}.{suffix}", slot.name);
                let Some(t) = tensors.get(&key) else {
                    bail!("optimizer state has no tensor {key}");
                };
                if t.elem_count() != slot.len {
                    bail!(
                        "optimizer state {key} has {} elements, the parameter {}",
                        t.elem_count(),
                        slot.len
                    );
                }
                let flat: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let pages = if is_sq {
                    &mut self.exp_avg_sq
                } else {
                    &mut self.exp_avg
                };
                scatter(pages, slot.offset, &flat);
            }
        }
        self.step = steps_taken;
        Ok(())
    }
}

fn gather(pages: &[Vec<f32>], offset: usize, len: usize) -> Vec<f32> {
    (offset..offset + len)
        .map(|i| pages[i / PAGE][i % PAGE])
        .collect()
}

fn scatter(pages: &mut [Vec<f32>], offset: usize, values: &[f32]) {
    for (k, v) in values.iter().enumerate() {
        let i = offset + k;
        pages[i / PAGE][i % PAGE] = *v;
    }
}

/// The global L2 norm of `grads` and the factor that clips it to `max_norm`, as PyTorch's
/// `clip_grad_norm_`: `min(1, max_norm / (norm + 1e-6))` (no clipping when `max_norm` ≤ 0).
pub fn clip_factor(grads: &[Option<Tensor>], max_norm: f64) -> Result<(f64, f64)> {
    let mut sum_sq = 0f64;
    for g in grads.iter().flatten() {
        sum_sq += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    let norm = sum_sq.sqrt();
    let factor = if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    };
    Ok((norm, factor))
}
