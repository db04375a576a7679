//! `prolora export --format gguf-lora`: the adapter as the GGUF LoRA that llama.cpp's
//! `convert_lora_to_gguf.py` writes from the equivalent PEFT LoRA, for `llama-server --lora`,
//! `llama-cli --lora` and ollama's `ADAPTER`.
//!
//! llama.cpp adds `scale · B·(A·x)` with `scale = adapter.lora.alpha / r` (r from each B's
//! shape) times the strength the user picks (1 by default); the factors carry the whole ΔW
//! and alpha = r, so the scale is that strength. Its LLaMA weights store each head's q/k rows
//! in the interleaved order of its RoPE, so B's rows of q and k are permuted the same way.

use super::lora_equivalent;
use crate::adapters::peft;
use crate::gguf::weights::{gguf_name, permute_rows};
use crate::gguf::write::{self, TensorData};
use crate::gguf::Value;
use crate::model::config::linear_path;
use crate::model::LlamaConfig;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// Writes the adapter in `adapter_dir` (any kind) for `model` to the GGUF file `out`.
pub fn export_gguf_lora(adapter_dir: &Path, model: &LlamaConfig, out: &Path) -> Result<()> {
    let set = peft::load(adapter_dir, model, DType::F32, &Device::Cpu)?;
    let (rank, factors) = lora_equivalent(&set)?;
    let mut tensors = Vec::with_capacity(2 * factors.len());
    for (t, a, b) in factors {
        let checkpoint_name = format!("model.layers.{}.{}.weight", t.layer, linear_path(t.module));
        let name = gguf_name(&checkpoint_name)
            .with_context(|| format!("no GGUF tensor name for {checkpoint_name}"))?;
        let mut lora_b = f32_tensor(format!("{name}.lora_b"), &b)?;
        let heads = match t.module {
            "q_proj" => Some(model.num_attention_heads),
            "k_proj" => Some(model.num_key_value_heads),
            _ => None,
        };
        if let Some(heads) = heads {
            lora_b.bytes = permute_rows(&lora_b.bytes, lora_b.shape[0], heads);
        }
        tensors.push(f32_tensor(format!("{name}.lora_a"), &a)?);
        tensors.push(lora_b);
    }
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        ("general.type", Value::String("adapter".into())),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(rank as f32)),
        // gguf-py writes it into every file it makes; llama.cpp reads it for quantized types.
        ("general.quantization_version", Value::U32(2)),
    ]
    .map(|(k, v)| (k.to_string(), v));
    write::write(out, &metadata, &tensors)
}

fn f32_tensor(name: String, t: &Tensor) -> Result<TensorData> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(TensorData::f32(name, t.dims().to_vec(), &values))
}
