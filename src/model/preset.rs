//! Built-in model shapes: `tiny` (seeded random weights, for the demo and the tests) and the
//! LLaMA-2 shapes (for parameter reports and benchmarks; random weights in NF4).

use super::config::{LlamaConfig, RopeScaling};
use super::nf4::Quantization;

/// The names `--model` accepts without a download.
pub const PRESETS: [&str; 4] = ["tiny", "llama2-7b", "llama2-13b", "llama2-70b"];

/// The LLaMA-2 tokenizer, shipped inside the binary so the presets need no files.
pub const LLAMA2_TOKENIZER_JSON: &[u8] = include_bytes!("../../assets/llama2-tokenizer.json");

fn llama2(hidden: usize, intermediate: usize, layers: usize, heads: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 32000,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: heads,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 4096,
        tie_word_embeddings: false,
        bos_token_id: 1,
        eos_token_id: 2,
        torch_dtype: Some("float32".into()),
    }
}

/// The config of a preset, or None for an unknown name.
pub fn preset(name: &str) -> Option<LlamaConfig> {
    Some(match name {
        // LLaMA-2's vocabulary and block structure at toy width, with grouped-query attention.
        "tiny" => LlamaConfig {
            num_key_value_heads: 2,
            ..llama2(128, 344, 4, 4)
        },
        "llama2-7b" => llama2(4096, 11008, 32, 32),
        "llama2-13b" => llama2(5120, 13824, 40, 40),
        "llama2-70b" => LlamaConfig {
            num_key_value_heads: 8,
            ..llama2(8192, 28672, 80, 64)
        },
        _ => return None,
    })
}

/// Whether a preset has random weights in this storage: `tiny` always; the LLaMA-2 shapes only
/// in 4 bits, drawn directly in NF4 (in full precision they would not fit a laptop).
pub fn has_weights(name: &str, quant: Quantization) -> bool {
    name == "tiny" || quant != Quantization::None
}
