//! `[adapter]`: the keys every method shares, and the method's own options as its typed
//! struct, chosen by `kind`.

use super::lora::LoraConfig;
use super::method::Method;
use super::method::Registration;
use super::registry::{self, METHODS};
use super::Target;
use crate::model::config::{LlamaConfig, BLOCK_LINEARS};
use anyhow::{bail, Result};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Which adapter method, its options, and the keys all methods share.
#[derive(Clone, Debug)]
pub struct AdapterConfig {
    /// Total rank r (PRoLoRA: shared + unshared; VeRA: the projections' rank).
    pub rank: usize,
    /// Scaling α / r (not used by VeRA, which has no scaling).
    pub alpha: f64,
    pub dropout: f64,
    /// Linears of each block to adapt.
    pub targets: Vec<String>,
    /// Start from this saved adapter (a PEFT directory) instead of a fresh init.
    pub init_from: Option<String>,
    /// `kind` and the method's own keys.
    pub method: Box<dyn Method>,
}

impl PartialEq for AdapterConfig {
    fn eq(&self, other: &Self) -> bool {
        // Field by field: derive(PartialEq) cannot compare boxed trait objects.
        self.to_table() == other.to_table()
    }
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.1,
            targets: BLOCK_LINEARS.iter().map(|s| s.to_string()).collect(),
            init_from: None,
            method: Box::new(LoraConfig::default()),
        }
    }
}

impl AdapterConfig {
    /// A config of the default shared keys for `method`.
    pub fn of(method: impl Method + 'static) -> Self {
        Self {
            method: Box::new(method),
            ..Default::default()
        }
    }

    /// `lora`, `prolora`, `vera` or `tied-lora`.
    pub fn kind(&self) -> &'static str {
        self.method.registration().kind
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("adapter.rank must be at least 1");
        }
        // Far above any model's width (LLaMA-2-70B: 28,672); it keeps every count in range.
        const MAX_RANK: usize = 1 << 20;
        if self.rank > MAX_RANK {
            bail!(
                "adapter.rank = {} is beyond any model (at most {MAX_RANK})",
                self.rank
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("adapter.dropout must be in [0, 1), got {}", self.dropout);
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            bail!(
                "adapter.alpha = {} must be a positive number (the scaling is alpha / rank)",
                self.alpha
            );
        }
        if self.targets.is_empty() {
            bail!("adapter.targets is empty: name at least one of {BLOCK_LINEARS:?}");
        }
        for (i, t) in self.targets.iter().enumerate() {
            if !BLOCK_LINEARS.contains(&t.as_str()) {
                bail!("adapter.targets: unknown module {t:?} (choose from {BLOCK_LINEARS:?})");
            }
            if self.targets[..i].contains(t) {
                bail!("adapter.targets names {t:?} twice: list each module once");
            }
        }
        self.method.validate(self)
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

    /// The targets in `model`, each checked against the method (before any weight is read).
    pub fn checked_targets(&self, model: &LlamaConfig) -> Result<Vec<Target>> {
        self.validate()?;
        let targets = self.targets_in(model);
        // One rank serves every target, so it is bounded by the widest: there it adds capacity
        // (PEFT too gives narrower linears the same rank, e.g. an exported VeRA's k_proj).
        let widest = targets
            .iter()
            .rev() // the first of equally wide ones
            .max_by_key(|t| t.in_features.min(t.out_features));
        if let Some(t) = widest.filter(|_| self.method.rank_bounded_by_shape()) {
            let bound = t.in_features.min(t.out_features);
            if self.rank > bound {
                bail!(
                    "adapter.rank = {} exceeds min(in, out) = {bound} of {} ({} × {}), the \
                     widest target: a larger rank adds parameters but no capacity; lower it",
                    self.rank,
                    t.module,
                    t.out_features,
                    t.in_features
                );
            }
        }
        for t in &targets {
            self.method.check_target(self, t)?;
        }
        Ok(targets)
    }

    /// The exact number of trainable elements on `model`, from the shapes alone.
    pub fn param_count(&self, model: &LlamaConfig) -> Result<usize> {
        let targets = self.checked_targets(model)?;
        Ok(self.method.trainable_count(self, &targets))
    }

    /// The `[adapter]` table: shared keys, then the method's.
    fn to_table(&self) -> toml::Table {
        let mut t = toml::Table::new();
        t.insert("kind".into(), self.kind().into());
        t.insert(
            "rank".into(),
            i64::try_from(self.rank).unwrap_or(i64::MAX).into(),
        );
        t.insert("alpha".into(), self.alpha.into());
        t.insert("dropout".into(), self.dropout.into());
        let targets: Vec<toml::Value> = self.targets.iter().map(|s| s.as_str().into()).collect();
        t.insert("targets".into(), targets.into());
        if let Some(dir) = &self.init_from {
            t.insert("init_from".into(), dir.as_str().into());
        }
        t.extend(self.method.to_table());
        t
    }

    /// Reads an `[adapter]` table: the shared keys with their defaults, the rest by the method
    /// `kind` names. A key of another method is named with the method it belongs to.
    fn from_table(mut table: toml::Table) -> Result<Self> {
        let default = Self::default();
        let kind: String = take(&mut table, "kind")?.unwrap_or_else(|| default.kind().into());
        let reg = registry::by_kind(&kind)
            .map_err(|e| anyhow::anyhow!("adapter.kind = {kind:?}: {e}"))?;
        let cfg = Self {
            rank: take(&mut table, "rank")?.unwrap_or(default.rank),
            alpha: take(&mut table, "alpha")?.unwrap_or(default.alpha),
            dropout: take(&mut table, "dropout")?.unwrap_or(default.dropout),
            // Unset, the method's own (Tied-LoRA: q, k, v), as `prolora params` takes them.
            targets: take(&mut table, "targets")?
                .unwrap_or_else(|| reg.default_targets.iter().map(|s| s.to_string()).collect()),
            init_from: take(&mut table, "init_from")?,
            method: method_options(reg, table)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Removes `key` from `table` and reads it as a `T`, naming the key if it does not fit.
fn take<T: DeserializeOwned>(table: &mut toml::Table, key: &str) -> Result<Option<T>> {
    match table.remove(key) {
        None => Ok(None),
        Some(v) => match v.clone().try_into() {
            Ok(t) => Ok(Some(t)),
            Err(e) => bail!("adapter.{key} = {v}: {}", e.message()),
        },
    }
}

/// The method's options from its keys; on failure, the first key at fault (in file order),
/// and the method it belongs to if it belongs to another.
fn method_options(reg: &Registration, keys: toml::Table) -> Result<Box<dyn Method>> {
    let whole = match (reg.from_toml)(keys.clone()) {
        Ok(m) => return Ok(m),
        Err(e) => e,
    };
    for (key, value) in &keys {
        let alone = toml::Table::from_iter([(key.clone(), value.clone())]);
        let Err(e) = (reg.from_toml)(alone.clone()) else {
            continue;
        };
        if let Some(owner) = METHODS
            .iter()
            .find(|m| m.kind != reg.kind && (m.from_toml)(alone.clone()).is_ok())
        {
            bail!(
                "adapter.{key} applies to kind = \"{}\" only (this is kind = \"{}\"): remove it",
                owner.kind,
                reg.kind
            );
        }
        bail!("adapter.{key} = {value}: {}", e.message());
    }
    bail!("adapter (kind = \"{}\"): {}", reg.kind, whole.message())
}

impl Serialize for AdapterConfig {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_table().serialize(s)
    }
}

impl<'de> Deserialize<'de> for AdapterConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let table = toml::Table::deserialize(d)?;
        Self::from_table(table).map_err(|e| D::Error::custom(format!("{e:#}")))
    }
}
