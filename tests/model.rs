//! The decoder against transformers' `LlamaForCausalLM`, and its gradients against finite
//! differences. Goldens: scripts/reference/make_goldens.py.

use candle_core::{DType, Device};
use prolora::adapters::{
    peft, AdapterConfig, Axis, ProloraConfig, ProloraForward, TiedLoraConfig, VeraConfig,
};
use prolora::ctx::Ctx;
use prolora::data::chat::Encoded;
use prolora::model::nf4::Quantization;
use prolora::model::LlamaConfig;
use prolora::source::ModelSource;

mod common;
use common::{check_gradients, fixture};

/// Max |ours − golden| of the logits of a transformers-written model.
fn logits_error(dir: &str) -> f32 {
    let dir = fixture(dir);
    let source = ModelSource::resolve(dir.to_str().unwrap(), "main").unwrap();
    let model = source.load(DType::F32, &Device::Cpu).unwrap();
    let golden =
        candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
    let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
    let ours = model.logits(&ids, &Ctx::eval()).unwrap();
    let diff = (ours - &golden["logits"]).unwrap().abs().unwrap();
    let err = diff
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!("{}: max |Δlogit| = {err:e}", dir.display());
    err
}

#[test]
fn logits_match_transformers_gqa_untied_sharded() {
    let err = logits_error("llama-gqa");
    assert!(err < 1e-4, "max |Δlogit| = {err}");
}

#[test]
fn logits_match_transformers_tied_bf16_old_config_layout() {
    let err = logits_error("llama-tied");
    assert!(err < 1e-4, "max |Δlogit| = {err}");
}

#[test]
fn both_config_layouts_are_read() {
    let new = LlamaConfig::from_file(&fixture("llama-gqa/config.json")).unwrap();
    assert_eq!(
        (new.rope_theta, new.num_key_value_heads, new.head_dim),
        (50000.0, 2, 16)
    );
    assert!(!new.tie_word_embeddings);
    let old = LlamaConfig::from_file(&fixture("llama-tied/config.json")).unwrap();
    assert_eq!(
        (old.rope_theta, old.rms_norm_eps, old.head_dim),
        (25000.0, 1e-6, 12)
    );
    assert!(old.tie_word_embeddings);
}

/// Loss over the reference's own encoded examples, with a PEFT-written adapter attached.
fn peft_loss(adapter: Option<&str>, quant: Quantization) -> (f64, usize, serde_json::Value) {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("peft-lora/expected.json")).unwrap())
            .unwrap();
    let examples: Vec<Encoded> = expected["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Encoded {
            input_ids: serde_json::from_value(e["input_ids"].clone()).unwrap(),
            labels: serde_json::from_value(e["labels"].clone()).unwrap(),
        })
        .collect();
    let source = ModelSource::resolve(fixture("peft-lora/base").to_str().unwrap(), "main").unwrap();
    let mut model = source
        .load_quantized(DType::F32, quant, &Device::Cpu)
        .unwrap();
    if let Some(dir) = adapter {
        peft::load_into(&fixture(dir), &mut model).unwrap();
    }
    let (loss, tokens) = prolora::eval::evaluate(&model, &examples, 4).unwrap();
    (loss, tokens, expected)
}

#[test]
fn loss_with_peft_written_lora_equals_pytorch_peft() {
    let (loss, tokens, expected) = peft_loss(Some("peft-lora/adapter"), Quantization::None);
    let want = expected["loss"].as_f64().unwrap();
    assert_eq!(tokens as u64, expected["tokens"].as_u64().unwrap());
    assert!(
        ((loss - want) / want).abs() < 1e-4,
        "loss {loss} vs PEFT {want}"
    );
    // The adapter really changes the result: the base loss differs by far more than the tolerance.
    let (base, _, expected) = peft_loss(None, Quantization::None);
    let want_base = expected["loss_base"].as_f64().unwrap();
    assert!(
        ((base - want_base) / want_base).abs() < 1e-4,
        "base loss {base} vs {want_base}"
    );
    assert!((loss - base).abs() > 1e-3);
}

#[test]
fn loss_with_peft_written_vera_equals_pytorch_peft() {
    // scripts/reference/make_vera_golden.py: PEFT's VeRA (save_projection=True, r 8, all seven
    // linears, non-trivial λ_d and λ_b) on the same base and examples.
    let (loss, tokens, _) = peft_loss(Some("peft-vera/adapter"), Quantization::None);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("peft-vera/expected.json")).unwrap())
            .unwrap();
    let want = expected["loss"].as_f64().unwrap();
    eprintln!("VeRA loss {loss} vs PEFT {want}");
    assert_eq!(tokens as u64, expected["tokens"].as_u64().unwrap());
    assert!(
        ((loss - want) / want).abs() < 1e-4,
        "loss {loss} vs PEFT {want}"
    );
    let base = expected["loss_base"].as_f64().unwrap();
    assert!((loss - base).abs() > 1e-2, "the adapter must matter");
}

/// The same with the base in NF4 + double quant, against transformers + PEFT + bitsandbytes
/// (scripts/reference/make_nf4_model_goldens.py).
#[test]
fn loss_with_nf4_base_and_peft_lora_equals_pytorch_bitsandbytes() {
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("peft-lora-nf4/expected.json")).unwrap(),
    )
    .unwrap();
    let nf4 = Quantization::Nf4 { double_quant: true };
    for (adapter, key) in [(Some("peft-lora/adapter"), "loss"), (None, "loss_base")] {
        let (loss, tokens, full) = peft_loss(adapter, nf4);
        let w = want[key].as_f64().unwrap();
        eprintln!("nf4 {key}: ours {loss} vs bitsandbytes {w}");
        assert_eq!(tokens as u64, want["tokens"].as_u64().unwrap());
        assert!(((loss - w) / w).abs() < 1e-4, "{key}: {loss} vs {w}");
        // We match the 4-bit reference far better than the full-precision model does.
        let full = full[key].as_f64().unwrap();
        assert!(
            (loss - w).abs() * 10.0 < (full - w).abs(),
            "{key}: ours {loss}, 4-bit {w}, full precision {full}"
        );
    }
}

/// Every adapter kind (PRoLoRA in both forwards, with rotation and non-divisible chunks: the
/// shared A0's gradient sums over all its rotated copies) against central finite differences.
#[test]
fn adapter_gradients_match_central_finite_differences() {
    let base = AdapterConfig {
        rank: 3,
        alpha: 4.0,
        dropout: 0.0,
        ..Default::default()
    };
    let prolora_opts = |forward: ProloraForward| ProloraConfig {
        unshared_rank: 1,
        sharing_rate_a: 3,
        sharing_rate_b: Some(3),
        forward,
        ..Default::default()
    };
    let with = |method: ProloraConfig| AdapterConfig {
        rank: 4,
        method: Box::new(method),
        ..base.clone()
    };
    let prolora = |forward: ProloraForward| with(prolora_opts(forward));
    let cases = [
        base.clone(),
        prolora(ProloraForward::Chunked),
        prolora(ProloraForward::Materialized),
        with(ProloraConfig {
            share_axis: Axis::Rank,
            rotate_axis: Axis::Hidden,
            ..prolora_opts(ProloraForward::Materialized)
        }),
        AdapterConfig {
            method: Box::new(VeraConfig::default()),
            ..base.clone()
        },
        AdapterConfig {
            targets: vec!["q_proj".into(), "k_proj".into(), "v_proj".into()],
            method: Box::new(TiedLoraConfig::default()),
            ..base.clone()
        },
    ];
    for cfg in &cases {
        check_gradients(cfg, Quantization::None);
    }
}

/// Through 4-bit base layers the input gradient comes from the NF4 op's own backward.
#[test]
fn adapter_gradients_match_central_finite_differences_with_nf4_base() {
    let lora = AdapterConfig {
        rank: 3,
        alpha: 4.0,
        dropout: 0.0,
        ..Default::default()
    };
    check_gradients(&lora, Quantization::Nf4 { double_quant: true });
}
