//! LoRA, as PEFT's `LoraLayer`: `Δ(x) = α/r · (dropout(x) Aᵀ) Bᵀ`.

use super::method::{lora_keys_and, options_from_toml, Method, PeftKeys, PeftRead, Registration};
use super::{adapter_input, uniform_var, Adapter, AdapterConfig, Param, Parts, Role, Target};
use crate::ctx::Ctx;
use crate::model::config::BLOCK_LINEARS;
use crate::model::llama::Delta;
use crate::model::lora_linear::PlainLora;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::rc::Rc;

pub const REGISTRATION: Registration = Registration {
    kind: "lora",
    peft_type: "LORA",
    from_toml: options_from_toml::<LoraConfig>,
    from_peft: LoraConfig::from_peft,
    default_targets: &BLOCK_LINEARS,
};

/// LoRA has no options beyond the shared keys.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {}

impl LoraConfig {
    /// PEFT's LoRA keys. Variants that change the math and are not implemented here are
    /// refused; every optional key absent or `null` takes PEFT's default.
    fn from_peft(keys: &PeftKeys) -> Result<PeftRead> {
        for flag in ["use_rslora", "use_dora"] {
            if keys.or(flag, false)? {
                bail!("\"{flag}\": true is not supported");
            }
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            let pattern: Map<String, Value> = keys.or(key, Map::new())?;
            if !pattern.is_empty() {
                bail!("a non-empty \"{key}\" is not supported");
            }
        }
        PeftRead::with_lora_keys(keys, Box::new(LoraConfig {}))
    }
}

impl Method for LoraConfig {
    fn registration(&self) -> &'static Registration {
        &REGISTRATION
    }

    fn validate(&self, _cfg: &AdapterConfig) -> Result<()> {
        Ok(())
    }

    /// `r · (in + out)` per adapted linear.
    fn trainable_count(&self, cfg: &AdapterConfig, targets: &[Target]) -> usize {
        targets
            .iter()
            .map(|t| cfg.rank * (t.in_features + t.out_features))
            .sum()
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        targets: &[Target],
        dtype: DType,
        device: &Device,
        rng: &mut StdRng,
    ) -> Result<Parts> {
        let adapters = targets
            .iter()
            .map(|t| {
                let lora = Lora::init(
                    t.in_features,
                    t.out_features,
                    cfg.rank,
                    cfg.alpha,
                    cfg.dropout,
                    dtype,
                    device,
                    rng,
                )?;
                Ok(Rc::new(lora) as Rc<dyn Adapter>)
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Parts {
            adapters,
            shared: Vec::new(),
        })
    }

    fn peft_keys(&self, cfg: &AdapterConfig) -> Value {
        lora_keys_and(
            cfg,
            json!({
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "rank_pattern": {},
            "alpha_pattern": {},
            }),
        )
    }
}

pub struct Lora {
    /// (r, in)
    a: Var,
    /// (out, r)
    b: Var,
    scaling: f64,
    dropout: f64,
}

impl Lora {
    /// PEFT's init: `A ~ U(−1/√in, 1/√in)` (kaiming_uniform with a = √5), `B = 0`.
    #[allow(clippy::too_many_arguments)]
    pub fn init(
        in_features: usize,
        out_features: usize,
        rank: usize,
        alpha: f64,
        dropout: f64,
        dtype: DType,
        device: &Device,
        rng: &mut StdRng,
    ) -> candle_core::Result<Self> {
        let bound = 1.0 / (in_features as f64).sqrt();
        let a = uniform_var((rank, in_features), bound, dtype, device, rng)?;
        let b = Var::zeros((out_features, rank), dtype, device)?;
        Ok(Self {
            a,
            b,
            scaling: alpha / rank as f64,
            dropout,
        })
    }
}

impl Delta for Lora {
    fn delta(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let out_dtype = x.dtype();
        let x = adapter_input(x, self.a.dtype(), self.dropout, ctx)?;
        // Scaling the rank-r intermediate instead of the output: r values a row, not `out`.
        let down = (x.matmul(&self.a.t()?)? * self.scaling)?;
        down.matmul(&self.b.t()?)?.to_dtype(out_dtype)
    }

    fn plain_lora(&self, ctx: &Ctx) -> Option<PlainLora> {
        ctx.is_training().then(|| PlainLora {
            a: self.a.as_tensor().clone(),
            b: self.b.as_tensor().clone(),
            scaling: self.scaling,
            dropout: self.dropout,
        })
    }
}

impl Adapter for Lora {
    fn params(&self) -> Vec<Param> {
        vec![
            Param::new("lora_A.weight", &self.a, Role::TRAINED),
            Param::new("lora_B.weight", &self.b, Role::TRAINED),
        ]
    }

    fn lora_factors(&self) -> candle_core::Result<(Tensor, Tensor, f64)> {
        Ok((
            self.a.as_tensor().clone(),
            self.b.as_tensor().clone(),
            self.scaling,
        ))
    }

    fn row_factors(&self) -> Option<super::RowFactors> {
        Some(super::RowFactors {
            shared: None,
            unshared: Some((self.a.as_tensor().clone(), self.b.as_tensor().clone())),
            scaling: self.scaling,
        })
    }
}
