//! Helpers shared by the integration tests (not every test binary uses every one).
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use prolora::adapters::{AdapterConfig, AdapterSet};
use prolora::ctx::Ctx;
use prolora::data::batch::Batch;
use prolora::data::chat::Encoded;
use prolora::loss::summed_loss;
use prolora::model::nf4::Quantization;
use prolora::model::weights::RandomWeights;
use prolora::model::{Llama, LlamaConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::PathBuf;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file under tests/fixtures.
pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// The tiny decoder of the gradient checks: hidden 8, GQA (one key/value head), 2 layers.
pub const TINY_GQA: &str = r#"{"vocab_size": 11, "hidden_size": 8, "intermediate_size": 12,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    "rms_norm_eps": 1e-5, "rope_theta": 100.0, "tie_word_embeddings": false}"#;

/// A tiny f64 model (block linears stored as `quant`) with an adapter of `cfg` everywhere it
/// applies and every adapter tensor random (so B-like factors are non-zero and every tensor
/// has a gradient).
pub fn tiny_f64_model(cfg: &AdapterConfig, quant: Quantization) -> (Llama, AdapterSet) {
    tiny_f64_model_of(TINY_GQA, cfg, quant)
}

/// The same for the model of `config_json`.
pub fn tiny_f64_model_of(
    config_json: &str,
    cfg: &AdapterConfig,
    quant: Quantization,
) -> (Llama, AdapterSet) {
    tiny_model_in(config_json, cfg, quant, DType::F64)
}

/// The same computing in `dtype`.
pub fn tiny_model_in(
    config_json: &str,
    cfg: &AdapterConfig,
    quant: Quantization,
    dtype: DType,
) -> (Llama, AdapterSet) {
    let model_cfg = LlamaConfig::from_json(config_json).unwrap();
    let mut model = Llama::load_quantized(
        &model_cfg,
        &RandomWeights::new(3),
        dtype,
        quant,
        &Device::Cpu,
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let set = AdapterSet::new(cfg, &model_cfg, dtype, &Device::Cpu, &mut rng).unwrap();
    for var in set.tensors().into_iter().map(|p| p.var) {
        let v: Vec<f64> = prolora::adapters::uniform(var.elem_count(), 0.5, &mut rng)
            .into_iter()
            .map(f64::from)
            .collect();
        let t = Tensor::from_vec(v, var.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        var.set(&t).unwrap();
    }
    set.attach_to(&mut model);
    (model, set)
}

/// LoRA (rank 2, α 4) with dropout `dropout` on every linear of a full-precision tiny model.
pub fn tiny_lora_model(dropout: f64) -> (Llama, AdapterSet) {
    let cfg = AdapterConfig {
        rank: 2,
        alpha: 4.0,
        dropout,
        ..Default::default()
    };
    tiny_f64_model(&cfg, Quantization::None)
}

/// [`check_gradients_on`] the default tiny model.
pub fn check_gradients(cfg: &AdapterConfig, quant: Quantization) {
    check_gradients_on(TINY_GQA, cfg, quant)
}

/// Every trainable tensor's backprop gradient (a few entries each) against central finite
/// differences, through a tiny f64 model (`config_json`) with the adapter `cfg`.
pub fn check_gradients_on(config_json: &str, cfg: &AdapterConfig, quant: Quantization) {
    let (model, set) = tiny_f64_model_of(config_json, cfg, quant);
    let examples = [
        Encoded {
            input_ids: vec![1, 5, 7, 3, 9, 2],
            labels: vec![-100, -100, 7, 3, 9, 2],
        },
        Encoded {
            input_ids: vec![1, 4, 4, 10],
            labels: vec![-100, -100, -100, 10],
        },
    ];
    let batch = Batch::new(&examples.iter().collect::<Vec<_>>());
    let ctx = Ctx::eval();
    let loss = |m: &Llama| {
        let (sum, n) = summed_loss(m, &batch, &ctx, false).unwrap();
        sum.to_scalar::<f64>().unwrap() / n as f64
    };
    let (sum, n) = summed_loss(&model, &batch, &ctx, true).unwrap();
    let grads = (sum / n as f64).unwrap().backward().unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    let trainable = set.trainable();
    assert!(!trainable.is_empty());
    for (name, var, _) in &trainable {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{}: no gradient for {name}", cfg.kind()));
        let grad: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
        // A few entries of every tensor, spread over it.
        for &i in &[0, base.len() / 2, base.len() - 1] {
            let probe = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&model)
            };
            let numeric = (probe(eps) - probe(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let tol = 1e-6 + 1e-5 * numeric.abs();
            assert!(
                (grad[i] - numeric).abs() < tol,
                "{}: {name}[{i}]: backprop {} vs finite difference {numeric}",
                cfg.kind(),
                grad[i]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * trainable.len());
}

/// The command lines of the processes that carry `marker`.
pub fn processes_with(marker: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(marker))
        .collect()
}

/// Runs the prolora binary from the repository root, offline.
/// `f` on a rayon pool of two threads, as `prolora` runs its commands (main.rs): a decoding
/// step there runs on a team (`kernels::team`), outside a pool on rayon's work stealing.
pub fn in_a_pool_of_two<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap()
        .install(f)
}

pub fn prolora(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args(args)
        .current_dir(root())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("the binary runs")
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `prolora train` of the demo config into `out` for `steps` steps, quietly, with `extra`
/// arguments.
pub fn train_demo(out: &std::path::Path, steps: usize, extra: &[&str]) -> std::process::Output {
    let output_dir = format!("output_dir={}", out.display());
    let steps = format!("train.steps={steps}");
    let mut args = vec![
        "train",
        "--config",
        "configs/demo.toml",
        "--set",
        &output_dir,
        "--set",
        &steps,
        "--quiet",
    ];
    args.extend(extra);
    prolora(&args)
}

/// The real model of the tests.
pub mod smollm2;

/// Adapters for the serving tests.
pub mod serve;
