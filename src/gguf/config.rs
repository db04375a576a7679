//! A LLaMA model's hyperparameters from GGUF metadata (`llama.*`, `tokenizer.ggml.*`), as
//! transformers' GGUF loader maps them, written as the `config.json` transformers would save.

use super::read::GgufFile;
use crate::model::LlamaConfig;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value as Json};

/// The architectures whose tensors and hyperparameters this loader knows.
const ARCHITECTURES: [&str; 1] = ["llama"];

/// transformers' `config.json` of the model in `file`.
pub fn hf_config(file: &GgufFile) -> Result<Json> {
    let meta = file.metadata();
    let path = file.path().display();
    let arch = meta.str("general.architecture")?;
    if !ARCHITECTURES.contains(&arch) {
        bail!(
            "{path}: general.architecture is {arch:?}; only LLaMA-architecture GGUF files \
             ({}) can be loaded",
            ARCHITECTURES.join(", ")
        );
    }
    let key = |k: &str| format!("{arch}.{k}");
    if let Some(n) = meta.opt_u64(&key("expert_count"))?.filter(|&n| n > 0) {
        bail!("{path}: a mixture of experts ({arch}.expert_count = {n}) is not supported");
    }
    if file.tensor("rope_freqs.weight").is_some() {
        bail!(
            "{path}: per-frequency RoPE factors (rope_freqs.weight, LLaMA-3.1 long-context \
             scaling) are not supported"
        );
    }
    let hidden = meta.u64(&key("embedding_length"))?;
    let heads = meta.u64(&key("attention.head_count"))?;
    let kv_heads = meta
        .opt_u64(&key("attention.head_count_kv"))?
        .unwrap_or(heads);
    if heads == 0 {
        bail!("{path}: {arch}.attention.head_count is 0");
    }
    let head_dim = match meta.opt_u64(&key("attention.key_length"))? {
        Some(d) => d,
        None => hidden / heads,
    };
    if let Some(rot) = meta.opt_u64(&key("rope.dimension_count"))? {
        if rot != head_dim {
            bail!(
                "{path}: {arch}.rope.dimension_count is {rot}, the head size {head_dim}: \
                 partial rotary embeddings are not supported"
            );
        }
    }
    // The token list is the vocabulary (llama.vocab_size is optional and, where present, the
    // same number); without one, the embedding's rows.
    let vocab = match meta.get("tokenizer.ggml.tokens") {
        Some(_) => meta.array("tokenizer.ggml.tokens")?.len() as u64,
        None => match meta.opt_u64(&key("vocab_size"))? {
            Some(v) => v,
            None => file
                .require_tensor("token_embd.weight")?
                .dims
                .get(1)
                .copied()
                .unwrap_or(0),
        },
    };
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta.u64(&key("feed_forward_length"))?,
        "num_hidden_layers": meta.u64(&key("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": meta.f64(&key("attention.layer_norm_rms_epsilon"))?,
        "rope_theta": meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10000.0),
        "max_position_embeddings": meta.opt_u64(&key("context_length"))?.unwrap_or(4096),
        "tie_word_embeddings": file.tensor("output.weight").is_none(),
        "hidden_act": "silu",
    });
    match meta.opt_str(&key("rope.scaling.type"))? {
        None | Some("none") => {}
        Some("linear") => {
            config["rope_scaling"] = json!({
                "rope_type": "linear",
                "factor": meta.f64(&key("rope.scaling.factor"))?,
            })
        }
        Some(other) => bail!("{path}: {arch}.rope.scaling.type {other:?} is not supported"),
    }
    for (ours, theirs) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = meta.opt_u64(theirs)? {
            config[ours] = json!(id);
        }
    }
    Ok(config)
}

/// The model's config.
pub fn llama_config(file: &GgufFile) -> Result<LlamaConfig> {
    LlamaConfig::from_json(&hf_config(file)?.to_string())
        .with_context(|| format!("{}: not a usable LLaMA model", file.path().display()))
}
