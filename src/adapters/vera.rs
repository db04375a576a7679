//! VeRA, as PEFT's `VeraModel`: one frozen random pair `vera_A (r × max_in)`,
//! `vera_B (max_out × r)` for the whole model, sliced per layer, and trainable per-layer
//! vectors: `Δ(x) = λ_b ⊙ ((λ_d ⊙ (dropout(x) A_sliceᵀ)) B_sliceᵀ)`. No α/r scaling.

use super::{adapter_input, uniform_var, Adapter, AdapterConfig, Ctx, Parts, SharedTensor, Target};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use std::rc::Rc;

/// PEFT's keys of the shared projections.
pub const VERA_A: &str = "base_model.vera_A";
pub const VERA_B: &str = "base_model.vera_B";

pub struct Vera {
    /// The shared frozen projections (full size).
    vera_a: Var,
    vera_b: Var,
    /// (r)
    lambda_d: Var,
    /// (out)
    lambda_b: Var,
    in_features: usize,
    out_features: usize,
    dropout: f64,
}

impl Vera {
    /// `A_slice (r, in)`, `B_slice (out, r)`, detached: the projections never train.
    fn slices(&self) -> candle_core::Result<(Tensor, Tensor)> {
        let a = self.vera_a.as_tensor().detach();
        let b = self.vera_b.as_tensor().detach();
        Ok((
            a.narrow(1, 0, self.in_features)?.contiguous()?,
            b.narrow(0, 0, self.out_features)?.contiguous()?,
        ))
    }
}

impl Adapter for Vera {
    fn delta(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let out_dtype = x.dtype();
        let x = adapter_input(x, self.lambda_d.dtype(), self.dropout, ctx)?;
        let (a, b) = self.slices()?;
        let down = x.matmul(&a.t()?)?.broadcast_mul(&self.lambda_d)?;
        down.matmul(&b.t()?)?
            .broadcast_mul(&self.lambda_b)?
            .to_dtype(out_dtype)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![
            ("vera_lambda_b".into(), self.lambda_b.clone()),
            ("vera_lambda_d".into(), self.lambda_d.clone()),
        ]
    }

    /// `A = diag(λ_d) A_slice`, `B = diag(λ_b) B_slice`, scaling 1.
    fn lora_factors(&self) -> candle_core::Result<(Tensor, Tensor, f64)> {
        let (a, b) = self.slices()?;
        Ok((
            a.broadcast_mul(&self.lambda_d.unsqueeze(1)?)?,
            b.broadcast_mul(&self.lambda_b.unsqueeze(1)?)?,
            1.0,
        ))
    }
}

/// The projections `U(±√(6/fan_in))` of their own shapes (PEFT's `_kaiming_init`), A first;
/// `λ_d = d_initial` (0.1), `λ_b = 0`.
pub fn build(
    cfg: &AdapterConfig,
    targets: &[Target],
    dtype: DType,
    device: &Device,
    rng: &mut StdRng,
) -> candle_core::Result<Parts> {
    let r = cfg.rank;
    let max_in = targets.iter().map(|t| t.in_features).max().unwrap_or(0);
    let max_out = targets.iter().map(|t| t.out_features).max().unwrap_or(0);
    let bound = |fan_in: usize| (6.0 / fan_in as f64).sqrt();
    let vera_a = uniform_var((r, max_in), bound(max_in), dtype, device, rng)?;
    let vera_b = uniform_var((max_out, r), bound(r), dtype, device, rng)?;
    let d_initial = cfg.d_initial.unwrap_or(0.1);
    let adapters = targets
        .iter()
        .map(|t| {
            let vera = Vera {
                vera_a: vera_a.clone(),
                vera_b: vera_b.clone(),
                lambda_d: Var::from_tensor(&(Tensor::ones(r, dtype, device)? * d_initial)?)?,
                lambda_b: Var::zeros(t.out_features, dtype, device)?,
                in_features: t.in_features,
                out_features: t.out_features,
                dropout: cfg.dropout,
            };
            Ok(Rc::new(vera) as Rc<dyn Adapter>)
        })
        .collect::<candle_core::Result<_>>()?;
    let frozen = |key: &str, var: Var| SharedTensor {
        key: key.into(),
        var,
        trainable: false,
    };
    Ok(Parts {
        adapters,
        shared: vec![frozen(VERA_A, vera_a), frozen(VERA_B, vera_b)],
    })
}

/// `r + out` per adapted linear (the projections are frozen).
pub fn count(cfg: &AdapterConfig, targets: &[Target]) -> usize {
    targets.iter().map(|t| cfg.rank + t.out_features).sum()
}
