//! LoRA, as PEFT's `LoraLayer`: `Δ(x) = α/r · (dropout(x) Aᵀ) Bᵀ`.

use super::{uniform, Adapter, Ctx};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;

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
        let a = Tensor::from_vec(
            uniform(rank * in_features, bound, rng),
            (rank, in_features),
            device,
        )?
        .to_dtype(dtype)?;
        let b = Tensor::zeros((out_features, rank), dtype, device)?;
        Ok(Self::from_tensors(a, b, alpha, dropout)?)
    }

    /// From existing `A (r, in)` and `B (out, r)`, e.g. a saved adapter.
    pub fn from_tensors(
        a: Tensor,
        b: Tensor,
        alpha: f64,
        dropout: f64,
    ) -> candle_core::Result<Self> {
        let rank = a.dim(0)?;
        if b.dim(1)? != rank {
            candle_core::bail!("lora_B has rank {} but lora_A has rank {rank}", b.dim(1)?);
        }
        Ok(Self {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scaling: alpha / rank as f64,
            dropout,
        })
    }
}

impl Adapter for Lora {
    fn delta(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let out_dtype = x.dtype();
        let x = ctx.dropout(&x.to_dtype(self.a.dtype())?, self.dropout)?;
        let down = x.broadcast_matmul(&self.a.t()?)?;
        let up = down.broadcast_matmul(&self.b.t()?)?;
        (up * self.scaling)?.to_dtype(out_dtype)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![
            ("lora_A.weight".into(), self.a.clone()),
            ("lora_B.weight".into(), self.b.clone()),
        ]
    }
}
