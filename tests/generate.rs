//! The KV cache: decoding position by position from the cache gives the logits of recomputing
//! the whole sequence, for every adapter method, an NF4 base, grouped-query attention, a batch,
//! and a prefill that continues a cache.

use candle_core::{Device, Tensor};
use prolora::adapters::{registry, AdapterConfig};
use prolora::ctx::Ctx;
use prolora::model::nf4::Quantization;

mod common;

/// Max |difference| between full-sequence logits and those of a cache filled in `chunks`.
fn cached_vs_full(model: &prolora::model::Llama, ids: &[[u32; 7]], chunks: &[usize]) -> f64 {
    let b = ids.len();
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    let all = Tensor::from_vec(flat, (b, 7), &Device::Cpu).unwrap();
    let ctx = Ctx::eval();
    let full = model.logits(&all, &ctx).unwrap();
    let mut cache = model.new_cache();
    let (mut at, mut worst) = (0, 0f64);
    for &n in chunks {
        let part = all.narrow(1, at, n).unwrap();
        let h = model.hidden_cached(&part, &ctx, &mut cache).unwrap();
        let got = model.head(&h).unwrap();
        let want = full.narrow(1, at, n).unwrap();
        let diff: f64 = (got - want).unwrap().abs().unwrap().flatten_all().unwrap()
            .max(0).unwrap().to_scalar().unwrap();
        worst = worst.max(diff);
        at += n;
    }
    assert_eq!(cache.len(), 7);
    worst
}

#[test]
fn cached_decoding_equals_full_recompute_for_every_method() {
    let ids = [[1, 5, 9, 2, 7, 3, 10], [4, 4, 8, 1, 0, 6, 2]];
    for reg in registry::METHODS {
        for quant in [Quantization::None, Quantization::Nf4 { double_quant: true }] {
            let cfg = AdapterConfig {
                rank: 3,
                alpha: 4.0,
                dropout: 0.1, // off in eval mode, as in generation
                targets: reg.default_targets.iter().map(|s| s.to_string()).collect(),
                init_from: None,
                // Sharing rates that fit the tiny GQA model's 4 key/value features.
                method: (reg.from_toml)(match reg.kind {
                    "prolora" => toml::toml! { sharing_rate_a = 2 sharing_rate_b = 2 },
                    _ => toml::Table::new(),
                })
                .unwrap(),
            };
            let (model, _set) = common::tiny_f64_model(&cfg, quant);
            // Prefill 3, then one at a time; and prefill 2, a chunk of 3 after the cache, 2.
            for chunks in [&[3, 1, 1, 1, 1][..], &[2, 3, 2]] {
                let worst = cached_vs_full(&model, &ids, chunks);
                assert!(worst < 1e-10, "{} {quant:?} {chunks:?}: {worst}", reg.kind);
            }
        }
    }
}

/// Greedy ids equal transformers' `generate` (its own KV cache) on the PEFT fixture: a tiny
/// f16 base loaded in f32 with a LoRA adapter, three prompts of different lengths.
#[test]
fn greedy_ids_equal_transformers_generate() {
    let dir = common::fixture("peft-lora");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generate.json")).unwrap()).unwrap();
    let source = prolora::source::ModelSource::resolve(dir.join("base").to_str().unwrap(), "main").unwrap();
    let mut model = source.load(candle_core::DType::F32, &Device::Cpu).unwrap();
    prolora::adapters::peft::load_into(&dir.join("adapter"), &mut model).unwrap();
    let n = golden["new_tokens"].as_u64().unwrap() as usize;
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    for (prompt, want) in golden["prompts"].as_array().unwrap().iter().zip(golden["generated"].as_array().unwrap()) {
        let got = prolora::generate::greedy(&model, &ids(prompt), n, false).unwrap();
        assert_eq!(got, ids(want), "prompt {prompt}");
    }
}
