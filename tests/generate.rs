//! The KV cache: decoding position by position from the cache gives the logits of recomputing
//! the whole sequence, for every adapter method, an NF4 base, grouped-query attention, a batch,
//! a prefill that continues a cache, and prompts of different lengths decoded together.

use candle_core::{Device, Tensor};
use prolora::adapters::{registry, AdapterConfig};
use prolora::ctx::Ctx;
use prolora::generate::{complete, complete_batch, Ended, Request, Settings};
use prolora::model::kv_cache::KvCache;
use prolora::model::nf4::Quantization;

mod common;

/// Rank 3 of `reg` on its default targets, with sharing rates that fit the tiny GQA model's
/// 4 key/value features.
fn method_config(reg: &registry::Registration, dropout: f64) -> AdapterConfig {
    AdapterConfig {
        rank: 3,
        alpha: 4.0,
        dropout,
        targets: reg.default_targets.iter().map(|s| s.to_string()).collect(),
        init_from: None,
        method: (reg.from_toml)(match reg.kind {
            "prolora" => toml::toml! { sharing_rate_a = 2 sharing_rate_b = 2 },
            _ => toml::Table::new(),
        })
        .unwrap(),
    }
}

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
        let diff: f64 = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
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
            // Dropout is off in eval mode, as in generation.
            let (model, _set) = common::tiny_f64_model(&method_config(reg, 0.1), quant);
            // Prefill 3, then one at a time; and prefill 2, a chunk of 3 after the cache, 2.
            for chunks in [&[3, 1, 1, 1, 1][..], &[2, 3, 2]] {
                let worst = cached_vs_full(&model, &ids, chunks);
                assert!(worst < 1e-10, "{} {quant:?} {chunks:?}: {worst}", reg.kind);
            }
        }
    }
}

/// Max |difference| between each sequence's full logits (run alone) and those of decoding all
/// of them together: each prompt prefilled alone and the caches stacked left-padded, or (with
/// `together`) the prompts prefilled as one left-padded batch; then one given token per step;
/// the second row leaves the batch after two steps.
fn ragged_vs_full(
    model: &prolora::model::Llama,
    seqs: &[Vec<u32>],
    prompt_lens: &[usize],
    together: bool,
) -> f64 {
    let ctx = Ctx::eval();
    let row = |ids: &[u32]| Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    let full: Vec<Tensor> = seqs
        .iter()
        .map(|s| model.logits(&row(s), &ctx).unwrap())
        .collect();
    // In f64: a bf16 model's cached forward computes (and returns) f32 on the CPU.
    let f64_of = |t: Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
    let max_diff = |a: Tensor, b: Tensor| -> f64 {
        let d = (f64_of(a) - f64_of(b))
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let d: f64 = d
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_scalar()
            .unwrap();
        // NaN is never under a tolerance (f64::max would drop it).
        if d.is_nan() {
            f64::INFINITY
        } else {
            d
        }
    };
    let mut worst = 0f64;
    let mut cache = if together {
        let prompts: Vec<&[u32]> = seqs
            .iter()
            .zip(prompt_lens)
            .map(|(s, &n)| &s[..n])
            .collect();
        let (last, cache) = model.prefill(&prompts, &ctx).unwrap();
        let logits = model.head(&last).unwrap();
        for (i, &n) in prompt_lens.iter().enumerate() {
            let want = full[i].narrow(1, n - 1, 1).unwrap();
            worst = worst.max(max_diff(logits.narrow(0, i, 1).unwrap(), want));
        }
        cache
    } else {
        let mut caches = Vec::new();
        for (s, &n) in seqs.iter().zip(prompt_lens) {
            let mut cache = model.new_cache();
            let h = model
                .hidden_cached(&row(&s[..n]), &ctx, &mut cache)
                .unwrap();
            worst = worst.max(max_diff(
                model.head(&h).unwrap(),
                full[caches.len()].narrow(1, 0, n).unwrap(),
            ));
            caches.push(cache);
        }
        KvCache::stack(caches).unwrap()
    };
    let mut active: Vec<usize> = (0..seqs.len()).collect();
    for step in 0..4 {
        if step == 2 {
            active.remove(1);
            let keep: Vec<usize> = (0..seqs.len()).filter(|&r| r != 1).collect();
            cache.retain(&keep).unwrap();
        }
        let next: Vec<u32> = active
            .iter()
            .map(|&i| seqs[i][prompt_lens[i] + step])
            .collect();
        let ids = Tensor::from_slice(&next, (next.len(), 1), &Device::Cpu).unwrap();
        let logits = model
            .head(&model.hidden_cached(&ids, &ctx, &mut cache).unwrap())
            .unwrap();
        for (r, &i) in active.iter().enumerate() {
            let want = full[i].narrow(1, prompt_lens[i] + step, 1).unwrap();
            worst = worst.max(max_diff(logits.narrow(0, r, 1).unwrap(), want));
        }
    }
    worst
}

#[test]
fn ragged_batch_decoding_equals_each_sequence_alone() {
    let seqs: Vec<Vec<u32>> = vec![
        vec![1, 5, 9, 2, 7, 3, 10],
        vec![4, 4, 8, 1, 0, 6, 2, 9, 9],
        vec![3, 8, 1, 1, 5, 10, 7, 2],
        vec![6, 2, 9, 3, 3],
    ];
    // Prompt lengths 3, 5, 4, 1, prefilled alone or together: the longest (row 1) leaves, so
    // the batch's leading padding columns are trimmed.
    let prompt_lens = [3, 5, 4, 1];
    for reg in registry::METHODS {
        for quant in [Quantization::None, Quantization::Nf4 { double_quant: true }] {
            let (model, _set) = common::tiny_f64_model(&method_config(reg, 0.0), quant);
            for together in [false, true] {
                let worst = ragged_vs_full(&model, &seqs, &prompt_lens, together);
                assert!(worst < 1e-10, "{} {quant:?} {together}: {worst}", reg.kind);
            }
            // The same path in f32 and bf16 (the compute dtypes of a CPU and a GPU), within
            // their rounding (measured: ≤ 2.1e-7 in f32, ≤ 6.8e-3 in bf16 when both forwards
            // computed in bf16; logits of order 1). On the CPU a bf16 model's cached forward
            // now computes in f32 and its full one in bf16: the bf16 bound holds the full one.
            for (dtype, tol) in [
                (candle_core::DType::F32, 1e-5),
                (candle_core::DType::BF16, 2e-2),
            ] {
                let cfg = method_config(reg, 0.0);
                let (model, _set) = common::tiny_model_in(common::TINY_GQA, &cfg, quant, dtype);
                for together in [false, true] {
                    let worst = ragged_vs_full(&model, &seqs, &prompt_lens, together);
                    assert!(
                        worst < tol,
                        "{} {quant:?} {dtype:?} {together}: {worst}",
                        reg.kind
                    );
                }
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
    let source =
        prolora::source::ModelSource::resolve(dir.join("base").to_str().unwrap(), "main").unwrap();
    let mut model = source.load(candle_core::DType::F32, &Device::Cpu).unwrap();
    prolora::adapters::peft::load_into(&dir.join("adapter"), &mut model).unwrap();
    let n = golden["new_tokens"].as_u64().unwrap() as usize;
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let tokenizer = source.tokenizer(None).unwrap().tokenizer().clone();
    for (prompt, want) in golden["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(golden["generated"].as_array().unwrap())
    {
        let got = complete(&model, &tokenizer, &ids(prompt), &Settings::greedy(n)).unwrap();
        assert_eq!(got.ids, ids(want), "prompt {prompt}");
        assert_eq!(got.ended, Ended::MaxNewTokens);
    }

    // Decoded together (ragged, rows leaving as they end) each prompt gets the same tokens.
    let requests: Vec<Request> = golden["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Request {
            prompt: ids(p),
            seed: 0,
        })
        .collect();
    let together = complete_batch(&model, &tokenizer, &requests, &Settings::greedy(n)).unwrap();
    for (got, want) in together.iter().zip(golden["generated"].as_array().unwrap()) {
        assert_eq!(got.ids, ids(want));
    }

    // Sampling: a seed repeats its completion, another seed differs; a stop sequence cuts the
    // text before it and ends there.
    let prompt = ids(&golden["prompts"][0]);
    let sampled = |seed| {
        let s = Settings {
            temperature: 1.0,
            top_p: 0.95,
            seed,
            ..Settings::greedy(n)
        };
        complete(&model, &tokenizer, &prompt, &s).unwrap()
    };
    assert_eq!(sampled(1).ids, sampled(1).ids);
    assert_ne!(sampled(1).ids, sampled(2).ids);
    let full = complete(&model, &tokenizer, &prompt, &Settings::greedy(n)).unwrap();
    let word = full.text.split_whitespace().nth(3).unwrap().to_string();
    let stopped = complete(
        &model,
        &tokenizer,
        &prompt,
        &Settings {
            stop: vec![word.clone()],
            ..Settings::greedy(n)
        },
    )
    .unwrap();
    assert_eq!(stopped.ended, Ended::Stop(word.clone()));
    assert_eq!(stopped.text, full.text[..full.text.find(&word).unwrap()]);
    assert!(stopped.ids.len() < full.ids.len());
}

/// Sampled together, each prompt draws what it draws alone with its seed (f64, where the batch's
/// rounding cannot reorder near-equal probabilities as it can in f32 over 32 000 tokens).
#[test]
fn a_batch_samples_what_each_prompt_samples_alone() {
    let cfg = AdapterConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
        init_from: None,
        method: (registry::METHODS[0].from_toml)(toml::Table::new()).unwrap(),
    };
    let (model, _set) = common::tiny_f64_model(&cfg, Quantization::None);
    let tokenizer =
        tokenizers::Tokenizer::from_bytes(prolora::model::preset::LLAMA2_TOKENIZER_JSON).unwrap();
    let requests: Vec<Request> = [vec![1, 5, 9], vec![4, 4, 8, 1, 0, 6], vec![3]]
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| Request {
            prompt,
            seed: 10 + i as u64,
        })
        .collect();
    for temperature in [0.0, 1.5] {
        let settings = Settings {
            temperature,
            top_p: 0.9,
            ..Settings::greedy(12)
        };
        let together = complete_batch(&model, &tokenizer, &requests, &settings).unwrap();
        for (got, r) in together.iter().zip(&requests) {
            let alone = Settings {
                seed: r.seed,
                ..settings.clone()
            };
            assert_eq!(
                got.ids,
                complete(&model, &tokenizer, &r.prompt, &alone).unwrap().ids
            );
        }
    }
}
