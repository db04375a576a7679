//! Helpers shared by the integration tests.

use candle_core::{DType, Device, Tensor};
use prolora::adapters::{AdapterConfig, AdapterSet};
use prolora::model::nf4::Quantization;
use prolora::model::weights::RandomWeights;
use prolora::model::{Llama, LlamaConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// A tiny f64 model (block linears stored as `quant`) with an adapter of `cfg` everywhere it
/// applies and every adapter tensor random (so B-like factors are non-zero and every tensor
/// has a gradient).
pub fn tiny_f64_model(cfg: &AdapterConfig, quant: Quantization) -> (Llama, AdapterSet) {
    let model_cfg = LlamaConfig::from_json(
        r#"{"vocab_size": 11, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
            "rope_theta": 100.0, "tie_word_embeddings": false}"#,
    )
    .unwrap();
    let mut model = Llama::load_quantized(
        &model_cfg,
        &RandomWeights::new(3),
        DType::F64,
        quant,
        &Device::Cpu,
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let set = AdapterSet::new(cfg, &model_cfg, DType::F64, &Device::Cpu, &mut rng).unwrap();
    for var in set.tensors().into_iter().map(|p| p.var) {
        let v: Vec<f64> = prolora::adapters::uniform(var.elem_count(), 0.5, &mut rng)
            .into_iter()
            .map(f64::from)
            .collect();
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    set.attach_to(&mut model);
    (model, set)
}

/// LoRA (rank 2, α 4) with dropout `dropout` on every linear of a full-precision tiny model.
#[allow(dead_code)] // not every test binary uses every helper
pub fn tiny_lora_model(dropout: f64) -> (Llama, AdapterSet) {
    let cfg = AdapterConfig {
        rank: 2,
        alpha: 4.0,
        dropout,
        ..Default::default()
    };
    tiny_f64_model(&cfg, Quantization::None)
}
