//! `prolora quantize`: writes a model with its block linears in NF4, in bitsandbytes' serialized
//! layout (what transformers' `save_pretrained` writes for `load_in_4bit`), so it loads both here
//! and with `from_pretrained`. Embeddings, norms and the head keep the checkpoint's dtype.

use crate::atomic;
use crate::model::config::{linear_path, BLOCK_LINEARS};
use crate::model::preset::LLAMA2_TOKENIZER_JSON;
use crate::model::{bnb, LlamaConfig};
use crate::source::{parse_dtype, ModelSource, Origin};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// What was written.
pub struct QuantizeSummary {
    pub tensors: usize,
    pub bytes: u64,
}

/// Quantizes `source` into the directory `out`, built whole beside it and swapped in at the end:
/// `model.safetensors`, `config.json` with `quantization_config`, and the tokenizer files.
pub fn quantize_model(
    source: &ModelSource,
    out: &Path,
    double_quant: bool,
) -> Result<QuantizeSummary> {
    let mut summary = None;
    atomic::write_dir(out, |dir| {
        summary = Some(write_quantized(source, dir, double_quant)?);
        Ok(())
    })?;
    Ok(summary.expect("written"))
}

/// Writes a preset as a full-precision transformers checkpoint into the directory `out` (which
/// exists): what `merge` adds an adapter to when the model is a preset.
pub fn write_preset(source: &ModelSource, out: &Path) -> Result<()> {
    write_model(source, out, None).map(|_| ())
}

fn write_quantized(
    source: &ModelSource,
    out: &Path,
    double_quant: bool,
) -> Result<QuantizeSummary> {
    write_model(source, out, Some(double_quant))
}

/// The model's tensors, its block linears in NF4 (with double quantization or not) or as they
/// are, with its config and tokenizer.
fn write_model(source: &ModelSource, out: &Path, nf4: Option<bool>) -> Result<QuantizeSummary> {
    let cfg = &source.config;
    let weights = source.weights()?;
    let dtype = cfg
        .torch_dtype
        .as_deref()
        .map(parse_dtype)
        .transpose()?
        .unwrap_or(DType::F32);
    let dev = &Device::Cpu;
    let (v, d) = (cfg.vocab_size, cfg.hidden_size);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let dense = |tensors: &mut HashMap<String, Tensor>, name: String, shape: &[usize]| {
        tensors.insert(name.clone(), weights.get(&name, shape, dtype, dev)?);
        anyhow::Ok(())
    };
    // Read in the order `Llama::load_quantized` reads, so a preset's seeded draws (taken in
    // reading order) give the same model here as in training.
    dense(&mut tensors, "model.embed_tokens.weight".into(), &[v, d])?;
    for l in 0..cfg.num_hidden_layers {
        dense(
            &mut tensors,
            format!("model.layers.{l}.input_layernorm.weight"),
            &[d],
        )?;
        dense(
            &mut tensors,
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            &[d],
        )?;
        for m in BLOCK_LINEARS {
            let (o, i) = cfg.linear_shape(m).expect("a block linear");
            let name = format!("model.layers.{l}.{}.weight", linear_path(m));
            match nf4 {
                Some(double_quant) => {
                    let q = weights.get_nf4(&name, &[o, i], double_quant)?;
                    tensors.extend(bnb::write(&name, &q)?);
                }
                None => dense(&mut tensors, name, &[o, i])?,
            }
        }
    }
    dense(&mut tensors, "model.norm.weight".into(), &[d])?;
    if !cfg.tie_word_embeddings || weights.contains("lm_head.weight") {
        dense(&mut tensors, "lm_head.weight".into(), &[v, d])?;
    }
    let st = out.join("model.safetensors");
    atomic::write_safetensors(&st, &tensors, None)?;
    let mut config = match &source.origin {
        Origin::Dir(dir) => {
            let p = dir.join("config.json");
            serde_json::from_str(&std::fs::read_to_string(&p)?)
                .with_context(|| format!("{}: not valid JSON", p.display()))?
        }
        Origin::Preset(_) => hf_config(cfg),
        Origin::Gguf(path) => crate::gguf::config::hf_config(&crate::gguf::GgufFile::open(path)?)?,
    };
    if let Some(double_quant) = nf4 {
        config["quantization_config"] = bnb::quantization_config(double_quant, "float32");
    }
    atomic::write(
        &out.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    match &source.origin {
        Origin::Dir(dir) => {
            for f in [
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "generation_config.json",
                "chat_template.jinja",
            ] {
                if dir.join(f).exists() {
                    atomic::copy(&dir.join(f), &out.join(f))?;
                }
            }
        }
        Origin::Preset(_) => atomic::write(&out.join("tokenizer.json"), LLAMA2_TOKENIZER_JSON)?,
        Origin::Gguf(path) => {
            crate::gguf::tokenizer::write_files(path, out)?;
            // The special tokens, which a tokenizer.json alone does not name.
            let (tokenizer_config, generation_config) =
                crate::tokenizer::ModelTokenizer::from_gguf(path)?.configs();
            for (name, v) in [
                ("tokenizer_config.json", tokenizer_config),
                ("generation_config.json", generation_config),
            ] {
                atomic::write(
                    &out.join(name),
                    serde_json::to_string_pretty(&v)?.as_bytes(),
                )?;
            }
        }
    }
    Ok(QuantizeSummary {
        tensors: tensors.len(),
        bytes: std::fs::metadata(&st)?.len(),
    })
}

/// transformers' `config.json` for a preset (LLaMA-2 layout).
fn hf_config(cfg: &LlamaConfig) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "hidden_act": "silu",
        "torch_dtype": cfg.torch_dtype.clone().unwrap_or_else(|| "float32".into()),
    })
}
