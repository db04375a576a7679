//! Adapters: small trainable additions `Δ(x)` to a frozen linear's output.
//!
//! One trait, one small implementation per method. An adapter owns its trainable tensors and
//! knows their PEFT names; the model hands it the layer's input and adds what it returns.

pub mod lora;
pub mod peft;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::Rng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

pub use lora::Lora;

/// What the forward pass needs beyond the input: whether this is training (dropout on) and the
/// seeded generator that makes dropout reproducible.
pub struct Ctx {
    seed: Option<u64>,
    dropout_rng: Option<RefCell<StdRng>>,
}

/// A well-mixed 64-bit value from two (SplitMix64's finaliser), for deriving independent seeds.
pub fn mix_seed(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9e37_79b9_7f4a_7c15)
        .wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Ctx {
    /// Evaluation: dropout is the identity.
    pub fn eval() -> Self {
        Self {
            seed: None,
            dropout_rng: None,
        }
    }

    /// Training: dropout masks drawn from generators derived from `seed`.
    pub fn train(seed: u64) -> Self {
        Self {
            seed: Some(seed),
            dropout_rng: Some(RefCell::new(StdRng::seed_from_u64(seed))),
        }
    }

    /// The context of decoder layer `l`: its own generator, so recomputing one layer (activation
    /// checkpointing, resume) draws exactly the masks of the first computation.
    pub fn for_layer(&self, l: usize) -> Self {
        match self.seed {
            Some(seed) => Self::train(mix_seed(seed, l as u64)),
            None => Self::eval(),
        }
    }

    /// Inverted dropout with probability `p`, as `torch.nn.Dropout` in training mode.
    pub fn dropout(&self, x: &Tensor, p: f64) -> candle_core::Result<Tensor> {
        let Some(rng) = &self.dropout_rng else {
            return Ok(x.clone());
        };
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let scale = 1.0 / (1.0 - p);
        let mask: Vec<f32> = {
            let mut rng = rng.borrow_mut();
            (0..x.elem_count())
                .map(|_| {
                    if rng.random::<f64>() < p {
                        0.0
                    } else {
                        scale as f32
                    }
                })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

/// One adapter attached to one frozen linear.
pub trait Adapter {
    /// The addition to the frozen layer's output for input `x` (…, in) → (…, out).
    fn delta(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor>;

    /// Trainable tensors, named as in the saved file after the layer's prefix
    /// (e.g. `lora_A.weight`).
    fn params(&self) -> Vec<(String, Var)>;
}

/// Which adapter method and its hyper-parameters.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// `lora` (PRoLoRA, VeRA and Tied-LoRA come next).
    #[serde(default = "default_kind")]
    pub kind: String,
    #[serde(default = "default_rank")]
    pub rank: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Linears of each block to adapt.
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
    /// Start from this saved adapter (a PEFT directory) instead of a fresh init.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
}

fn default_kind() -> String {
    "lora".into()
}
fn default_rank() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_dropout() -> f64 {
    0.1
}
fn default_targets() -> Vec<String> {
    crate::model::config::BLOCK_LINEARS
        .iter()
        .map(|s| s.to_string())
        .collect()
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            kind: default_kind(),
            rank: default_rank(),
            alpha: default_alpha(),
            dropout: default_dropout(),
            targets: default_targets(),
            init_from: None,
        }
    }
}

impl AdapterConfig {
    pub fn validate(&self) -> Result<()> {
        if self.kind != "lora" {
            bail!(
                "adapter.kind = {:?} is not available yet (available: \"lora\")",
                self.kind
            );
        }
        if self.rank == 0 {
            bail!("adapter.rank must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("adapter.dropout must be in [0, 1), got {}", self.dropout);
        }
        if self.targets.is_empty() {
            bail!(
                "adapter.targets is empty: name at least one of {:?}",
                crate::model::config::BLOCK_LINEARS
            );
        }
        for t in &self.targets {
            if !crate::model::config::BLOCK_LINEARS.contains(&t.as_str()) {
                bail!(
                    "adapter.targets: unknown module {t:?} (choose from {:?})",
                    crate::model::config::BLOCK_LINEARS
                );
            }
        }
        Ok(())
    }

    /// A fresh adapter for a linear of shape (out, in), initialised from `rng`.
    pub fn build(
        &self,
        (out_features, in_features): (usize, usize),
        dtype: DType,
        device: &Device,
        rng: &mut StdRng,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(Lora::init(
            in_features,
            out_features,
            self.rank,
            self.alpha,
            self.dropout,
            dtype,
            device,
            rng,
        )?))
    }
}

/// `U(−bound, bound)` samples, drawn in order from `rng` (the whole run's init is one stream).
pub fn uniform(n: usize, bound: f64, rng: &mut StdRng) -> Vec<f32> {
    (0..n)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect()
}
