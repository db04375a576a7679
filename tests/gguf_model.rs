//! SmolLM2-135M-Instruct loaded from its Q4_1 GGUF equals transformers' GGUF loader
//! (scripts/reference/make_gguf_model_goldens.py: f32, eager attention): config from the
//! metadata, weights dequantized, Q/K rows unpermuted, tied head.

mod common;

use candle_core::{DType, Device, Tensor};
use prolora::ctx::Ctx;
use prolora::model::nf4::Quantization;
use prolora::source::{ModelSource, Origin};
use serde_json::Value;

fn goldens() -> Value {
    let text = std::fs::read_to_string(common::fixture("gguf/smollm2_logits.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Greatest |ours − theirs| over the probed logits of every golden prompt, and whether every
/// position's argmax agrees.
fn compare(quant: Quantization) -> (f64, bool) {
    let source = ModelSource::resolve(common::smollm2::smollm2_gguf().to_str().unwrap(), "main")
        .unwrap();
    let model = source
        .load_quantized(DType::F32, quant, &Device::Cpu)
        .unwrap();
    let mut worst = 0f64;
    let mut argmax_agrees = true;
    for case in goldens()["cases"].as_array().unwrap() {
        let ids = ids_of(&case["ids"]);
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = model.logits(&input, &Ctx::eval()).unwrap().squeeze(0).unwrap();
        let argmax: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
        argmax_agrees &= argmax == ids_of(&case["argmax"]);
        let last: Vec<f32> = logits.get(ids.len() - 1).unwrap().to_vec1().unwrap();
        let pairs = [("top_ids", "top_logits"), ("probe_ids", "probe_logits")];
        for (idk, vk) in pairs {
            for (id, want) in ids_of(&case[idk]).iter().zip(floats(&case[vk])) {
                worst = worst.max((f64::from(last[*id as usize]) - want).abs());
            }
        }
        let max = last.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let lse = max + last.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
        worst = worst.max((lse - case["logsumexp"].as_f64().unwrap()).abs());
    }
    (worst, argmax_agrees)
}

#[test]
fn config_comes_from_the_metadata() {
    let source = ModelSource::resolve(common::smollm2::smollm2_gguf().to_str().unwrap(), "main")
        .unwrap();
    assert!(matches!(source.origin, Origin::Gguf(_)));
    let c = &source.config;
    assert_eq!(
        (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (49152, 576, 1536, 30)
    );
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (9, 3, 64));
    assert_eq!((c.rope_theta, c.rms_norm_eps), (100000.0, f64::from(1e-5f32)));
    assert_eq!(c.max_position_embeddings, 8192);
    assert!(c.tie_word_embeddings);
    assert_eq!((c.bos_token_id, c.eos_token_id), (1, 2));
}

/// Logits of magnitude up to ~30, both sides in f32 with different summation orders: they
/// agree to 3e-5 (measured), checked to 2e-4 absolute.
#[test]
fn logits_equal_transformers_gguf_loader() {
    let (worst, argmax_agrees) = compare(Quantization::None);
    assert!(argmax_agrees);
    assert!(worst < 2e-4, "largest logit difference {worst}");
}
