//! The serving engine: rows of one continuously batched KV cache, each with its own adapter
//! (or none), get the logits and tokens of the same request decoded alone with its adapter by
//! the single-adapter path (`peft::load_into` + `generate::complete`), for every method, on a
//! plain and an NF4 base; the same seed samples the same tokens whatever else is in the batch;
//! PRoLoRA is served from its compact tensors.

use candle_core::{DType, Device, Tensor};
use prolora::adapters::{peft, registry};
use prolora::ctx::Ctx;
use prolora::generate::{complete, Ended, Settings};
use prolora::model::nf4::Quantization;
use prolora::model::weights::RandomWeights;
use prolora::model::{Llama, LlamaConfig};
use prolora::serve::engine::{Engine, Event, Finish, Job, Sampling};
use prolora::serve::metrics::Metrics;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Instant;

mod common;

/// hidden 16, 4 heads over 2 key/value heads, 2 layers, vocabulary 11.
const MODEL: &str = r#"{"vocab_size": 11, "hidden_size": 16, "intermediate_size": 24,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "rope_theta": 100.0, "tie_word_embeddings": false,
    "max_position_embeddings": 64}"#;

fn model(dtype: DType, quant: Quantization) -> Llama {
    let cfg = LlamaConfig::from_json(MODEL).unwrap();
    Llama::load_quantized(&cfg, &RandomWeights::new(3), dtype, quant, &Device::Cpu).unwrap()
}

/// One adapter directory per method, named by its kind.
fn adapters(root: &Path) -> Vec<(String, PathBuf)> {
    let cfg = LlamaConfig::from_json(MODEL).unwrap();
    registry::METHODS
        .iter()
        .enumerate()
        .map(|(i, reg)| {
            let dir = root.join(reg.kind);
            let method = common::serve::method_config(reg.kind);
            common::serve::write_adapter(&dir, &method, &cfg, 20 + i as u64, 0.5);
            (reg.kind.to_string(), dir)
        })
        .collect()
}

struct Served {
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
    finish: Finish,
}

fn drain(events: &Receiver<Event>) -> Served {
    let mut s = Served {
        tokens: Vec::new(),
        logits: Vec::new(),
        finish: Finish::Positions,
    };
    for event in events.try_iter() {
        match event {
            Event::Logits(l) => s.logits.push(l),
            Event::Token(t) => s.tokens.push(t),
            Event::Done(f) => {
                s.finish = f;
                return s;
            }
            other => panic!("{other:?}"),
        }
    }
    panic!("no end event");
}

/// A request as the tests send it.
struct Request {
    prompt: Vec<u32>,
    adapter: Option<&'static str>,
    seed: u64,
}

fn requests() -> Vec<Request> {
    let r = |prompt: &[u32], adapter, seed| Request {
        prompt: prompt.to_vec(),
        adapter,
        seed,
    };
    vec![
        r(&[1, 5, 9, 2, 7], Some("lora"), 1),
        r(&[4, 4, 8], Some("prolora"), 2),
        r(&[3, 8, 1, 1, 5, 10, 7], None, 3),
        r(&[6, 2], Some("vera"), 4),
        r(&[1, 9], Some("tied-lora"), 5),
        r(&[7, 7, 7, 3], Some("prolora"), 6),
        r(&[2, 10, 5], Some("lora"), 7),
        r(&[5], None, 8),
    ]
}

/// Serves `requests` on one engine: the first half submitted at once, the rest two per step
/// while the others run (so they join a running batch), at most 5 rows at a time.
fn serve(
    engine_model: Llama,
    adapters: &[(String, PathBuf)],
    requests: &[Request],
    sampling: &Sampling,
) -> Vec<Served> {
    let mut engine = Engine::new(engine_model, 5, 64, None, Arc::new(Metrics::default()));
    for (name, dir) in adapters {
        engine.add_adapter(name, dir).unwrap();
    }
    let mut receivers = Vec::new();
    let mut pending = requests.iter();
    let mut submit = |engine: &mut Engine, r: &Request| {
        let (tx, rx) = channel();
        engine.submit(Job {
            prompt: r.prompt.clone(),
            adapter: r.adapter.map(String::from),
            sampling: Sampling {
                seed: r.seed,
                ..sampling.clone()
            },
            events: tx,
            record_logits: true,
            submitted: Instant::now(),
        });
        receivers.push(rx);
    };
    for r in pending.by_ref().take(requests.len() / 2) {
        submit(&mut engine, r);
    }
    let mut most = 0;
    loop {
        engine.step().unwrap();
        most = most.max(engine.running());
        let mut added = 0;
        for r in pending.by_ref().take(2) {
            submit(&mut engine, r);
            added += 1;
        }
        if added == 0 && engine.is_idle() {
            break;
        }
    }
    assert_eq!(most, 5, "the batch filled up to max_batch");
    receivers.iter().map(drain).collect()
}

/// The single-adapter path's model for `adapter`.
fn alone_model(dtype: DType, quant: Quantization, adapter: Option<&Path>) -> Llama {
    let mut m = model(dtype, quant);
    if let Some(dir) = adapter {
        peft::load_into(dir, &mut m).unwrap();
    }
    m
}

/// Logits of `prompt` then each of `tokens` fed in turn, one cached step at a time.
fn logits_alone(model: &Llama, prompt: &[u32], tokens: &[u32]) -> Vec<Vec<f32>> {
    let ctx = Ctx::eval();
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    let mut feed = prompt.to_vec();
    for &t in std::iter::once(&u32::MAX).chain(tokens) {
        if t != u32::MAX {
            feed = vec![t];
        }
        let ids = Tensor::from_slice(&feed, (1, feed.len()), &Device::Cpu).unwrap();
        let h = model.hidden_cached(&ids, &ctx, &mut cache).unwrap();
        let last = h.narrow(1, feed.len() - 1, 1).unwrap();
        let logits = model.head(&last).unwrap().flatten_all().unwrap();
        out.push(logits.to_dtype(DType::F32).unwrap().to_vec1().unwrap());
    }
    out
}

fn tokenizer() -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_bytes(prolora::model::preset::LLAMA2_TOKENIZER_JSON).unwrap()
}

#[test]
fn every_row_gets_the_logits_and_tokens_of_its_request_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let adapters = adapters(tmp.path());
    let dir_of = |name: &str| adapters.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let requests = requests();
    let tokenizer = tokenizer();
    for quant in [Quantization::None, Quantization::Nf4 { double_quant: true }] {
        let greedy = Sampling {
            max_tokens: 6,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            ignore_eos: false,
        };
        let served = serve(model(DType::F32, quant), &adapters, &requests, &greedy);
        let mut worst = 0f32;
        for (r, s) in requests.iter().zip(&served) {
            let alone = alone_model(DType::F32, quant, r.adapter.map(dir_of).as_deref());
            let want = complete(&alone, &tokenizer, &r.prompt, &Settings::greedy(6)).unwrap();
            assert_eq!(s.tokens, want.ids, "{:?} {quant:?}", r.adapter);
            let finish = match want.ended {
                Ended::Eos => Finish::Eos,
                Ended::MaxNewTokens => Finish::MaxTokens,
                other => panic!("{other:?}"),
            };
            assert_eq!(s.finish, finish);
            let alone_logits = logits_alone(&alone, &r.prompt, &s.tokens);
            assert_eq!(
                s.logits.len(),
                s.tokens.len() + (finish == Finish::Eos) as usize
            );
            for (got, want) in s.logits.iter().zip(&alone_logits) {
                for (g, w) in got.iter().zip(want) {
                    worst = worst.max((g - w).abs());
                }
            }
        }
        // The engine's LoRA and PRoLoRA rows take the per-row kernel, the single-adapter path
        // candle's products (PRoLoRA materialized); the other methods the same ops on a subset
        // of rows. Measured: 3.1e-7 plain, 3.3e-7 NF4.
        assert!(worst < 1e-5, "{quant:?}: max |Δlogit| {worst}");
        // The adapters change the logits: a row's adapter matters.
        let base = alone_model(DType::F32, quant, None);
        let with = alone_model(DType::F32, quant, Some(&dir_of("prolora")));
        let (b, w) = (
            logits_alone(&base, &[4, 4, 8], &[]),
            logits_alone(&with, &[4, 4, 8], &[]),
        );
        let moved = b[0]
            .iter()
            .zip(&w[0])
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(moved > 1e-2, "{moved}");
    }
}

/// Past a decoding step's 16 rows the engine computes the vocabulary head itself (the skinny
/// product into a buffer kept between steps): 24 rows at once still get their logits alone.
#[test]
fn a_batch_past_sixteen_rows_gets_each_requests_logits_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let adapters = adapters(tmp.path());
    let dir_of = |name: &str| adapters.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let requests: Vec<Request> = (0..3).flat_map(|_| requests()).collect();
    let mut engine = Engine::new(
        model(DType::F32, Quantization::None),
        requests.len(),
        64,
        None,
        Arc::new(Metrics::default()),
    );
    for (name, dir) in &adapters {
        engine.add_adapter(name, dir).unwrap();
    }
    let receivers: Vec<_> = requests
        .iter()
        .map(|r| {
            let (tx, rx) = channel();
            engine.submit(Job {
                prompt: r.prompt.clone(),
                adapter: r.adapter.map(String::from),
                sampling: Sampling {
                    max_tokens: 4,
                    temperature: 0.0,
                    top_p: 1.0,
                    seed: r.seed,
                    ignore_eos: true,
                },
                events: tx,
                record_logits: true,
                submitted: Instant::now(),
            });
            rx
        })
        .collect();
    let mut most = 0;
    while !engine.is_idle() {
        engine.step().unwrap();
        most = most.max(engine.running());
    }
    assert_eq!(most, requests.len());
    let mut worst = 0f32;
    for (r, rx) in requests.iter().zip(&receivers).take(8) {
        let served = drain(rx);
        assert_eq!(served.tokens.len(), 4);
        let alone = alone_model(
            DType::F32,
            Quantization::None,
            r.adapter.map(dir_of).as_deref(),
        );
        let want = logits_alone(&alone, &r.prompt, &served.tokens);
        for (got, want) in served.logits.iter().zip(&want) {
            for (g, w) in got.iter().zip(want) {
                worst = worst.max((g - w).abs());
            }
        }
    }
    assert!(worst < 1e-5, "max |Δlogit| {worst}");
}

#[test]
fn a_seed_samples_the_same_tokens_whatever_else_is_in_the_batch() {
    // f64, where the batch's rounding cannot reorder near-equal probabilities.
    let tmp = tempfile::tempdir().unwrap();
    let adapters = adapters(tmp.path());
    let dir_of = |name: &str| adapters.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let requests = requests();
    let tokenizer = tokenizer();
    let sampled = Sampling {
        max_tokens: 10,
        temperature: 1.3,
        top_p: 0.9,
        seed: 0,
        ignore_eos: false,
    };
    let served = serve(
        model(DType::F64, Quantization::None),
        &adapters,
        &requests,
        &sampled,
    );
    for (r, s) in requests.iter().zip(&served) {
        let alone = alone_model(
            DType::F64,
            Quantization::None,
            r.adapter.map(dir_of).as_deref(),
        );
        let settings = Settings {
            temperature: 1.3,
            top_p: 0.9,
            seed: r.seed,
            ..Settings::greedy(10)
        };
        let want = complete(&alone, &tokenizer, &r.prompt, &settings).unwrap();
        assert_eq!(s.tokens, want.ids, "{:?}", r.adapter);
    }
    // Different seeds draw differently (the test could fail).
    let distinct: std::collections::BTreeSet<_> = served.iter().map(|s| s.tokens.clone()).collect();
    assert!(distinct.len() > 4);
}

#[test]
fn prolora_is_served_from_its_compact_tensors_for_every_layout() {
    let cfg = LlamaConfig::from_json(MODEL).unwrap();
    let layouts = [
        toml::toml! { unshared_rank = 1 sharing_rate_a = 2 sharing_rate_b = 2 },
        toml::toml! { unshared_rank = 0 sharing_rate_a = 3 sharing_rate_b = 2 rotation = false },
        toml::toml! { unshared_rank = 1 sharing_rate_a = 2 share_axis = "rank" },
        toml::toml! { unshared_rank = 1 sharing_rate_a = 2 rotate_axis = "hidden" },
        toml::toml! { unshared_rank = 4 sharing_rate_a = 2 },
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (i, options) in layouts.into_iter().enumerate() {
        let mut method = common::serve::method_config("prolora");
        method.method = (registry::by_kind("prolora").unwrap().from_toml)(options).unwrap();
        let dir = tmp.path().join(i.to_string());
        common::serve::write_adapter(&dir, &method, &cfg, 40 + i as u64, 0.5);
        let set = peft::load(&dir, &cfg, DType::F32, &Device::Cpu).unwrap();
        let served = prolora::serve::adapters::ServedAdapter::from_set("p", &set, 2).unwrap();
        let x = Tensor::from_vec(
            prolora::adapters::uniform(3 * 24, 1.0, &mut rand::SeedableRng::seed_from_u64(1)),
            (3, 24),
            &Device::Cpu,
        )
        .unwrap();
        let mut params = 0;
        for (t, adapter) in set.linears() {
            let m = prolora::model::config::BLOCK_LINEARS
                .iter()
                .position(|m| *m == t.module)
                .unwrap();
            let x = x.narrow(1, 0, t.in_features).unwrap();
            let want = adapter.delta(&x, &Ctx::eval()).unwrap();
            let got = served
                .linear(t.layer, m)
                .unwrap()
                .delta(&x, &Ctx::eval())
                .unwrap();
            let diff: f32 = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff < 1e-5, "layout {i} {}: {diff}", t.module);
            params += adapter
                .params()
                .iter()
                .map(|p| p.var.elem_count())
                .sum::<usize>();
        }
        // Resident: its own tensors (f32) alone; no index tensors (r_s·(h + o) per linear),
        // no roll matrices (the per-row kernel rolls by index).
        assert_eq!(served.bytes, 4 * params, "layout {i}");
    }
}

#[test]
fn the_per_row_kernel_gives_each_row_its_own_adapters_delta() {
    use prolora::serve::adapters::{ServedAdapter, ServedLinear};
    let cfg = LlamaConfig::from_json(MODEL).unwrap();
    let prolora_with = |options: toml::Table| {
        let mut method = common::serve::method_config("prolora");
        method.method = (registry::by_kind("prolora").unwrap().from_toml)(options).unwrap();
        method
    };
    // LoRA; PRoLoRA with shared and unshared ranks, without rotation, and with no shared rank.
    let methods = [
        common::serve::method_config("lora"),
        common::serve::method_config("prolora"),
        prolora_with(
            toml::toml! { unshared_rank = 0 sharing_rate_a = 3 sharing_rate_b = 2 rotation = false },
        ),
        prolora_with(toml::toml! { unshared_rank = 4 sharing_rate_a = 2 }),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let mut sets = Vec::new();
    let mut served = Vec::new();
    for (i, method) in methods.iter().enumerate() {
        let dir = tmp.path().join(i.to_string());
        common::serve::write_adapter(&dir, method, &cfg, 70 + i as u64, 0.5);
        let set = peft::load(&dir, &cfg, DType::F32, &Device::Cpu).unwrap();
        served.push(ServedAdapter::from_set("a", &set, 2).unwrap());
        sets.push(set);
    }
    // Rows 1 and 6 use no adapter; the others mix all four.
    let assignment = [
        Some(0),
        None,
        Some(1),
        Some(2),
        Some(0),
        Some(3),
        None,
        Some(1),
    ];
    let mut rng: rand::rngs::StdRng = rand::SeedableRng::seed_from_u64(5);
    let mut worst = 0f32;
    for (t, _) in sets[0].linears() {
        let m = prolora::model::config::BLOCK_LINEARS
            .iter()
            .position(|m| *m == t.module)
            .unwrap();
        let n = assignment.len();
        let x = prolora::adapters::uniform(n * t.in_features, 1.0, &mut rng);
        let x = Tensor::from_vec(x, (n, t.in_features), &Device::Cpu).unwrap();
        let factors: Vec<_> = assignment
            .iter()
            .map(|a| {
                a.map(|a| match served[a].linear(t.layer, m).unwrap() {
                    ServedLinear::Rows(f) => f,
                    ServedLinear::Composed(_) => panic!("adapter {a} is not in the kernel's form"),
                })
            })
            .collect();
        let got = prolora::serve::bgmv::deltas_of(&x, &factors).unwrap();
        // Added into a linear's output by the kernel: that output plus the deltas.
        let d_out = got.dim(1).unwrap();
        let base = prolora::adapters::uniform(n * d_out, 2.0, &mut rng);
        let base = Tensor::from_vec(base, (n, d_out), &Device::Cpu).unwrap();
        let fused: Vec<f32> = prolora::serve::bgmv::added_to(&x, &base, &factors)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let apart: Vec<f32> = (&base + &got)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (f, a) in fused.iter().zip(&apart) {
            worst = worst.max((f - a).abs() / a.abs().max(1.0));
        }
        for (r, a) in assignment.iter().enumerate() {
            let got: Vec<f32> = got.get(r).unwrap().to_vec1().unwrap();
            let Some(a) = a else {
                assert!(got.iter().all(|v| *v == 0.0), "row {r} has no adapter");
                continue;
            };
            // The adapter as trained computes it (PRoLoRA: its materialized A and B).
            let (_, adapter) = sets[*a]
                .linears()
                .find(|(u, _)| u.layer == t.layer && u.module == t.module)
                .unwrap();
            let want: Vec<f32> = adapter
                .delta(&x.narrow(0, r, 1).unwrap(), &Ctx::eval())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (g, w) in got.iter().zip(&want) {
                worst = worst.max((g - w).abs() / w.abs().max(1.0));
            }
        }
    }
    assert!(worst < 1e-5, "max relative |Δ| {worst}");
    // Layouts the kernel does not read (rank sharing) keep their own delta.
    let dir = tmp.path().join("rank-shared");
    let method =
        prolora_with(toml::toml! { unshared_rank = 1 sharing_rate_a = 2 share_axis = "rank" });
    common::serve::write_adapter(&dir, &method, &cfg, 80, 0.5);
    let set = peft::load(&dir, &cfg, DType::F32, &Device::Cpu).unwrap();
    let rank_shared = ServedAdapter::from_set("r", &set, 2).unwrap();
    assert!(matches!(
        rank_shared.linear(0, 0),
        Some(ServedLinear::Composed(_))
    ));
}
