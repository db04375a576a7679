//! Adapters on disk in PEFT's layout: `adapter_model.safetensors` + `adapter_config.json`,
//! so `peft.PeftModel.from_pretrained` reads ours and we read PEFT's.

use super::{AdapterConfig, Lora};
use crate::model::config::linear_path;
use crate::model::Llama;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const CONFIG_FILE: &str = "adapter_config.json";

/// Writes the model's adapter to `dir` (created if needed). Each file is written to a
/// temporary name and renamed, so a crash never leaves a half-written adapter behind.
pub fn save(dir: &Path, model: &Llama, cfg: &AdapterConfig, base_model: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors: HashMap<String, Tensor> = model
        .trainable()
        .into_iter()
        .map(|(name, var)| Ok((name, var.as_tensor().to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let weights = dir.join(WEIGHTS_FILE);
    let tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
    candle_core::safetensors::save(&tensors, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &weights)?;

    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        // PEFT types lora_alpha as an int; keep whole numbers integral.
        "lora_alpha": if cfg.alpha.fract() == 0.0 { json!(cfg.alpha as i64) } else { json!(cfg.alpha) },
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    write_atomic(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Reads a PEFT LoRA adapter from `dir` and attaches it to `model`. Every tensor of the file
/// must be used and every adapted layer must be present.
pub fn load_into(dir: &Path, model: &mut Llama) -> Result<AdapterConfig> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).with_context(|| {
        format!(
            "cannot read {} (is {} an adapter directory?)",
            config_path.display(),
            dir.display()
        )
    })?;
    let raw: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", config_path.display()))?;
    let cfg = lora_config(&raw).with_context(|| format!("{}", config_path.display()))?;

    let weights_path = dir.join(WEIGHTS_FILE);
    let mut tensors = candle_core::safetensors::load(&weights_path, model.device())
        .with_context(|| format!("cannot read {}", weights_path.display()))?;
    let dtype = if model.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let mut missing = None;
    model.attach(|layer, module, (out_f, in_f)| {
        if !cfg.targets.iter().any(|t| t == module) {
            return Ok(None);
        }
        let prefix = format!("base_model.model.model.layers.{layer}.{}", linear_path(module));
        let mut take = |suffix: &str, shape: [usize; 2]| -> Result<Option<Tensor>> {
            let key = format!("{prefix}.{suffix}");
            match tensors.remove(&key) {
                None => {
                    missing.get_or_insert(key);
                    Ok(None)
                }
                Some(t) if t.dims() != shape => bail!(
                    "{}: tensor {key} has shape {:?}, the model needs {shape:?} (adapter for another model?)",
                    weights_path.display(),
                    t.dims()
                ),
                Some(t) => Ok(Some(t.to_dtype(dtype)?)),
            }
        };
        let a = take("lora_A.weight", [cfg.rank, in_f])?;
        let b = take("lora_B.weight", [out_f, cfg.rank])?;
        match (a, b) {
            (Some(a), Some(b)) => Ok(Some(Box::new(Lora::from_tensors(a, b, cfg.alpha, cfg.dropout)?) as _)),
            _ => Ok(None),
        }
    })?;
    if let Some(key) = missing {
        bail!("{}: tensor {key} is missing", weights_path.display());
    }
    if let Some(key) = tensors.keys().min() {
        bail!(
            "{}: tensor {key} does not belong to a LoRA on {:?} of this model",
            weights_path.display(),
            cfg.targets
        );
    }
    Ok(cfg)
}

/// The parts of a PEFT `LoraConfig` we implement; anything that would change the math and
/// that we do not implement is an error rather than silently ignored.
fn lora_config(raw: &serde_json::Value) -> Result<AdapterConfig> {
    let peft_type = raw.get("peft_type").and_then(|v| v.as_str()).unwrap_or("");
    if peft_type != "LORA" {
        bail!("peft_type {peft_type:?} is not supported here (expected \"LORA\")");
    }
    let rank = raw
        .get("r")
        .and_then(|v| v.as_u64())
        .context("missing integer \"r\"")? as usize;
    let alpha = raw
        .get("lora_alpha")
        .and_then(|v| v.as_f64())
        .context("missing number \"lora_alpha\"")?;
    let dropout = raw
        .get("lora_dropout")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0);
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
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        Some(serde_json::Value::String(s)) if s == "all-linear" => {
            crate::model::config::BLOCK_LINEARS
                .iter()
                .map(|s| s.to_string())
                .collect()
        }
        other => bail!("\"target_modules\" must be a list of module names, got {other:?}"),
    };
    let cfg = AdapterConfig {
        kind: "lora".into(),
        rank,
        alpha,
        dropout,
        targets,
        init_from: None,
    };
    cfg.validate()?;
    Ok(cfg)
}
