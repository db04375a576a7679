//! Adapters: small trainable additions `Δ(x)` to a frozen linear's output.
//!
//! One trait, one small implementation per method. An adapter owns its per-layer tensors and
//! knows their PEFT names; tensors shared across layers (VeRA's projections, Tied-LoRA's A and B)
//! live once in the [`AdapterSet`], which hands them to the adapters that use them. The model
//! hands an adapter the layer's input and adds what it returns.

mod dropout;
pub mod lora;
pub mod peft;
pub mod prolora;
pub mod tied_lora;
pub mod vera;

use crate::model::config::{linear_path, LlamaConfig, BLOCK_LINEARS};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::Rng;
use rand::RngCore;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::rc::Rc;

pub use lora::Lora;
pub use prolora::Prolora;
pub use tied_lora::TiedLora;
pub use vera::Vera;

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
        // One draw from the context's stream per call; the mask is a hash of it.
        dropout::dropout(x, rng.borrow_mut().next_u64(), p)
    }
}

/// One adapter attached to one frozen linear.
pub trait Adapter {
    /// The addition to the frozen layer's output for input rows `x` (n, in) → (n, out).
    fn delta(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor>;

    /// Tensors this adapter alone owns, named as in the saved file after the layer's prefix
    /// (e.g. `lora_A.weight`). Tensors shared with other layers are listed by the set.
    fn params(&self) -> Vec<(String, Var)>;

    /// ΔW as plain LoRA factors `(A (k, in), B (out, k), scaling)` with `ΔW = scaling · B A`:
    /// every method here is linear in that form, which is what export and merge need.
    fn lora_factors(&self) -> candle_core::Result<(Tensor, Tensor, f64)>;
}

/// The adapter methods.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterKind {
    Lora,
    Prolora,
    Vera,
    TiedLora,
}

impl AdapterKind {
    pub const ALL: [AdapterKind; 4] = [Self::Lora, Self::Prolora, Self::Vera, Self::TiedLora];

    pub fn name(self) -> &'static str {
        match self {
            Self::Lora => "lora",
            Self::Prolora => "prolora",
            Self::Vera => "vera",
            Self::TiedLora => "tied-lora",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match Self::ALL.into_iter().find(|k| k.name() == s) {
            Some(k) => Ok(k),
            None => bail!("unknown adapter {s:?} (choose lora, prolora, vera or tied-lora)"),
        }
    }
}

impl std::fmt::Display for AdapterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An axis of a LoRA factor: the hidden (feature) axis or the rank axis.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Axis {
    Hidden,
    Rank,
}

/// PRoLoRA's two forwards (same math, other summation order).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProloraForward {
    /// Never builds A and B (METHODS.md §2, last paragraph): pads x to m·cA and works on the
    /// chunks. Slower on CPU (`examples/prolora_forwards.rs`: 3× at h 4096), as the padded copy
    /// of x costs more than gathering A (r × h) and B (o × r).
    Chunked,
    /// Gathers the full A and B, then two matmuls; the default.
    Materialized,
}

/// Which adapter method and its hyper-parameters. Method-specific keys are optional: unset
/// means the default, and setting one for another method is an error.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// `lora`, `prolora`, `vera` or `tied-lora`.
    #[serde(default = "default_kind")]
    pub kind: AdapterKind,
    /// Total rank r (PRoLoRA: shared + unshared).
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// Scaling α / r (not used by VeRA, which has no scaling).
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
    /// PRoLoRA: unshared rank u (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unshared_rank: Option<usize>,
    /// PRoLoRA: sharing rate m of A (default 7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharing_rate_a: Option<usize>,
    /// PRoLoRA: sharing rate n of B (default m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharing_rate_b: Option<usize>,
    /// PRoLoRA: rotate the shared chunks (default true; false is CLoRA / PRoLoRA⁻ʳ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<bool>,
    /// PRoLoRA: rectified Kaiming init of A0 (default true; false is PRoLoRA⁻ⁱ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rectified_init: Option<bool>,
    /// PRoLoRA: the axis the chunks are cut along (default hidden; rank is a Table 4 sibling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_axis: Option<Axis>,
    /// PRoLoRA: the axis the chunks are rolled along (default rank; hidden is a Table 4 sibling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_axis: Option<Axis>,
    /// PRoLoRA: `materialized` (default, faster) or `chunked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<ProloraForward>,
    /// PRoLoRA: learning-rate multiplier of the shared A0, B0 (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_lr_scale: Option<f64>,
    /// PRoLoRA: learning-rate multiplier of the unshared Au, Bu (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unshared_lr_scale: Option<f64>,
    /// VeRA: initial value of every λ_d (PEFT's `d_initial`, default 0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_initial: Option<f64>,
}

fn default_kind() -> AdapterKind {
    AdapterKind::Lora
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
    BLOCK_LINEARS.iter().map(|s| s.to_string()).collect()
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
            unshared_rank: None,
            sharing_rate_a: None,
            sharing_rate_b: None,
            rotation: None,
            rectified_init: None,
            share_axis: None,
            rotate_axis: None,
            forward: None,
            shared_lr_scale: None,
            unshared_lr_scale: None,
            d_initial: None,
        }
    }
}

impl AdapterConfig {
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("adapter.rank must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("adapter.dropout must be in [0, 1), got {}", self.dropout);
        }
        if self.targets.is_empty() {
            bail!("adapter.targets is empty: name at least one of {BLOCK_LINEARS:?}");
        }
        for t in &self.targets {
            if !BLOCK_LINEARS.contains(&t.as_str()) {
                bail!("adapter.targets: unknown module {t:?} (choose from {BLOCK_LINEARS:?})");
            }
        }
        let prolora_keys = [
            ("unshared_rank", self.unshared_rank.is_some()),
            ("sharing_rate_a", self.sharing_rate_a.is_some()),
            ("sharing_rate_b", self.sharing_rate_b.is_some()),
            ("rotation", self.rotation.is_some()),
            ("rectified_init", self.rectified_init.is_some()),
            ("share_axis", self.share_axis.is_some()),
            ("rotate_axis", self.rotate_axis.is_some()),
            ("forward", self.forward.is_some()),
            ("shared_lr_scale", self.shared_lr_scale.is_some()),
            ("unshared_lr_scale", self.unshared_lr_scale.is_some()),
        ];
        let vera_keys = [("d_initial", self.d_initial.is_some())];
        for (keys, owner) in [
            (&prolora_keys[..], AdapterKind::Prolora),
            (&vera_keys[..], AdapterKind::Vera),
        ] {
            if self.kind != owner {
                if let Some((key, _)) = keys.iter().find(|(_, set)| *set) {
                    bail!(
                        "adapter.{key} applies to kind = \"{owner}\" only (this is kind = \"{}\"): remove it",
                        self.kind
                    );
                }
            }
        }
        match self.kind {
            AdapterKind::Lora | AdapterKind::Vera => Ok(()),
            AdapterKind::Prolora => prolora::Options::from_config(self).map(|_| ()),
            AdapterKind::TiedLora => tied_lora::check_targets(&self.targets),
        }
    }

    /// The linears this config adapts in `model`, layer by layer in BLOCK_LINEARS order.
    pub fn targets_in(&self, model: &LlamaConfig) -> Vec<Target> {
        (0..model.num_hidden_layers)
            .flat_map(|layer| {
                BLOCK_LINEARS
                    .into_iter()
                    .filter(|m| self.targets.iter().any(|t| t == m))
                    .map(move |module| {
                        let (out_features, in_features) =
                            model.linear_shape(module).expect("a block linear");
                        Target {
                            layer,
                            module,
                            in_features,
                            out_features,
                        }
                    })
            })
            .collect()
    }

    /// The exact number of trainable elements on `model`, from the shapes alone.
    pub fn param_count(&self, model: &LlamaConfig) -> Result<usize> {
        self.validate()?;
        let targets = self.targets_in(model);
        Ok(match self.kind {
            AdapterKind::Lora => lora::count(self, &targets),
            AdapterKind::Prolora => prolora::count(self, &targets)?,
            AdapterKind::Vera => vera::count(self, &targets),
            AdapterKind::TiedLora => tied_lora::count(self, &targets),
        })
    }
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

/// A tensor stored once for the whole model, under its full key.
pub struct SharedTensor {
    pub key: String,
    pub var: Var,
    /// False for frozen tensors that are saved but never trained (VeRA's projections).
    pub trainable: bool,
}

/// What a method's `build` returns: one adapter per target (same order) and the shared tensors.
pub struct Parts {
    pub adapters: Vec<Rc<dyn Adapter>>,
    pub shared: Vec<SharedTensor>,
}

/// All adapters of a model, with the tensors they share.
pub struct AdapterSet {
    pub cfg: AdapterConfig,
    linears: Vec<(Target, Rc<dyn Adapter>)>,
    shared: Vec<SharedTensor>,
}

impl AdapterSet {
    /// Fresh adapters for every target of `model`, initialised from `rng` (one stream: shared
    /// tensors first, then the linears layer by layer).
    pub fn new(
        cfg: &AdapterConfig,
        model: &LlamaConfig,
        dtype: DType,
        device: &Device,
        rng: &mut StdRng,
    ) -> Result<Self> {
        cfg.validate()?;
        let targets = cfg.targets_in(model);
        let parts = match cfg.kind {
            AdapterKind::Lora => lora::build(cfg, &targets, dtype, device, rng)?,
            AdapterKind::Prolora => prolora::build(cfg, &targets, dtype, device, rng)?,
            AdapterKind::Vera => vera::build(cfg, &targets, dtype, device, rng)?,
            AdapterKind::TiedLora => tied_lora::build(cfg, &targets, dtype, device, rng)?,
        };
        Ok(Self {
            cfg: cfg.clone(),
            linears: targets.into_iter().zip(parts.adapters).collect(),
            shared: parts.shared,
        })
    }

    /// The adapter of block `layer`'s `module`, if it is adapted.
    pub fn get(&self, layer: usize, module: &str) -> Option<Rc<dyn Adapter>> {
        self.linears
            .iter()
            .find(|(t, _)| t.layer == layer && t.module == module)
            .map(|(_, a)| a.clone())
    }

    /// Every adapted linear with its adapter.
    pub fn linears(&self) -> impl Iterator<Item = (&Target, &dyn Adapter)> {
        self.linears.iter().map(|(t, a)| (t, a.as_ref()))
    }

    /// Every tensor of the adapter file with its full key, trainable or not.
    pub fn tensors(&self) -> Vec<(String, Var)> {
        self.named(true)
    }

    /// Every trainable tensor with its full key, each once.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.named(false)
    }

    fn named(&self, with_frozen: bool) -> Vec<(String, Var)> {
        let shared = self
            .shared
            .iter()
            .filter(|s| with_frozen || s.trainable)
            .map(|s| (s.key.clone(), s.var.clone()));
        let own = self.linears.iter().flat_map(|(t, a)| {
            let prefix = peft_prefix(t.layer, t.module);
            a.params()
                .into_iter()
                .map(move |(name, var)| (format!("{prefix}.{name}"), var))
        });
        shared.chain(own).collect()
    }

    /// The learning-rate multiplier of the trainable tensor `key` (PRoLoRA's shared/unshared
    /// groups; 1 otherwise).
    pub fn lr_scale(&self, key: &str) -> f64 {
        match self.cfg.kind {
            AdapterKind::Prolora => prolora::lr_scale(&self.cfg, key),
            _ => 1.0,
        }
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
