//! `prolora export` (any adapter as a plain PEFT LoRA or a llama.cpp GGUF LoRA) and `prolora
//! merge` (W0 + ΔW written as a transformers checkpoint). All go through
//! [`Adapter::lora_factors`], so they work for every method and every model shape.
//!
//! [`Adapter::lora_factors`]: crate::adapters::Adapter::lora_factors

use crate::adapters::{peft, peft_prefix, AdapterConfig, AdapterSet, Target};
use crate::atomic;
use crate::model::config::linear_path;
use crate::model::LlamaConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

mod gguf_lora;

pub use gguf_lora::export_gguf_lora;

/// Writes the adapter in `adapter_dir` (any kind) to `out` as a PEFT LoRA with
/// `lora_alpha = r` (scaling 1) and the same ΔW of every linear: see [`lora_equivalent`].
pub fn export_peft_lora(
    adapter_dir: &Path,
    model: &LlamaConfig,
    base_model: &str,
    out: &Path,
) -> Result<()> {
    let set = peft::load(adapter_dir, model, DType::F32, &Device::Cpu)?;
    let (rank, factors) = lora_equivalent(&set)?;
    let mut tensors = HashMap::new();
    for (t, a, b) in factors {
        let prefix = peft_prefix(t.layer, t.module);
        tensors.insert(format!("{prefix}.lora_A.weight"), a);
        tensors.insert(format!("{prefix}.lora_B.weight"), b);
    }
    let cfg = AdapterConfig {
        rank,
        alpha: rank as f64,
        dropout: set.cfg.dropout,
        targets: set.cfg.targets.clone(),
        ..Default::default()
    };
    let config = peft::config_json(&cfg, base_model);
    atomic::write_dir(out, |dir| peft::write_adapter(dir, &tensors, &config))
}

/// Every adapted linear of `set` as LoRA factors (A (r, in), B (out, r)) of one rank r with
/// `ΔW = B·A` (scaling folded into B: a LoRA file's alpha is then r), and that rank. Formats
/// with one alpha for all linears (PEFT, GGUF) need one rank, so it is the largest any linear
/// needs ([`exact_factors`]); narrower linears get zero rows and columns up to it.
fn lora_equivalent(set: &AdapterSet) -> Result<(usize, Vec<(&Target, Tensor, Tensor)>)> {
    let factors = set
        .linears()
        .map(|(t, adapter)| {
            let (a, b, scaling) = adapter.lora_factors()?;
            let (a, b) = exact_factors(&a, &b, scaling)?;
            Ok((t, a, b))
        })
        .collect::<Result<Vec<_>>>()?;
    let rank = factors
        .iter()
        .map(|(_, a, _)| a.dims()[0])
        .max()
        .context("the adapter adapts no linear")?;
    let padded = factors
        .into_iter()
        .map(|(t, a, b)| {
            let missing = rank - a.dims()[0];
            Ok((
                t,
                a.pad_with_zeros(0, 0, missing)?.contiguous()?,
                b.pad_with_zeros(1, 0, missing)?.contiguous()?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((rank, padded))
}

/// LoRA factors (A, B) with `B·A = scaling · b·a` of rank at most min(r, in, out): the given
/// factors when r is within the shape (B scaled), else ΔW itself on its narrower side beside an
/// identity (ΔW = ΔW·I or I·ΔW: exact up to the f32 rounding of one product). VeRA and
/// Tied-LoRA ranks may exceed a linear's shape; a LoRA's may not.
fn exact_factors(a: &Tensor, b: &Tensor, scaling: f64) -> Result<(Tensor, Tensor)> {
    let (r, inputs) = a.dims2()?;
    let outputs = b.dim(0)?;
    if r <= inputs.min(outputs) {
        return Ok((a.clone(), (b * scaling)?));
    }
    let delta = (b.matmul(a)? * scaling)?;
    Ok(if inputs <= outputs {
        (Tensor::eye(inputs, DType::F32, a.device())?, delta)
    } else {
        (delta, Tensor::eye(outputs, DType::F32, a.device())?)
    })
}

/// ΔW of every adapted linear, keyed by the checkpoint's weight name.
fn deltas(set: &AdapterSet) -> Result<HashMap<String, Tensor>> {
    set.linears()
        .map(|(t, adapter)| {
            let (a, b, scaling) = adapter.lora_factors()?;
            let key = format!("model.layers.{}.{}.weight", t.layer, linear_path(t.module));
            Ok((key, (b.matmul(&a)? * scaling)?))
        })
        .collect()
}

/// Writes `model_dir`'s checkpoint with the adapter merged (`W = W0 + ΔW`, computed in f32 and
/// stored in each weight's own dtype) to `out`: the same shard files and names, every other
/// file of the directory copied, so transformers loads it as it loads the original.
pub fn merge(model_dir: &Path, model: &LlamaConfig, adapter_dir: &Path, out: &Path) -> Result<()> {
    refuse_quantized(model_dir)?;
    let set = peft::load(adapter_dir, model, DType::F32, &Device::Cpu)?;
    let deltas = deltas(&set)?;
    atomic::write_dir(out, |out| merge_into(model_dir, deltas, out))
}

/// A 4-bit checkpoint has no full-precision weights to add ΔW to; say so before any work.
fn refuse_quantized(model_dir: &Path) -> Result<()> {
    let path = model_dir.join("config.json");
    let config: serde_json::Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    if let Some(method) = config["quantization_config"]["quant_method"].as_str() {
        bail!(
            "{} is stored quantized ({method}): merge into the full-precision checkpoint it was \
             quantized from (the adapter applies to it unchanged), then `prolora quantize` that",
            model_dir.display()
        );
    }
    Ok(())
}

fn merge_into(model_dir: &Path, mut deltas: HashMap<String, Tensor>, out: &Path) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(model_dir)
        .with_context(|| format!("cannot read {}", model_dir.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let dest = out.join(entry.file_name());
        if path.extension().is_some_and(|e| e == "safetensors") {
            let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)
                .with_context(|| format!("cannot read {}", path.display()))?;
            for (key, w) in tensors.iter_mut() {
                if let Some(delta) = deltas.remove(key) {
                    *w = (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?;
                }
            }
            // transformers checks this metadata key.
            let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
            atomic::write_safetensors(&dest, &tensors, Some(metadata))?;
        } else {
            atomic::copy(&path, &dest)?;
        }
    }
    if let Some(key) = deltas.keys().min() {
        bail!(
            "{}: no tensor {key} in the checkpoint to merge the adapter into",
            model_dir.display()
        );
    }
    Ok(())
}
