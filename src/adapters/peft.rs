//! Adapters on disk in PEFT's layout: `adapter_model.safetensors` + `adapter_config.json`.
//! LoRA and VeRA files are PEFT's own (`peft.PeftModel.from_pretrained` reads ours and we read
//! PEFT's); PRoLoRA (`"peft_type": "PROLORA"`) and Tied-LoRA (`"TIED_LORA"`) use the same
//! layout with their own keys (docs/adapters.md). The keys every method shares are read and
//! written here; each method reads and writes its own ([`Method::peft_keys`], `from_peft`).
//!
//! [`Method::peft_keys`]: super::Method::peft_keys

use super::method::PeftKeys;
use super::{adapter_dtype, registry, AdapterConfig, AdapterSet};
use crate::atomic;
use crate::model::config::BLOCK_LINEARS;
use crate::model::{Llama, LlamaConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const CONFIG_FILE: &str = "adapter_config.json";

/// Writes `set` to `dir` (created if needed), each file atomically.
pub fn save(dir: &Path, set: &AdapterSet, base_model: &str) -> Result<()> {
    let tensors = set
        .tensors()
        .into_iter()
        .map(|p| Ok((p.name, p.var.as_tensor().to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    write_adapter(dir, &tensors, &config_json(&set.cfg, base_model))
}

/// Writes an adapter directory from its tensors and config.
pub fn write_adapter(dir: &Path, tensors: &HashMap<String, Tensor>, config: &Value) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    atomic::write_safetensors(&dir.join(WEIGHTS_FILE), tensors, None)?;
    atomic::write(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(config)?.as_bytes(),
    )
}

/// `adapter_config.json` for `cfg`: the shared keys, then the method's.
pub fn config_json(cfg: &AdapterConfig, base_model: &str) -> Value {
    let mut c = json!({
        "peft_type": cfg.method.registration().peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "target_modules": cfg.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "revision": null,
    });
    if let (Value::Object(c), Value::Object(own)) = (&mut c, cfg.method.peft_keys(cfg)) {
        c.extend(own);
    }
    c
}

/// Reads the adapter in `dir` and attaches it to `model`.
pub fn load_into(dir: &Path, model: &mut Llama) -> Result<AdapterSet> {
    let set = load(
        dir,
        &model.cfg,
        adapter_dtype(model.dtype()),
        model.device(),
    )?;
    set.attach_to(model);
    Ok(set)
}

/// Reads the adapter in `dir` for a model of shape `model`. Every tensor of the file must be
/// used, and every tensor the config implies must be there with its shape.
pub fn load(dir: &Path, model: &LlamaConfig, dtype: DType, device: &Device) -> Result<AdapterSet> {
    let cfg = read_config(dir)?;
    // A fresh set has every tensor at its shape; the file's values then replace the init.
    let set = AdapterSet::new(&cfg, model, dtype, device, &mut StdRng::seed_from_u64(0))
        .with_context(|| format!("{}", dir.join(CONFIG_FILE).display()))?;
    restore_values(&dir.join(WEIGHTS_FILE), &set)?;
    Ok(set)
}

/// Sets every tensor of `set` (frozen shared ones included) from the same-named tensor of the
/// adapter file `weights_path`. A missing tensor, another shape, or a tensor the set has no
/// place for is an error naming it.
pub fn restore_values(weights_path: &Path, set: &AdapterSet) -> Result<()> {
    let mut tensors = candle_core::safetensors::load(weights_path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", weights_path.display()))?;
    for p in set.tensors() {
        let (key, var) = (p.name, p.var);
        let Some(t) = tensors.remove(&key) else {
            bail!("{}: tensor {key} is missing", weights_path.display());
        };
        if t.dims() != var.dims() {
            bail!(
                "{}: tensor {key} has shape {:?}, the model needs {:?} (adapter for another model?)",
                weights_path.display(),
                t.dims(),
                var.dims()
            );
        }
        crate::model::weights::check_finite(&key, &t)
            .with_context(|| weights_path.display().to_string())?;
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    if let Some(key) = tensors.keys().min() {
        bail!(
            "{}: tensor {key} does not belong to a {} adapter on {:?} of this model",
            weights_path.display(),
            set.cfg.kind(),
            set.cfg.targets
        );
    }
    Ok(())
}

/// The raw `adapter_config.json` of `dir`.
fn read_json(dir: &Path) -> Result<Value> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).with_context(|| {
        format!(
            "cannot read {} (is {} an adapter directory?)",
            config_path.display(),
            dir.display()
        )
    })?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", config_path.display()))
}

/// The adapter config of `dir`, any kind.
pub fn read_config(dir: &Path) -> Result<AdapterConfig> {
    parse_config(&read_json(dir)?).with_context(|| format!("{}", dir.join(CONFIG_FILE).display()))
}

/// The base model recorded in an adapter's config, if any.
pub fn base_model_of(dir: &Path) -> Option<String> {
    read_json(dir)
        .ok()?
        .get("base_model_name_or_path")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(String::from)
}

/// The `lora_alpha` an adapter directory was saved with, if its method has one.
pub fn alpha_of(dir: &Path) -> Result<Option<f64>> {
    PeftKeys(&read_json(dir)?).get("lora_alpha")
}

/// The parts of a PEFT config we implement; anything that would change the math and that we
/// do not implement is an error rather than silently ignored. Optional keys absent or `null`
/// take their defaults.
pub fn parse_config(raw: &Value) -> Result<AdapterConfig> {
    let keys = PeftKeys(raw);
    let peft_type: String = keys.require("peft_type")?;
    let reg = registry::by_peft_type(&peft_type)?;
    if keys.or("fan_in_fan_out", false)? {
        bail!("\"fan_in_fan_out\": true is not supported");
    }
    for key in ["layers_to_transform", "modules_to_save"] {
        if keys.get::<Value>(key)?.is_some() {
            bail!("\"{key}\" is not supported (must be null)");
        }
    }
    let bias: String = keys.or("bias", "none".into())?;
    if bias != "none" {
        bail!("\"bias\": {bias:?} is not supported (only \"none\")");
    }
    let targets = match raw.get("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => {
            BLOCK_LINEARS.iter().map(|s| s.to_string()).collect()
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        None | Some(Value::Null) => bail!("\"target_modules\" is required"),
        Some(other) => bail!(
            "\"target_modules\" must be a list of module names or \"all-linear\", got {other}"
        ),
    };
    let read = (reg.from_peft)(&keys)?;
    let default = AdapterConfig::default();
    let cfg = AdapterConfig {
        rank: keys.require("r")?,
        alpha: read.alpha.unwrap_or(default.alpha),
        dropout: read.dropout,
        targets,
        init_from: None,
        method: read.method,
    };
    cfg.validate()?;
    Ok(cfg)
}
