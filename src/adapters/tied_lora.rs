//! Tied-LoRA (Renduchintala et al., 2023) in the configuration PRoLoRA compares against
//! (docs/methods.md §4): q, k and v only; one trainable `A (r × d)` and one trainable
//! `B (q_out + k_out + v_out, r)` shared by all layers, the down-projection A shared by q, k
//! and v; per layer trainable `u ∈ ℝʳ` and `v ∈ ℝ^{rows}`:
//! `ΔW⁽ˡ⁾ = α/r · diag(v⁽ˡ⁾) B diag(u⁽ˡ⁾) A`, split row-wise into the q, k, v parts (with GQA the
//! k and v parts have kv_heads·head_dim rows). Only the targeted ones of q, k, v take rows.
//!
//! Init (our choice; the paper's code is not public): A as LoRA (`U(±1/√d)`), B = 0, u = v = 1,
//! so Δ = 0 at step 0 and the first steps train B, as in LoRA.

use super::method::{lora_keys_and, options_from_toml, Method, PeftKeys, PeftRead, Registration};
use super::{adapter_input, uniform_var, Adapter, AdapterConfig, Param, Parts, Role, Target};
use crate::ctx::Ctx;
use crate::model::llama::Delta;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::rc::Rc;

pub const REGISTRATION: Registration = Registration {
    kind: "tied-lora",
    peft_type: "TIED_LORA",
    from_toml: options_from_toml::<TiedLoraConfig>,
    from_peft: TiedLoraConfig::from_peft,
    default_targets: &TIED_MODULES,
};

pub const TIED_A: &str = "base_model.tied_lora_A";
pub const TIED_B: &str = "base_model.tied_lora_B";

/// The modules Tied-LoRA can adapt: they share one input and one down-projection.
pub const TIED_MODULES: [&str; 3] = ["q_proj", "k_proj", "v_proj"];

/// Tied-LoRA has no options beyond the shared keys.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TiedLoraConfig {}

impl TiedLoraConfig {
    fn from_peft(keys: &PeftKeys) -> Result<PeftRead> {
        PeftRead::with_lora_keys(keys, Box::new(TiedLoraConfig {}))
    }
}

impl Method for TiedLoraConfig {
    fn registration(&self) -> &'static Registration {
        &REGISTRATION
    }

    /// A and B are shared by every layer, each layer scaling them by its own u and v: a rank
    /// above one layer's width still adds capacity across layers (the paper's r 256 at d 4096
    /// is the demo's r 256 at d 128).
    fn rank_bounded_by_shape(&self) -> bool {
        false
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        if let Some(t) = cfg
            .targets
            .iter()
            .find(|t| !TIED_MODULES.contains(&t.as_str()))
        {
            bail!(
                "adapter.targets: tied-lora adapts q_proj, k_proj and v_proj only (they share A), not {t:?}; \
                 set adapter.targets = [\"q_proj\", \"k_proj\", \"v_proj\"]"
            );
        }
        Ok(())
    }

    /// `r·d + rows·r` shared, plus `r + rows` per layer: `4·d·r + (r + 3d)·L` for q, k, v of a
    /// model without GQA.
    fn trainable_count(&self, cfg: &AdapterConfig, targets: &[Target]) -> usize {
        let r = cfg.rank;
        let d = targets.first().map_or(0, |t| t.in_features);
        let (rows, _) = row_layout(targets);
        let layers = targets.last().map_or(0, |t| t.layer + 1);
        r * d + rows * r + layers * (r + rows)
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        targets: &[Target],
        dtype: DType,
        device: &Device,
        rng: &mut StdRng,
    ) -> Result<Parts> {
        let r = cfg.rank;
        let d = targets.first().map_or(0, |t| t.in_features);
        let (rows, offsets) = row_layout(targets);
        let a = uniform_var((r, d), 1.0 / (d as f64).sqrt(), dtype, device, rng)?;
        let b = Var::zeros((rows, r), dtype, device)?;
        let mut shared = vec![
            Param::new(TIED_A, &a, Role::TRAINED),
            Param::new(TIED_B, &b, Role::TRAINED),
        ];
        let mut adapters: Vec<Rc<dyn Adapter>> = Vec::with_capacity(targets.len());
        let mut vectors: Option<(usize, Var, Var)> = None;
        for (t, offset) in targets.iter().zip(offsets) {
            if vectors.as_ref().map(|v| v.0) != Some(t.layer) {
                let u = Var::ones(r, dtype, device)?;
                let v = Var::ones(rows, dtype, device)?;
                let [ku, kv] = layer_keys(t.layer);
                shared.push(Param::new(ku, &u, Role::TRAINED));
                shared.push(Param::new(kv, &v, Role::TRAINED));
                vectors = Some((t.layer, u, v));
            }
            let (_, u, v) = vectors.as_ref().expect("set above");
            adapters.push(Rc::new(TiedLora {
                a: a.clone(),
                b: b.clone(),
                u: u.clone(),
                v: v.clone(),
                offset,
                rows: t.out_features,
                scaling: cfg.alpha / r as f64,
                dropout: cfg.dropout,
            }));
        }
        Ok(Parts { adapters, shared })
    }

    fn peft_keys(&self, cfg: &AdapterConfig) -> Value {
        lora_keys_and(cfg, json!({}))
    }
}

pub struct TiedLora {
    a: Var,
    b: Var,
    u: Var,
    v: Var,
    /// This module's rows of B and v.
    offset: usize,
    rows: usize,
    scaling: f64,
    dropout: f64,
}

impl TiedLora {
    fn rows_of(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        t.narrow(0, self.offset, self.rows)
    }
}

impl Delta for TiedLora {
    fn delta(&self, x: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let out_dtype = x.dtype();
        let x = adapter_input(x, self.a.dtype(), self.dropout, ctx)?;
        let down = x.matmul(&self.a.t()?)?.broadcast_mul(&self.u)?;
        let b = self.rows_of(&self.b)?;
        let up = down
            .matmul(&b.t()?)?
            .broadcast_mul(&self.rows_of(&self.v)?)?;
        (up * self.scaling)?.to_dtype(out_dtype)
    }
}

impl Adapter for TiedLora {
    /// Everything is shared (listed once by the set).
    fn params(&self) -> Vec<Param> {
        Vec::new()
    }

    /// `A = diag(u) A`, `B = diag(v) B` (this module's rows).
    fn lora_factors(&self) -> candle_core::Result<(Tensor, Tensor, f64)> {
        let a = self.a.broadcast_mul(&self.u.unsqueeze(1)?)?;
        let b = self
            .rows_of(&self.b)?
            .broadcast_mul(&self.rows_of(&self.v)?.unsqueeze(1)?)?;
        Ok((a, b, self.scaling))
    }
}

/// Keys of block `layer`'s vectors.
fn layer_keys(layer: usize) -> [String; 2] {
    let p = format!("base_model.model.model.layers.{layer}.self_attn");
    [format!("{p}.tied_lora_u"), format!("{p}.tied_lora_v")]
}

/// Rows of B taken by one layer's targets, and each target's offset (targets come in
/// q, k, v order within a layer).
fn row_layout(targets: &[Target]) -> (usize, Vec<usize>) {
    let mut offsets = Vec::with_capacity(targets.len());
    let mut rows = 0;
    let mut layer_rows = 0;
    let mut layer = None;
    for t in targets {
        if layer != Some(t.layer) {
            layer = Some(t.layer);
            rows = 0;
        }
        offsets.push(rows);
        rows += t.out_features;
        layer_rows = layer_rows.max(rows);
    }
    (layer_rows, offsets)
}
