//! Helpers shared by the integration tests.

use candle_core::{DType, Device, Tensor};
use prolora::adapters::AdapterConfig;
use prolora::model::nf4::Quantization;
use prolora::model::weights::RandomWeights;
use prolora::model::{Llama, LlamaConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// A tiny f64 model (block linears stored as `quant`) with LoRA (dropout `dropout`) on every
/// linear and non-zero B, so every adapter tensor has a gradient.
pub fn tiny_f64_model_with(quant: Quantization, dropout: f64) -> Llama {
    let cfg = LlamaConfig::from_json(
        r#"{"vocab_size": 11, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
            "rope_theta": 100.0, "tie_word_embeddings": false}"#,
    )
    .unwrap();
    let mut model = Llama::load_quantized(
        &cfg,
        &RandomWeights::new(3),
        DType::F64,
        quant,
        &Device::Cpu,
    )
    .unwrap();
    let adapter = AdapterConfig {
        rank: 2,
        alpha: 4.0,
        dropout,
        ..Default::default()
    };
    let mut rng = StdRng::seed_from_u64(7);
    model
        .attach(|_, _, shape| {
            Ok(Some(adapter.build(
                shape,
                DType::F64,
                &Device::Cpu,
                &mut rng,
            )?))
        })
        .unwrap();
    for (name, var) in model.trainable() {
        if name.ends_with("lora_B.weight") {
            let v: Vec<f64> = prolora::adapters::uniform(var.elem_count(), 0.5, &mut rng)
                .into_iter()
                .map(f64::from)
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    model
}

#[allow(dead_code)] // not every test binary uses every helper
pub fn tiny_f64_model_with_dropout(dropout: f64) -> Llama {
    tiny_f64_model_with(Quantization::None, dropout)
}

#[allow(dead_code)]
pub fn tiny_f64_model(quant: Quantization) -> Llama {
    tiny_f64_model_with(quant, 0.0)
}
