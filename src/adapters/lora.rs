//! LoRA, as PEFT's `LoraLayer`: `Δ(x) = α/r · (dropout(x) Aᵀ) Bᵀ`.

use super::{adapter_input, uniform_var, Adapter, AdapterConfig, Ctx, Parts, Target};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use std::rc::Rc;

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

impl Adapter for Lora {
    fn delta(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let out_dtype = x.dtype();
        let x = adapter_input(x, self.a.dtype(), self.dropout, ctx)?;
        // Scaling the rank-r intermediate instead of the output: r values a row, not `out`.
        let down = (x.matmul(&self.a.t()?)? * self.scaling)?;
        down.matmul(&self.b.t()?)?.to_dtype(out_dtype)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![
            ("lora_A.weight".into(), self.a.clone()),
            ("lora_B.weight".into(), self.b.clone()),
        ]
    }

    fn lora_factors(&self) -> candle_core::Result<(Tensor, Tensor, f64)> {
        Ok((
            self.a.as_tensor().clone(),
            self.b.as_tensor().clone(),
            self.scaling,
        ))
    }
}

pub fn build(
    cfg: &AdapterConfig,
    targets: &[Target],
    dtype: DType,
    device: &Device,
    rng: &mut StdRng,
) -> candle_core::Result<Parts> {
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

/// `r · (in + out)` per adapted linear.
pub fn count(cfg: &AdapterConfig, targets: &[Target]) -> usize {
    targets
        .iter()
        .map(|t| cfg.rank * (t.in_features + t.out_features))
        .sum()
}
