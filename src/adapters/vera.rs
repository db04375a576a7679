//! VeRA, as PEFT's `VeraModel`: one frozen random pair `vera_A (r × max_in)`,
//! `vera_B (max_out × r)` for the whole model, sliced per layer, and trainable per-layer
//! vectors: `Δ(x) = λ_b ⊙ ((λ_d ⊙ (dropout(x) A_sliceᵀ)) B_sliceᵀ)`. No α/r scaling.

use super::method::{options_from_toml, Method, PeftKeys, PeftRead, Registration};
use super::{adapter_input, uniform_var, Adapter, AdapterConfig, Param, Parts, Role, Target};
use crate::ctx::Ctx;
use crate::model::config::BLOCK_LINEARS;
use crate::model::llama::Delta;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::rc::Rc;

pub const REGISTRATION: Registration = Registration {
    kind: "vera",
    peft_type: "VERA",
    from_toml: options_from_toml::<VeraConfig>,
    from_peft: VeraConfig::from_peft,
    default_targets: &BLOCK_LINEARS,
};

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

/// VeRA's options (`[adapter]` keys with `kind = "vera"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VeraConfig {
    /// Initial value of every λ_d (PEFT's `d_initial`).
    pub d_initial: f64,
}

impl Default for VeraConfig {
    fn default() -> Self {
        Self { d_initial: 0.1 }
    }
}

impl VeraConfig {
    fn from_peft(keys: &PeftKeys) -> Result<PeftRead> {
        if !keys.or("save_projection", true)? {
            bail!(
                "a VeRA adapter saved without its projections (save_projection: false) cannot be \
                 read: PEFT regenerates them with torch's PRNG; re-save it with save_projection=True"
            );
        }
        Ok(PeftRead {
            method: Box::new(VeraConfig {
                d_initial: keys.or("d_initial", Self::default().d_initial)?,
            }),
            alpha: None,
            dropout: keys.or("vera_dropout", 0.0)?,
        })
    }
}

impl Method for VeraConfig {
    fn registration(&self) -> &'static Registration {
        &REGISTRATION
    }

    fn rank_bounded_by_shape(&self) -> bool {
        false
    }

    fn validate(&self, _cfg: &AdapterConfig) -> Result<()> {
        if !self.d_initial.is_finite() {
            bail!("adapter.d_initial must be a finite number");
        }
        Ok(())
    }

    /// `r + out` per adapted linear (the projections are frozen).
    fn trainable_count(&self, cfg: &AdapterConfig, targets: &[Target]) -> usize {
        targets.iter().map(|t| cfg.rank + t.out_features).sum()
    }

    /// The projections `U(±√(6/fan_in))` of their own shapes (PEFT's `_kaiming_init`), A
    /// first; `λ_d = d_initial`, `λ_b = 0`.
    fn build(
        &self,
        cfg: &AdapterConfig,
        targets: &[Target],
        dtype: DType,
        device: &Device,
        rng: &mut StdRng,
    ) -> Result<Parts> {
        let r = cfg.rank;
        let max_in = targets.iter().map(|t| t.in_features).max().unwrap_or(0);
        let max_out = targets.iter().map(|t| t.out_features).max().unwrap_or(0);
        let bound = |fan_in: usize| (6.0 / fan_in as f64).sqrt();
        let vera_a = uniform_var((r, max_in), bound(max_in), dtype, device, rng)?;
        let vera_b = uniform_var((max_out, r), bound(r), dtype, device, rng)?;
        let adapters = targets
            .iter()
            .map(|t| {
                let vera = Vera {
                    vera_a: vera_a.clone(),
                    vera_b: vera_b.clone(),
                    lambda_d: Var::from_tensor(
                        &(Tensor::ones(r, dtype, device)? * self.d_initial)?,
                    )?,
                    lambda_b: Var::zeros(t.out_features, dtype, device)?,
                    in_features: t.in_features,
                    out_features: t.out_features,
                    dropout: cfg.dropout,
                };
                Ok(Rc::new(vera) as Rc<dyn Adapter>)
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Parts {
            adapters,
            shared: vec![
                Param::new(VERA_A, &vera_a, Role::Frozen),
                Param::new(VERA_B, &vera_b, Role::Frozen),
            ],
        })
    }

    fn peft_keys(&self, cfg: &AdapterConfig) -> Value {
        json!({
            "vera_dropout": cfg.dropout,
            "d_initial": self.d_initial,
            "save_projection": true,
            // PEFT regenerates the projections from this key only with torch's PRNG; ours are
            // saved instead (save_projection), so the key is informational.
            "projection_prng_key": 0,
        })
    }
}

impl Delta for Vera {
    fn delta(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let out_dtype = x.dtype();
        let x = adapter_input(x, self.lambda_d.dtype(), self.dropout, ctx)?;
        let (a, b) = self.slices()?;
        let down = x.matmul(&a.t()?)?.broadcast_mul(&self.lambda_d)?;
        down.matmul(&b.t()?)?
            .broadcast_mul(&self.lambda_b)?
            .to_dtype(out_dtype)
    }
}

impl Adapter for Vera {
    fn params(&self) -> Vec<Param> {
        vec![
            Param::new("vera_lambda_b", &self.lambda_b, Role::TRAINED),
            Param::new("vera_lambda_d", &self.lambda_d, Role::TRAINED),
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
