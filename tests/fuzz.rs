//! Fuzzing on stable Rust: every parser of user input, fed mutations of a valid input (bytes
//! deleted, inserted, replaced), must answer with an error or a value — never a panic. A short
//! run is part of `cargo test`; `PROLORA_FUZZ_CASES=100000 cargo test --release --test fuzz`
//! is the long one (each target reports its case count).

use candle_core::{Device, Tensor};
use prolora::adapters::peft;
use prolora::config::RunConfig;
use prolora::data::chat::{encode_all, parse_line, ChatEncoder, ChatFormat};
use prolora::model::nf4::Nf4Tensor;
use prolora::model::LlamaConfig;
use prolora::source;
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

mod common;
use common::{fixture, root};

/// Cases per target: 64 in `cargo test`, `PROLORA_FUZZ_CASES` for a long run.
fn cases() -> u32 {
    std::env::var("PROLORA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// One edit of a byte string: (kind, position, byte).
type Edit = (u8, usize, u8);

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec((0u8..3, any::<usize>(), any::<u8>()), 1..8)
}

/// `base` with `edits` applied: 0 deletes, 1 inserts, 2 replaces the byte at a position.
fn mutate(base: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut v = base.to_vec();
    for &(kind, pos, byte) in edits {
        let at = if v.is_empty() { 0 } else { pos % v.len() };
        match kind {
            0 if !v.is_empty() => {
                v.remove(at);
            }
            1 => v.insert(at, byte),
            _ if !v.is_empty() => v[at] = byte,
            _ => v.push(byte),
        }
    }
    v
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Counts the cases a target ran, printed when the run ends.
struct Count(&'static str, AtomicUsize);

impl Count {
    const fn new(name: &'static str) -> Self {
        Self(name, AtomicUsize::new(0))
    }
    fn tick(&self) {
        self.1.fetch_add(1, Ordering::Relaxed);
    }
    fn report(&self) {
        eprintln!(
            "fuzz {}: {} cases, no panic",
            self.0,
            self.1.load(Ordering::Relaxed)
        );
    }
}

static RUN_CONFIG: Count = Count::new("run config TOML");
static OVERRIDE: Count = Count::new("--set override");
static CHAT: Count = Count::new("chat jsonl line");
static ADAPTER: Count = Count::new("adapter_config.json");
static SAFETENSORS: Count = Count::new("safetensors bytes");
static QUANT_STATE: Count = Count::new("bitsandbytes quant_state");
static MODEL_CONFIG: Count = Count::new("config.json");

fn config(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

#[test]
fn run_configs_and_overrides_never_panic() {
    let base = std::fs::read(root().join("configs/demo-prolora.toml")).unwrap();
    proptest!(config(cases()), |(e in edits())| {
        RUN_CONFIG.tick();
        if let Ok(cfg) = toml::from_str::<RunConfig>(&text(&mutate(&base, &e))) {
            let _ = cfg.validate();
        }
    });
    RUN_CONFIG.report();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("run.toml");
    std::fs::write(&path, &base).unwrap();
    let good = b"adapter.sharing_rate_b=[3, {a = 1}]";
    proptest!(config(cases()), |(e in edits())| {
        OVERRIDE.tick();
        let _ = RunConfig::load(&path, &[text(&mutate(good, &e))]);
    });
    OVERRIDE.report();
}

#[test]
fn chat_lines_never_panic() {
    let data = std::fs::read_to_string(root().join("data/sample_chat.jsonl")).unwrap();
    let base = data.lines().next().unwrap().as_bytes().to_vec();
    let encoder = ChatEncoder::new(
        source::tokenizer("llama2-7b", "main").unwrap(),
        ChatFormat::Tulu,
    )
    .unwrap();
    proptest!(config(cases()), |(e in edits())| {
        CHAT.tick();
        if let Ok(example) = parse_line(&text(&mutate(&base, &e))) {
            let _ = encode_all(&encoder, &[example], 64);
        }
    });
    CHAT.report();
}

#[test]
fn adapter_configs_never_panic() {
    let base = std::fs::read(fixture("our-exports/prolora/adapter_config.json")).unwrap();
    proptest!(config(cases()), |(e in edits())| {
        ADAPTER.tick();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&mutate(&base, &e)) {
            let _ = peft::parse_config(&v);
        }
    });
    ADAPTER.report();
}

#[test]
fn safetensors_bytes_never_panic() {
    let base = std::fs::read(fixture("peft-lora/adapter/adapter_model.safetensors")).unwrap();
    // Most edits land in the 8-byte length and the JSON header, where parsing happens.
    let header = 8 + u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    proptest!(config(cases()), |(e in edits())| {
        SAFETENSORS.tick();
        let (head, body) = base.split_at(header.min(base.len()));
        let mut bytes = mutate(head, &e);
        bytes.extend_from_slice(body);
        let _ = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu);
    });
    SAFETENSORS.report();
}

#[test]
fn bitsandbytes_quant_states_never_panic() {
    let values: Vec<f32> = (0..200).map(|i| (i as f32 * 0.37).sin()).collect();
    let q = Nf4Tensor::quantize("w", &values, &[10, 20], true).unwrap();
    let stored: HashMap<String, Tensor> = prolora::model::bnb::write("w", &q)
        .unwrap()
        .into_iter()
        .collect();
    let key = prolora::model::bnb::quant_state_key("w");
    let state: Vec<u8> = stored[&key].to_vec1().unwrap();
    proptest!(config(cases()), |(e in edits())| {
        QUANT_STATE.tick();
        let mut tensors = stored.clone();
        let bytes = mutate(&state, &e);
        let n = bytes.len();
        tensors.insert(key.clone(), Tensor::from_vec(bytes, n, &Device::Cpu).unwrap());
        let load = |k: &str| Ok(tensors.get(k).cloned());
        let _ = prolora::model::bnb::read("w", &[10, 20], &load);
    });
    QUANT_STATE.report();
}

#[test]
fn model_configs_never_panic() {
    let base = std::fs::read(fixture("llama-gqa/config.json")).unwrap();
    proptest!(config(cases()), |(e in edits())| {
        MODEL_CONFIG.tick();
        let _ = LlamaConfig::from_json(&text(&mutate(&base, &e)));
    });
    MODEL_CONFIG.report();
}

static RANDOM: Count = Count::new("random bytes, every parser");

#[test]
fn random_bytes_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("run.toml");
    proptest!(config(cases()), |(bytes in prop::collection::vec(any::<u8>(), 0..256))| {
        RANDOM.tick();
        let s = text(&bytes);
        let _ = toml::from_str::<RunConfig>(&s);
        std::fs::write(&path, &bytes).unwrap();
        let _ = RunConfig::load(&path, &[s.clone()]);
        let _ = parse_line(&s);
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            let _ = peft::parse_config(&v);
        }
        let _ = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu);
        let _ = LlamaConfig::from_json(&s);
    });
    RANDOM.report();
}
