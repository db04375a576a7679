//! Every registered adapter method through the same checks (a new method gets them by its
//! registry line): the count from shapes equals the trainable elements the trainer creates,
//! `adapter_config.json` round-trips, optional keys absent or `null` take their defaults, and
//! backprop equals finite differences. Then adapter configs as other tools write them: the
//! paper's PRoLoRA keys only, and a PEFT LoRA config with every optional field `null`.

use candle_core::{DType, Device};
use prolora::adapters::{peft, registry, AdapterConfig, AdapterSet};
use prolora::model::nf4::Quantization;
use prolora::model::LlamaConfig;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;
use std::process::Command;

mod common;
use common::{check_gradients_on, fixture};

/// Every linear at least 7 wide, so PRoLoRA's default sharing rate (7) fits.
const WIDE_ENOUGH: &str = r#"{"vocab_size": 11, "hidden_size": 16, "intermediate_size": 24,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "rope_theta": 100.0, "tie_word_embeddings": false}"#;

/// The method's defaults, rank 3, α 4, no dropout, on the method's default targets.
fn default_config(reg: &registry::Registration) -> AdapterConfig {
    AdapterConfig {
        rank: 3,
        alpha: 4.0,
        dropout: 0.0,
        targets: reg.default_targets.iter().map(|s| s.to_string()).collect(),
        init_from: None,
        method: (reg.from_toml)(toml::Table::new()).expect("every option has a default"),
    }
}

/// The keys an adapter_config.json of each method cannot do without.
fn required_keys(kind: &str) -> &'static [&'static str] {
    match kind {
        "lora" | "tied-lora" => &["peft_type", "r", "target_modules", "lora_alpha"],
        "prolora" => &[
            "peft_type",
            "r",
            "target_modules",
            "lora_alpha",
            "unshared_r",
            "sharing_rate_a",
            "sharing_rate_b",
        ],
        "vera" => &["peft_type", "r", "target_modules"],
        other => panic!("{other}: add its required keys here"),
    }
}

#[test]
fn every_method_counts_round_trips_and_has_true_gradients() {
    let model = LlamaConfig::from_json(WIDE_ENOUGH).unwrap();
    assert_eq!(registry::METHODS.len(), 4);
    for reg in registry::METHODS {
        let cfg = default_config(reg);
        let kind = reg.kind;
        assert_eq!(cfg.kind(), kind);

        // The count from shapes is what the trainer trains.
        let set = AdapterSet::new(
            &cfg,
            &model,
            DType::F32,
            &Device::Cpu,
            &mut StdRng::seed_from_u64(1),
        )
        .unwrap();
        let trained: usize = set.trainable().iter().map(|(_, v, _)| v.elem_count()).sum();
        assert!(trained > 0, "{kind}");
        assert_eq!(cfg.param_count(&model).unwrap(), trained, "{kind}");

        // adapter_config.json → config → adapter_config.json is the identity.
        let json = peft::config_json(&cfg, "tiny");
        assert_eq!(json["peft_type"], reg.peft_type, "{kind}");
        let back = peft::parse_config(&json).unwrap();
        assert!(*back.method == *cfg.method, "{kind}: {back:?} vs {cfg:?}");
        assert_eq!(peft::config_json(&back, "tiny"), json, "{kind}");

        // Each key absent or null: an error naming it if required, else the same config.
        let required = required_keys(kind);
        for key in json.as_object().unwrap().keys() {
            for edit in ["absent", "null"] {
                let mut edited = json.clone();
                let map = edited.as_object_mut().unwrap();
                if edit == "absent" {
                    map.remove(key);
                } else {
                    map.insert(key.clone(), Value::Null);
                }
                match peft::parse_config(&edited) {
                    Ok(c) => {
                        assert!(
                            !required.contains(&key.as_str()),
                            "{kind}: {key} {edit} accepted"
                        );
                        assert_eq!(peft::config_json(&c, "tiny"), json, "{kind}: {key} {edit}");
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        assert!(
                            required.contains(&key.as_str()),
                            "{kind}: {key} {edit}: {msg}"
                        );
                        assert!(msg.contains(key.as_str()), "{kind}: {key} {edit}: {msg}");
                    }
                }
            }
        }

        // Backprop through the method equals central finite differences.
        check_gradients_on(WIDE_ENOUGH, &cfg, Quantization::None);
    }
}

/// A wrongly typed value names the key, the value and what was expected.
#[test]
fn a_wrongly_typed_peft_key_is_named() {
    let json = peft::config_json(&AdapterConfig::default(), "tiny");
    let mut bad = json.clone();
    bad["r"] = Value::String("4".into());
    let msg = format!("{:#}", peft::parse_config(&bad).unwrap_err());
    assert!(msg.contains("\"r\"") && msg.contains("\"4\""), "{msg}");
}

fn eval_loss(adapter: &std::path::Path) -> f64 {
    let data = fixture("peft-lora/data.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args(["eval", "--model"])
        .arg(fixture("peft-lora/base"))
        .arg("--adapter")
        .arg(adapter)
        .arg("--data")
        .arg(&data)
        .args(["--max-seq-len", "64", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["loss"].as_f64().unwrap()
}

/// `dir`'s weights with `config` as its adapter_config.json, in a temporary directory.
fn with_config(dir: &str, config: Value) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture(&format!("{dir}/adapter_model.safetensors")),
        tmp.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("adapter_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    tmp
}

fn golden(file: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(file)).unwrap()).unwrap()
}

/// The paper's PRoLoRA as another tool would save it — none of our Table 4 extensions
/// (`share_axis`, `rotate_axis`) — gives the loss stock PEFT computes for the same ΔW
/// (the adapter's LoRA export, scripts/reference/check_exports.py).
#[test]
fn a_prolora_config_with_the_papers_keys_only_gives_the_reference_loss() {
    let config = serde_json::json!({
        "peft_type": "PROLORA",
        "r": 8,
        "lora_alpha": 16,
        "unshared_r": 1,
        "sharing_rate_a": 7,
        "sharing_rate_b": 7,
        "rotation": true,
        "rectified_init": true,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "lora_dropout": 0.1,
    });
    let adapter = with_config("our-exports/prolora", config);
    let ours = eval_loss(adapter.path());
    let want = golden("our-exports/expected.json")["prolora"]["export_loss"]
        .as_f64()
        .unwrap();
    assert!(((ours - want) / want).abs() < 1e-4, "{ours} vs PEFT {want}");
}

/// PEFT's own LoRA config with every optional field `null` gives PEFT's loss.
#[test]
fn a_peft_lora_config_with_every_optional_field_null_gives_the_reference_loss() {
    let mut config = golden("peft-lora/adapter/adapter_config.json");
    for (key, value) in config.as_object_mut().unwrap() {
        if !["peft_type", "r", "lora_alpha", "target_modules"].contains(&key.as_str()) {
            *value = Value::Null;
        }
    }
    let adapter = with_config("peft-lora/adapter", config);
    let ours = eval_loss(adapter.path());
    let want = golden("peft-lora/expected.json")["loss"].as_f64().unwrap();
    assert!(((ours - want) / want).abs() < 1e-4, "{ours} vs PEFT {want}");
}
