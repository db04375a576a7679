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

/// Greatest |ours − theirs| over the probed logits of every golden prompt, whether every
/// position's argmax agrees, and our prediction after each prompt.
fn compare(quant: Quantization) -> (f64, bool, Vec<u32>) {
    let source =
        ModelSource::resolve(common::smollm2::smollm2_gguf().to_str().unwrap(), "main").unwrap();
    let model = source
        .load_quantized(DType::F32, quant, &Device::Cpu)
        .unwrap();
    let mut worst = 0f64;
    let mut argmax_agrees = true;
    let mut next = Vec::new();
    for case in goldens()["cases"].as_array().unwrap() {
        let ids = ids_of(&case["ids"]);
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model
            .logits(&input, &Ctx::eval())
            .unwrap()
            .squeeze(0)
            .unwrap();
        let argmax: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
        argmax_agrees &= argmax == ids_of(&case["argmax"]);
        next.push(argmax[ids.len() - 1]);
        let last: Vec<f32> = logits.get(ids.len() - 1).unwrap().to_vec1().unwrap();
        let pairs = [("top_ids", "top_logits"), ("probe_ids", "probe_logits")];
        for (idk, vk) in pairs {
            for (id, want) in ids_of(&case[idk]).iter().zip(floats(&case[vk])) {
                worst = worst.max((f64::from(last[*id as usize]) - want).abs());
            }
        }
        let max = last.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let lse = max
            + last
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        worst = worst.max((lse - case["logsumexp"].as_f64().unwrap()).abs());
    }
    (worst, argmax_agrees, next)
}

#[test]
fn config_comes_from_the_metadata() {
    let source =
        ModelSource::resolve(common::smollm2::smollm2_gguf().to_str().unwrap(), "main").unwrap();
    assert!(matches!(source.origin, Origin::Gguf(_)));
    let c = &source.config;
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers
        ),
        (49152, 576, 1536, 30)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (9, 3, 64)
    );
    assert_eq!(
        (c.rope_theta, c.rms_norm_eps),
        (100000.0, f64::from(1e-5f32))
    );
    assert_eq!(c.max_position_embeddings, 8192);
    assert!(c.tie_word_embeddings);
    assert_eq!((c.bos_token_id, c.eos_token_id), (1, 2));
}

/// Logits of magnitude up to ~30, both sides in f32 with different summation orders: they
/// agree to 3e-5 (measured), checked to 2e-4 absolute.
#[test]
fn logits_equal_transformers_gguf_loader() {
    let (worst, argmax_agrees, _) = compare(Quantization::None);
    assert!(argmax_agrees);
    assert!(worst < 2e-4, "largest logit difference {worst}");
}

/// `--quantize nf4` on a GGUF: its dequantized weights requantized to NF4 at load. NF4 of
/// Q4_1 values is a second 4-bit rounding of a 135M model (logits move by up to ~10 here), so
/// only a confident prediction is expected to hold: " Paris" after "The capital of France is"
/// (a margin of 2.5 in transformers' logits).
#[test]
fn nf4_from_a_gguf_keeps_a_confident_prediction() {
    let (worst, _, next) = compare(Quantization::Nf4 { double_quant: true });
    assert!(worst > 1e-2, "the layers are NF4, not the GGUF's blocks");
    let golden = goldens();
    assert_eq!(
        next[0],
        golden["cases"][0]["top_ids"][0].as_u64().unwrap() as u32
    );
    assert_eq!(next[0], 7042);
}

/// The GGUF read as dense f32 linears (what `--quantize nf4`, `quantize` and `merge` read)
/// gives the logits of the linears kept in their blocks.
#[test]
fn dense_and_block_linears_give_the_same_logits() {
    use prolora::gguf::weights::GgufWeights;
    use prolora::model::weights::WeightSource;
    /// The GGUF's tensors through the default `get_linear`: dense.
    struct Dense(GgufWeights);
    impl WeightSource for Dense {
        fn get(&self, n: &str, s: &[usize], d: DType, dev: &Device) -> anyhow::Result<Tensor> {
            self.0.get(n, s, d, dev)
        }
        fn contains(&self, name: &str) -> bool {
            self.0.contains(name)
        }
    }
    let path = common::smollm2::smollm2_gguf();
    let source = ModelSource::resolve(path.to_str().unwrap(), "main").unwrap();
    let blocks = source.load(DType::F32, &Device::Cpu).unwrap();
    let dense = Dense(GgufWeights::open(&path, &source.config).unwrap());
    let dense =
        prolora::model::Llama::load(&source.config, &dense, DType::F32, &Device::Cpu).unwrap();
    let ids = ids_of(&goldens()["cases"][1]["ids"]);
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = |m: &prolora::model::Llama| -> Vec<f32> {
        let l = m.logits(&input, &Ctx::eval()).unwrap();
        l.flatten_all().unwrap().to_vec1().unwrap()
    };
    let worst = logits(&blocks)
        .iter()
        .zip(logits(&dense))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "{worst}");
}

#[test]
fn a_missing_or_foreign_gguf_is_a_clear_error() {
    let err = |spec: &str| {
        ModelSource::resolve(spec, "main")
            .err()
            .unwrap()
            .to_string()
    };
    let e = err("no/such/model.gguf");
    assert!(e.contains("no such GGUF file"), "{e}");
    let quants = common::fixture("gguf/quants.gguf");
    let e = err(quants.to_str().unwrap());
    assert!(
        e.contains("quants.gguf") && e.contains("general.architecture is \"test\""),
        "{e}"
    );
    let tokenizer_only = common::fixture("gguf/spm-tokenizer.gguf");
    let e = err(tokenizer_only.to_str().unwrap());
    assert!(e.contains("no metadata key llama.embedding_length"), "{e}");
}

/// The memory check counts a GGUF base's quantized linears at their stored size: SmolLM2's
/// 30 × 3,538,944 block weights in Q4_1 (20 bytes per 32 weights), not 4 bytes each.
#[test]
fn the_memory_estimate_counts_linears_as_stored() {
    let file = prolora::gguf::GgufFile::open(&common::smollm2::smollm2_gguf()).unwrap();
    let weights = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536);
    assert_eq!(
        prolora::gguf::weights::block_linear_bytes(&file, 4),
        weights as u64 * 20 / 32
    );
}
