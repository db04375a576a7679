//! Adapters: small trainable additions `Δ(x)` to a frozen linear's output.
//!
//! A method is one file: its typed options implement [`Method`] (init, counts, shape checks,
//! its `adapter_config.json` keys, its learning-rate groups) and its per-linear type implements
//! [`Adapter`]. The [`registry`] maps a kind name and a PEFT type to the method; nothing else
//! names a method. Tensors shared across layers (VeRA's projections, Tied-LoRA's A and B) live
//! once in the [`AdapterSet`], which hands them to the adapters that use them.

mod config;
pub mod lora;
mod method;
pub mod peft;
pub mod prolora;
pub mod registry;
pub mod tied_lora;
pub mod vera;

pub use config::AdapterConfig;
pub use lora::{Lora, LoraConfig};
pub use method::{Method, PeftKeys, PeftRead};
pub use prolora::{Axis, CompactProlora, Prolora, ProloraConfig, ProloraForward};
pub use tied_lora::{TiedLora, TiedLoraConfig};
pub use vera::{Vera, VeraConfig};

use crate::ctx::Ctx;
use crate::model::config::linear_path;
use crate::model::llama::Delta;
use crate::model::Llama;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::Rng;
use std::rc::Rc;

/// One adapter attached to one frozen linear: the model asks it for `Δ(x)` ([`Delta`]).
pub trait Adapter: Delta {
    /// Tensors this adapter alone owns, named as in the saved file after the layer's prefix
    /// (e.g. `lora_A.weight`). Tensors shared with other layers are listed by the set.
    fn params(&self) -> Vec<Param>;

    /// ΔW as plain LoRA factors `(A (k, in), B (out, k), scaling)` with `ΔW = scaling · B A`:
    /// every method here is linear in that form, which is what export and merge need.
    fn lora_factors(&self) -> candle_core::Result<(Tensor, Tensor, f64)>;

    /// What a server keeps for this linear when it differs from the adapter itself (PRoLoRA
    /// drops its index tensors): None means the adapter as it is, its tensors alone.
    fn served(&self) -> candle_core::Result<Option<Served>> {
        Ok(None)
    }

    /// Δ(x) as [`RowFactors`] where the method has that form (LoRA; PRoLoRA's chunk-wise
    /// layouts), for kernels that apply a different adapter to each row: None otherwise.
    fn row_factors(&self) -> Option<RowFactors> {
        None
    }
}

/// `Δ(x) = scaling · (shared(x) + B (A x))` from tensors an adapter already holds (nothing
/// expanded): LoRA is the `unshared` part alone; PRoLoRA adds its shared chunks.
pub struct RowFactors {
    pub shared: Option<SharedChunks>,
    /// A (u, in) and B (out, u).
    pub unshared: Option<(Tensor, Tensor)>,
    pub scaling: f64,
}

/// PRoLoRA's shared ranks, chunk-wise: the input is cut into chunks of `chunk_a` features,
/// chunk j times `a0` rolled by −j·`roll_a` along the rank, summed; output chunk i (of
/// `chunk_b` features) is `b0` times that sum rolled by +i·`roll_b`.
pub struct SharedChunks {
    /// (r_s, chunk_a).
    pub a0: Tensor,
    /// (chunk_b, r_s).
    pub b0: Tensor,
    pub chunk_a: usize,
    pub chunk_b: usize,
    pub roll_a: usize,
    pub roll_b: usize,
}

/// An adapted linear as a server keeps it: the delta, and the bytes it holds beyond the
/// adapter's own tensors.
pub struct Served {
    pub delta: Rc<dyn Delta>,
    pub extra_bytes: usize,
}

/// What a tensor of an adapter is for the optimizer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Role {
    /// Trained, its learning rate scaled by `lr_scale` (PRoLoRA's shared/unshared groups).
    Trained { lr_scale: f64 },
    /// Saved with the adapter but never trained (VeRA's random projections).
    Frozen,
}

impl Role {
    /// Trained at the base learning rate.
    pub const TRAINED: Role = Role::Trained { lr_scale: 1.0 };
}

/// A tensor of an adapter under its name (relative to the layer for [`Adapter::params`], the
/// full key for tensors shared by the set).
#[derive(Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub role: Role,
}

impl Param {
    pub fn new(name: impl Into<String>, var: &Var, role: Role) -> Self {
        Self {
            name: name.into(),
            var: var.clone(),
            role,
        }
    }
}

/// What a method's `build` returns: one adapter per target (same order) and the tensors
/// shared by several of them, under their full keys.
pub struct Parts {
    pub adapters: Vec<Rc<dyn Adapter>>,
    pub shared: Vec<Param>,
}

/// One adapted linear: block `layer`'s `module`, of shape (out, in).
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub layer: usize,
    pub module: &'static str,
    pub in_features: usize,
    pub out_features: usize,
}

/// PEFT's key prefix of a linear, e.g. `base_model.model.model.layers.3.self_attn.q_proj`.
pub fn peft_prefix(layer: usize, module: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}",
        linear_path(module)
    )
}

/// All adapters of a model, with the tensors they share.
pub struct AdapterSet {
    pub cfg: AdapterConfig,
    linears: Vec<(Target, Rc<dyn Adapter>)>,
    shared: Vec<Param>,
}

impl AdapterSet {
    /// Fresh adapters for every target of `model`, initialised from `rng` (one stream: shared
    /// tensors first, then the linears layer by layer).
    pub fn new(
        cfg: &AdapterConfig,
        model: &crate::model::LlamaConfig,
        dtype: DType,
        device: &Device,
        rng: &mut StdRng,
    ) -> Result<Self> {
        let targets = cfg.checked_targets(model)?;
        let parts = cfg.method.build(cfg, &targets, dtype, device, rng)?;
        Ok(Self {
            cfg: cfg.clone(),
            linears: targets.into_iter().zip(parts.adapters).collect(),
            shared: parts.shared,
        })
    }

    /// Plugs every adapter into its linear of `model` (and removes any others).
    pub fn attach_to(&self, model: &mut Llama) {
        model.attach(|layer, module| {
            self.linears
                .iter()
                .find(|(t, _)| t.layer == layer && t.module == module)
                .map(|(_, a)| a.clone() as Rc<dyn Delta>)
        });
    }

    /// The adapter of block `layer`'s `module`, as the model takes it.
    pub fn delta_of(&self, layer: usize, module: &str) -> Option<Rc<dyn Delta>> {
        self.linears
            .iter()
            .find(|(t, _)| t.layer == layer && t.module == module)
            .map(|(_, a)| a.clone() as Rc<dyn Delta>)
    }

    /// Every adapted linear with its adapter.
    pub fn linears(&self) -> impl Iterator<Item = (&Target, &dyn Adapter)> {
        self.linears.iter().map(|(t, a)| (t, a.as_ref()))
    }

    /// Every tensor of the adapter file under its full key, trainable or not.
    pub fn tensors(&self) -> Vec<Param> {
        let own = self.linears.iter().flat_map(|(t, a)| {
            let prefix = peft_prefix(t.layer, t.module);
            a.params().into_iter().map(move |p| Param {
                name: format!("{prefix}.{}", p.name),
                ..p
            })
        });
        self.shared.iter().cloned().chain(own).collect()
    }

    /// Every trainable tensor under its full key, each once, with its learning-rate scale.
    pub fn trainable(&self) -> Vec<(String, Var, f64)> {
        self.tensors()
            .into_iter()
            .filter_map(|p| match p.role {
                Role::Trained { lr_scale } => Some((p.name, p.var, lr_scale)),
                Role::Frozen => None,
            })
            .collect()
    }
}

/// Adapter tensors are kept in f32 (f64 when the whole model is, for gradient checks).
pub fn adapter_dtype(model_dtype: DType) -> DType {
    if model_dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `U(−bound, bound)` samples, drawn in order from `rng` (the whole run's init is one stream).
pub fn uniform(n: usize, bound: f64, rng: &mut StdRng) -> Vec<f32> {
    (0..n)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect()
}

/// A trainable `(rows, cols)` tensor of `U(−bound, bound)` samples from `rng`.
pub fn uniform_var(
    shape: (usize, usize),
    bound: f64,
    dtype: DType,
    device: &Device,
    rng: &mut StdRng,
) -> candle_core::Result<Var> {
    let t = Tensor::from_vec(uniform(shape.0 * shape.1, bound, rng), shape, device)?;
    Var::from_tensor(&t.to_dtype(dtype)?)
}

/// `dropout(x)` in the adapter's dtype: what every method feeds its down-projection.
pub fn adapter_input(x: &Tensor, dtype: DType, p: f64, ctx: &Ctx) -> candle_core::Result<Tensor> {
    ctx.dropout(&x.to_dtype(dtype)?, p)
}
