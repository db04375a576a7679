//! Adapters on disk in PEFT's layout: `adapter_model.safetensors` + `adapter_config.json`.
//! LoRA and VeRA files are PEFT's own (`peft.PeftModel.from_pretrained` reads ours and we read
//! PEFT's); PRoLoRA (`"peft_type": "PROLORA"`) and Tied-LoRA (`"TIED_LORA"`) use the same
//! layout with their own keys (docs/adapters.md).

use super::{adapter_dtype, AdapterConfig, AdapterKind, AdapterSet, Axis};
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

/// Writes `set` to `dir` (created if needed). Each file is written to a temporary name and
/// renamed, so a crash never leaves a half-written adapter behind.
pub fn save(dir: &Path, set: &AdapterSet, base_model: &str) -> Result<()> {
    let tensors = set
        .tensors()
        .into_iter()
        .map(|(name, var)| Ok((name, var.as_tensor().to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    write_adapter(dir, &tensors, &config_json(&set.cfg, base_model))
}

/// Writes an adapter directory from its tensors and config.
pub fn write_adapter(dir: &Path, tensors: &HashMap<String, Tensor>, config: &Value) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let weights = dir.join(WEIGHTS_FILE);
    let tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
    candle_core::safetensors::save(tensors, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &weights)?;
    write_atomic(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(config)?.as_bytes(),
    )
}

/// PEFT types lora_alpha as an int; keep whole numbers integral.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// `adapter_config.json` for `cfg`.
pub fn config_json(cfg: &AdapterConfig, base_model: &str) -> Value {
    let mut c = json!({
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
    let extra = match cfg.kind {
        AdapterKind::Lora => json!({
            "peft_type": "LORA",
            "lora_alpha": number(cfg.alpha),
            "lora_dropout": cfg.dropout,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "rank_pattern": {},
            "alpha_pattern": {},
        }),
        AdapterKind::Prolora => {
            let o = super::prolora::Options::from_config(cfg).expect("a validated config");
            json!({
                "peft_type": "PROLORA",
                "lora_alpha": number(cfg.alpha),
                "lora_dropout": cfg.dropout,
                "unshared_r": o.unshared,
                "sharing_rate_a": o.rate_a,
                "sharing_rate_b": o.rate_b,
                "rotation": o.rotation,
                "rectified_init": o.rectified_init,
                "share_axis": o.share_axis,
                "rotate_axis": o.rotate_axis,
            })
        }
        AdapterKind::Vera => json!({
            "peft_type": "VERA",
            "vera_dropout": cfg.dropout,
            "d_initial": cfg.d_initial.unwrap_or(0.1),
            "save_projection": true,
            // PEFT regenerates the projections from this key only with torch's PRNG; ours are
            // saved instead (save_projection), so the key is informational.
            "projection_prng_key": 0,
        }),
        AdapterKind::TiedLora => json!({
            "peft_type": "TIED_LORA",
            "lora_alpha": number(cfg.alpha),
            "lora_dropout": cfg.dropout,
        }),
    };
    let (Value::Object(c_map), Value::Object(extra)) = (&mut c, extra) else {
        unreachable!("both are objects")
    };
    c_map.extend(extra);
    c
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Reads the adapter in `dir` and attaches it to `model`.
pub fn load_into(dir: &Path, model: &mut Llama) -> Result<AdapterSet> {
    let set = load(
        dir,
        &model.cfg,
        adapter_dtype(model.dtype()),
        model.device(),
    )?;
    model.attach(&set);
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
    for (key, var) in set.tensors() {
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
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    if let Some(key) = tensors.keys().min() {
        bail!(
            "{}: tensor {key} does not belong to a {} adapter on {:?} of this model",
            weights_path.display(),
            set.cfg.kind,
            set.cfg.targets
        );
    }
    Ok(())
}

/// The adapter config of `dir`, any kind.
pub fn read_config(dir: &Path) -> Result<AdapterConfig> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).with_context(|| {
        format!(
            "cannot read {} (is {} an adapter directory?)",
            config_path.display(),
            dir.display()
        )
    })?;
    let raw: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", config_path.display()))?;
    parse_config(&raw).with_context(|| format!("{}", config_path.display()))
}

/// The base model recorded in an adapter's config, if any.
pub fn base_model_of(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).ok()?;
    let raw: Value = serde_json::from_str(&text).ok()?;
    raw.get("base_model_name_or_path")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(String::from)
}

/// The parts of a PEFT config we implement; anything that would change the math and that we
/// do not implement is an error rather than silently ignored.
fn parse_config(raw: &Value) -> Result<AdapterConfig> {
    let peft_type = raw.get("peft_type").and_then(|v| v.as_str()).unwrap_or("");
    let kind = match peft_type {
        "LORA" => AdapterKind::Lora,
        "PROLORA" => AdapterKind::Prolora,
        "VERA" => AdapterKind::Vera,
        "TIED_LORA" => AdapterKind::TiedLora,
        other => bail!(
            "peft_type {other:?} is not supported (supported: \"LORA\", \"PROLORA\", \"VERA\", \"TIED_LORA\")"
        ),
    };
    let uint = |key: &str| -> Result<usize> {
        raw.get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .with_context(|| format!("missing integer \"{key}\""))
    };
    let float = |key: &str| raw.get(key).and_then(|v| v.as_f64());
    let flag = |key: &str| -> Result<bool> {
        raw.get(key)
            .and_then(|v| v.as_bool())
            .with_context(|| format!("missing boolean \"{key}\""))
    };
    let axis = |key: &str| -> Result<Axis> {
        serde_json::from_value(raw.get(key).cloned().unwrap_or(Value::Null))
            .with_context(|| format!("\"{key}\" must be \"hidden\" or \"rank\""))
    };
    for flag in ["use_rslora", "use_dora", "fan_in_fan_out"] {
        if raw.get(flag).and_then(|v| v.as_bool()) == Some(true) {
            bail!("\"{flag}\": true is not supported");
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if raw
            .get(key)
            .and_then(|v| v.as_object())
            .is_some_and(|m| !m.is_empty())
        {
            bail!("a non-empty \"{key}\" is not supported");
        }
    }
    for key in ["layers_to_transform", "modules_to_save"] {
        if raw.get(key).is_some_and(|v| !v.is_null()) {
            bail!("\"{key}\" is not supported (must be null)");
        }
    }
    if let Some(bias) = raw.get("bias").and_then(|v| v.as_str()) {
        if bias != "none" {
            bail!("\"bias\": {bias:?} is not supported (only \"none\")");
        }
    }
    let targets: Vec<String> = match raw.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        Some(Value::String(s)) if s == "all-linear" => crate::model::config::BLOCK_LINEARS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        other => bail!("\"target_modules\" must be a list of module names, got {other:?}"),
    };
    let mut cfg = AdapterConfig {
        kind,
        rank: uint("r")?,
        targets,
        ..Default::default()
    };
    if kind == AdapterKind::Vera {
        if raw.get("save_projection").and_then(|v| v.as_bool()) != Some(true) {
            bail!(
                "a VeRA adapter saved without its projections (save_projection: false) cannot be \
                 read: PEFT regenerates them with torch's PRNG; re-save it with save_projection=True"
            );
        }
        cfg.dropout = float("vera_dropout").unwrap_or(0.0);
        cfg.d_initial = float("d_initial");
    } else {
        cfg.alpha = float("lora_alpha").context("missing number \"lora_alpha\"")?;
        cfg.dropout = float("lora_dropout").unwrap_or(0.0);
    }
    if kind == AdapterKind::Prolora {
        cfg.unshared_rank = Some(uint("unshared_r")?);
        cfg.sharing_rate_a = Some(uint("sharing_rate_a")?);
        cfg.sharing_rate_b = Some(uint("sharing_rate_b")?);
        cfg.rotation = Some(flag("rotation")?);
        cfg.rectified_init = Some(flag("rectified_init")?);
        cfg.share_axis = Some(axis("share_axis")?);
        cfg.rotate_axis = Some(axis("rotate_axis")?);
    }
    cfg.validate()?;
    Ok(cfg)
}
