//! NF4 benchmarks for the README's performance section:
//!
//!   cargo bench --bench nf4 -- dequant   # dequantization GB/s: 1 core, all cores, memcpy
//!   cargo bench --bench nf4 -- step      # LoRA step, tiny LLaMA: NF4 base vs f32 base
//!   cargo bench --bench nf4 -- rss7b     # peak RSS + time of one LoRA step, 7B NF4 preset
//!   cargo bench --bench nf4 -- gemv      # fused NF4 product of one row: GB/s of codes read
//!
//! Each prints one markdown table row per measurement.

mod timing;
use timing::best;

use candle_core::{DType, Device};
use prolora::adapters::{AdapterConfig, AdapterSet};
use prolora::ctx::Ctx;
use prolora::data::batch::Batch;
use prolora::data::chat::Encoded;
use prolora::model::nf4::{Nf4Tensor, Quantization};
use prolora::model::weights::RandomWeights;
use prolora::model::{Llama, LlamaConfig};
use prolora::source::ModelSource;
use prolora::train::optim::{AdamW, AdamWParams};
use prolora::train::step::{accumulate_grads, Grads};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn main() {
    let what: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let all = what.is_empty();
    let want = |w: &str| all || what.iter().any(|a| a == w);
    if want("dequant") {
        dequant();
    }
    if want("step") {
        step();
    }
    if want("rss7b") {
        rss7b();
    }
    if want("gemv") {
        gemv();
    }
}

/// The fused product of one row with a 7B MLP-shaped NF4 weight (double-quantized), on all
/// cores: bytes of codes and scales read per second, next to a 1-core memcpy.
fn gemv() {
    let (o, h) = (11008, 4096);
    let mut rng = StdRng::seed_from_u64(0);
    let w: Vec<f32> = (0..o * h)
        .map(|_| 0.02 * (rng.random::<f32>() - 0.5))
        .collect();
    let x: Vec<f32> = (0..h).map(|_| rng.random::<f32>() - 0.5).collect();
    let mut copy_out = vec![0f32; o * h];
    let copy = best(5, || {
        copy_out.copy_from_slice(std::hint::black_box(&w));
        std::hint::black_box(&mut copy_out);
    });
    let q = Nf4Tensor::quantize("w", &w, &[o, h], true).unwrap();
    let fused = q.fused().expect("rows of whole blocks");
    let s = best(10, || {
        std::hint::black_box(prolora::kernels::quant_gemv::xwt(&fused, &x, 1).unwrap());
    });
    let bytes = q.storage_bytes();
    println!("| what | GB/s |\n|---|---|");
    println!(
        "| memcpy (1 core, read + write) | {:.2} |",
        8.0 * (o * h) as f64 / copy / 1e9
    );
    println!(
        "| fused NF4 x·Wᵀ, 1 row, {} cores ({:.2} ms) | {:.2} |",
        rayon::current_num_threads(),
        s * 1e3,
        bytes as f64 / s / 1e9
    );
}

/// The best of `reps` timings of `f`, in seconds.
/// One 7B MLP weight (11008 × 4096): GB/s of dequantized output written.
fn dequant() {
    let (o, h) = (11008, 4096);
    let mut rng = StdRng::seed_from_u64(0);
    let x: Vec<f32> = (0..o * h)
        .map(|_| 0.02 * (rng.random::<f32>() - 0.5))
        .collect();
    let q = Nf4Tensor::quantize("w", &x, &[o, h], true).unwrap();
    let threads = rayon::current_num_threads();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    println!("| what | output | GB/s |\n|---|---|---|");
    let gbs = |bytes: usize, s: f64| bytes as f64 / s / 1e9;
    let mut out = vec![0f32; o * h];
    let bytes = 4 * o * h;
    let copy = best(5, || out.copy_from_slice(&x));
    println!("| memcpy (1 core) | f32 | {:.2} |", gbs(bytes, copy));
    let s = best(5, || one.install(|| q.dequantize_into(&mut out)));
    println!("| dequant, 1 core | f32 | {:.2} |", gbs(bytes, s));
    let s = best(5, || q.dequantize_into(&mut out));
    println!("| dequant, {threads} cores | f32 | {:.2} |", gbs(bytes, s));
    let mut out16 = vec![half::bf16::ZERO; o * h];
    let s = best(5, || one.install(|| q.dequantize_into(&mut out16)));
    println!("| dequant, 1 core | bf16 | {:.2} |", gbs(2 * o * h, s));
    let s = best(5, || q.dequantize_into(&mut out16));
    println!(
        "| dequant, {threads} cores | bf16 | {:.2} |",
        gbs(2 * o * h, s)
    );
}

/// LoRA r 8 (α 16, dropout 0.1) on all seven linears of `model`.
fn attach_lora(model: &mut Llama) -> AdapterSet {
    let adapter = AdapterConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.1,
        ..Default::default()
    };
    let mut rng = StdRng::seed_from_u64(1);
    let set = AdapterSet::new(&adapter, &model.cfg, DType::F32, &Device::Cpu, &mut rng).unwrap();
    set.attach_to(model);
    set
}

/// Every token labelled, random ids.
fn batch(rows: usize, len: usize) -> Batch {
    let mut rng = StdRng::seed_from_u64(2);
    let examples: Vec<Encoded> = (0..rows)
        .map(|_| {
            let ids: Vec<u32> = (0..len).map(|_| rng.random_range(3..32000)).collect();
            Encoded {
                labels: ids.iter().map(|&i| i as i64).collect(),
                input_ids: ids,
            }
        })
        .collect();
    Batch::new(&examples.iter().collect::<Vec<_>>())
}

/// Forward, backward (activation checkpointing when `checkpointing`) and AdamW on the
/// adapters, as the trainer does it; seconds.
fn train_step(
    model: &Llama,
    set: &AdapterSet,
    opt: &mut AdamW,
    batch: &Batch,
    seed: u64,
    checkpointing: bool,
) -> f64 {
    let t = Instant::now();
    let vars: Vec<_> = set.trainable().into_iter().map(|(_, v, _)| v).collect();
    let mut grads: Grads = vec![None; vars.len()];
    let labels = batch.label_tokens() as f64;
    accumulate_grads(
        model,
        batch,
        &Ctx::train(seed),
        &vars,
        labels,
        checkpointing,
        &mut grads,
    )
    .unwrap();
    opt.step(&grads, 1e-4, 1.0).unwrap();
    t.elapsed().as_secs_f64()
}

fn optimizer(set: &AdapterSet) -> AdamW {
    AdamW::new(
        set.trainable(),
        AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )
}

/// The issue's tiny LLaMA: hidden 256, 4 layers, vocab 32000; batch 4 × 128, LoRA r 8.
fn step() {
    let cfg = LlamaConfig::from_json(
        r#"{"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false}"#,
    )
    .unwrap();
    let batch = batch(4, 128);
    println!("| base | median step (s) |\n|---|---|");
    let mut medians = Vec::new();
    for (name, quant) in [
        ("f32", Quantization::None),
        (
            "nf4 + double quant",
            Quantization::Nf4 { double_quant: true },
        ),
    ] {
        let mut model = Llama::load_quantized(
            &cfg,
            &RandomWeights::new(0),
            DType::F32,
            quant,
            &Device::Cpu,
        )
        .unwrap();
        let set = attach_lora(&mut model);
        let mut opt = optimizer(&set);
        for s in 0..2 {
            train_step(&model, &set, &mut opt, &batch, s, false);
        }
        let mut t: Vec<f64> = (0..7)
            .map(|s| train_step(&model, &set, &mut opt, &batch, 10 + s, false))
            .collect();
        t.sort_by(f64::total_cmp);
        println!("| {name} | {:.3} |", t[3]);
        medians.push(t[3]);
    }
    println!(
        "NF4 overhead: {:+.1} %",
        100.0 * (medians[1] / medians[0] - 1.0)
    );
}

/// Peak resident memory of this process so far (VmHWM), GiB.
fn peak_rss_gib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / (1 << 20) as f64)
}

/// One LoRA step (batch 1 × 128, r 8 on all seven linears, activation checkpointing) on the 7B
/// preset in NF4.
fn rss7b() {
    let source = ModelSource::resolve("llama2-7b", "main").unwrap();
    let t = Instant::now();
    let mut model = source
        .load_quantized(
            DType::F32,
            Quantization::Nf4 { double_quant: true },
            &Device::Cpu,
        )
        .unwrap();
    let load_s = t.elapsed().as_secs_f64();
    let load_rss = peak_rss_gib();
    let set = attach_lora(&mut model);
    let mut opt = optimizer(&set);
    // Activation checkpointing, as the paper's configs train.
    let step_s = train_step(&model, &set, &mut opt, &batch(1, 128), 0, true);
    println!("| what | value |\n|---|---|");
    println!("| load (random NF4 + f32 embeddings) | {load_s:.1} s, peak RSS {load_rss:.2} GiB |");
    println!("| one LoRA step, 1 × 128, checkpointing | {step_s:.1} s |");
    println!("| peak RSS, load + step | {:.2} GiB |", peak_rss_gib());
}
