//! What an adapter method is: everything the rest of the tool needs to know about one, behind
//! one trait implemented by the method's typed options.

use super::{AdapterConfig, Parts, Target};
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use rand::rngs::StdRng;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// One adapter method, implemented by its options (the method's keys of `[adapter]`). Every
/// call gets the whole config for the keys all methods share (rank, α, dropout, targets).
pub trait Method: std::fmt::Debug + Options {
    /// Its kind name, PEFT type and parsers.
    fn registration(&self) -> &'static Registration;

    /// Rejects options that contradict each other or the shared keys, naming the key.
    fn validate(&self, cfg: &AdapterConfig) -> Result<()>;

    /// Whether `rank` may not exceed a target's smaller side (true for a per-layer factorisation
    /// of ΔW; VeRA's projections and Tied-LoRA's factors are shared across layers).
    fn rank_bounded_by_shape(&self) -> bool {
        true
    }

    /// Rejects a linear this method cannot adapt with these options, naming it and the key.
    fn check_target(&self, _cfg: &AdapterConfig, _target: &Target) -> Result<()> {
        Ok(())
    }

    /// The exact number of trainable elements on `targets` (already checked).
    fn trainable_count(&self, cfg: &AdapterConfig, targets: &[Target]) -> usize;

    /// Fresh adapters for `targets`, initialised from `rng` (shared tensors first).
    fn build(
        &self,
        cfg: &AdapterConfig,
        targets: &[Target],
        dtype: DType,
        device: &Device,
        rng: &mut StdRng,
    ) -> Result<Parts>;

    /// Its own keys of `adapter_config.json`, as one JSON object (scaling, dropout and options;
    /// `peft_type`, `r` and `target_modules` are written by the caller).
    fn peft_keys(&self, cfg: &AdapterConfig) -> Value;
}

/// How to recognise and read one method.
pub struct Registration {
    /// `[adapter] kind`.
    pub kind: &'static str,
    /// `peft_type` in `adapter_config.json`.
    pub peft_type: &'static str,
    /// The options from the method's own `[adapter]` keys (the shared keys already removed).
    pub from_toml: fn(toml::Table) -> std::result::Result<Box<dyn Method>, toml::de::Error>,
    /// The options and shared keys from an `adapter_config.json`.
    pub from_peft: fn(&PeftKeys) -> Result<PeftRead>,
    /// The linears adapted when the user names none.
    pub default_targets: &'static [&'static str],
}

/// `from_toml` for options that deserialize with serde.
pub fn options_from_toml<T: Method + DeserializeOwned + 'static>(
    table: toml::Table,
) -> std::result::Result<Box<dyn Method>, toml::de::Error> {
    Ok(Box::new(table.try_into::<T>()?))
}

/// What every method's options get for free from `Clone + Serialize`.
pub trait Options {
    fn clone_box(&self) -> Box<dyn Method>;
    /// The options as `[adapter]` keys (the resolved config.toml, `params --json`).
    fn to_table(&self) -> toml::Table;
}

impl<T: Method + Clone + Serialize + 'static> Options for T {
    fn clone_box(&self) -> Box<dyn Method> {
        Box::new(self.clone())
    }

    fn to_table(&self) -> toml::Table {
        toml::Table::try_from(self).expect("adapter options serialize as a TOML table")
    }
}

impl Clone for Box<dyn Method> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

impl PartialEq for dyn Method {
    fn eq(&self, other: &Self) -> bool {
        self.registration().kind == other.registration().kind && self.to_table() == other.to_table()
    }
}

/// A method read from an `adapter_config.json`: its options and the shared keys it stores
/// under its own names.
pub struct PeftRead {
    pub method: Box<dyn Method>,
    pub alpha: Option<f64>,
    pub dropout: f64,
}

impl PeftRead {
    /// For methods that store α and dropout under LoRA's names (`lora_alpha` required,
    /// `lora_dropout` default 0).
    pub fn with_lora_keys(keys: &PeftKeys, method: Box<dyn Method>) -> Result<Self> {
        Ok(Self {
            method,
            alpha: Some(keys.require("lora_alpha")?),
            dropout: keys.or("lora_dropout", 0.0)?,
        })
    }
}

/// `lora_alpha` and `lora_dropout` of `cfg` (as PEFT types them), then the keys of `more`.
pub fn lora_keys_and(cfg: &AdapterConfig, more: Value) -> Value {
    // PEFT types lora_alpha as an int; keep whole numbers integral.
    let alpha = if cfg.alpha.fract() == 0.0 {
        serde_json::json!(cfg.alpha as i64)
    } else {
        serde_json::json!(cfg.alpha)
    };
    let mut keys = serde_json::json!({"lora_alpha": alpha, "lora_dropout": cfg.dropout});
    if let (Value::Object(keys), Value::Object(more)) = (&mut keys, more) {
        keys.extend(more);
    }
    keys
}

/// The keys of an `adapter_config.json`. PEFT writes `null` for many unset options: absent and
/// `null` both mean "the default".
pub struct PeftKeys<'a>(pub &'a Value);

impl PeftKeys<'_> {
    /// The value of `key`, `None` when absent or null; a value of the wrong type is an error
    /// naming the key, the type wanted and the value found.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match serde_json::from_value(v.clone()) {
                Ok(t) => Ok(Some(t)),
                Err(e) => bail!("\"{key}\": {v} is not valid here ({e})"),
            },
        }
    }

    /// A key the method cannot do without.
    pub fn require<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        match self.get(key)? {
            Some(v) => Ok(v),
            None => bail!("\"{key}\" is required"),
        }
    }

    /// `key`, or `default` when absent or null.
    pub fn or<T: DeserializeOwned>(&self, key: &str, default: T) -> Result<T> {
        Ok(self.get(key)?.unwrap_or(default))
    }
}
