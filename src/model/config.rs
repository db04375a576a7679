//! `config.json` of a LLaMA-family model, in both layouts users have: the Hub's LLaMA-2 files
//! (`rope_theta` at the top level, `torch_dtype`) and transformers ≥ 5 (`rope_parameters`,
//! `dtype`, `head_dim`).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How RoPE frequencies are rescaled for long context.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    /// LLaMA-3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    /// The dtype the checkpoint was saved in, as written in the file (informational).
    pub torch_dtype: Option<String>,
}

/// The raw file: every field optional where one of the layouts omits it.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
}

/// The first id of a field that may be one id or a list of ids.
fn first_id(v: &Option<serde_json::Value>, default: u32) -> u32 {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map_or(default, |n| n as u32),
        Some(serde_json::Value::Array(a)) => a
            .first()
            .and_then(|x| x.as_u64())
            .map_or(default, |n| n as u32),
        _ => default,
    }
}

fn parse_rope_scaling(v: &serde_json::Value) -> Result<RopeScaling> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        v.get(key)
            .and_then(|x| x.as_f64())
            .with_context(|| format!("rope scaling of type {kind:?} needs a numeric `{key}`"))
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => bail!(
            "rope scaling type {other:?} is not supported (supported: default, linear, llama3)"
        ),
    })
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json(&text)
            .with_context(|| format!("{}: not a usable LLaMA config", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text)?;
        if let Some(t) = &raw.model_type {
            if !matches!(t.as_str(), "llama" | "mistral" | "qwen2" | "llama2") {
                bail!("model_type {t:?} is not a LLaMA-family decoder");
            }
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                bail!("hidden_act {act:?} is not supported (LLaMA uses \"silu\")");
            }
        }
        if raw.attention_bias == Some(true) || raw.mlp_bias == Some(true) {
            bail!("linear biases (attention_bias / mlp_bias) are not supported");
        }
        if raw.num_attention_heads == 0
            || raw.hidden_size % raw.num_attention_heads != 0 && raw.head_dim.is_none()
        {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                raw.hidden_size,
                raw.num_attention_heads
            );
        }
        let kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if kv_heads == 0 || raw.num_attention_heads % kv_heads != 0 {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv_heads}",
                raw.num_attention_heads
            );
        }
        // transformers ≥ 5 keeps theta and scaling together in `rope_parameters`.
        let (rope_theta, rope_scaling) = match &raw.rope_parameters {
            Some(p) => (
                p.get("rope_theta")
                    .and_then(|t| t.as_f64())
                    .or(raw.rope_theta),
                parse_rope_scaling(p)?,
            ),
            None => (
                raw.rope_theta,
                match &raw.rope_scaling {
                    Some(v) if !v.is_null() => parse_rope_scaling(v)?,
                    _ => RopeScaling::None,
                },
            ),
        };
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if head_dim % 2 != 0 {
            bail!("head_dim {head_dim} must be even for rotary embeddings");
        }
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope_theta.unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: first_id(&raw.bos_token_id, 1),
            eos_token_id: first_id(&raw.eos_token_id, 2),
            torch_dtype: raw.torch_dtype.or(raw.dtype),
        })
    }

    /// Output features of the k and v projections.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Output features of the q projection.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// (out, in) of a linear in a decoder block, by its module name.
    pub fn linear_shape(&self, module: &str) -> Option<(usize, usize)> {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        Some(match module {
            "q_proj" => (self.q_dim(), d),
            "k_proj" | "v_proj" => (self.kv_dim(), d),
            "o_proj" => (d, self.q_dim()),
            "gate_proj" | "up_proj" => (f, d),
            "down_proj" => (d, f),
            _ => return None,
        })
    }

    /// RoPE inverse frequencies (length head_dim / 2), after any scaling.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim;
        let base: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        match self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_len,
            } => {
                let low_wavelen = old_len / low_freq_factor;
                let high_wavelen = old_len / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                        if medium {
                            let smooth = (old_len / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }
}

/// The linears of a decoder block, in the order PEFT lists them.
pub const BLOCK_LINEARS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The module path of a block linear, as in the checkpoint (`self_attn.q_proj`, `mlp.up_proj`).
pub fn linear_path(module: &str) -> String {
    let group = if module.ends_with("_proj")
        && matches!(module, "q_proj" | "k_proj" | "v_proj" | "o_proj")
    {
        "self_attn"
    } else {
        "mlp"
    };
    format!("{group}.{module}")
}
