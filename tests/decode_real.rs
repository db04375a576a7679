//! Decoding SmolLM2-135M-Instruct with dense linears (the skinny products of a decoding step:
//! one row alone, several rows together; f32 weights, and bf16 weights widened in registers)
//! gives transformers' greedy tokens (scripts/reference/make_smollm2_greedy_golden.py: its
//! GGUF loader, `generate` with its KV cache, each prompt alone, f32 and bf16), and each
//! sequence the same tokens alone or in a batch; f32 on rayon's pool and on a decoding team.

mod common;

use candle_core::{DType, Device, Tensor};
use prolora::generate::{complete, complete_batch, Request, Settings};
use prolora::gguf::weights::GgufWeights;
use prolora::model::weights::WeightSource;
use prolora::source::ModelSource;
use serde_json::Value;

/// The GGUF's tensors through the default `get_linear`: dense, in the dtype asked for.
struct Dense(GgufWeights);

impl WeightSource for Dense {
    fn get(&self, n: &str, s: &[usize], d: DType, dev: &Device) -> anyhow::Result<Tensor> {
        self.0.get(n, s, d, dev)
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Decodes the golden prompts alone and together; the first `agree[i]` tokens of prompt i must
/// be transformers' (its whole continuation where `agree[i]` is `usize::MAX`).
fn check(dtype: DType, golden_key: &str, agree: [usize; 2]) {
    let text = std::fs::read_to_string(common::fixture("gguf/smollm2_greedy.json")).unwrap();
    let golden: Value = serde_json::from_str(&text).unwrap();
    let path = common::smollm2::smollm2_gguf();
    let source = ModelSource::resolve(path.to_str().unwrap(), "main").unwrap();
    let weights = Dense(GgufWeights::open(&path, &source.config).unwrap());
    let model = prolora::model::Llama::load(&source.config, &weights, dtype, &Device::Cpu).unwrap();
    let tokenizer = source.tokenizer(None).unwrap().tokenizer().clone();
    let settings = Settings::greedy(golden["new_tokens"].as_u64().unwrap() as usize);
    let prompts: Vec<Vec<u32>> = golden["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let want: Vec<Vec<u32>> = golden[golden_key]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    // One row per step.
    let mut alone = Vec::new();
    for ((prompt, want), n) in prompts.iter().zip(&want).zip(agree) {
        let got = complete(&model, &tokenizer, prompt, &settings).unwrap().ids;
        let n = n.min(want.len());
        assert_eq!(got[..n], want[..n], "{golden_key}, prompt {prompt:?} alone");
        alone.push(got);
    }
    // Both rows per step (left-padded, each at its own positions).
    let requests: Vec<Request> = prompts
        .iter()
        .map(|p| Request {
            prompt: p.clone(),
            seed: 0,
        })
        .collect();
    let together = complete_batch(&model, &tokenizer, &requests, &settings).unwrap();
    for (got, alone) in together.iter().zip(&alone) {
        assert_eq!(&got.ids, alone, "{golden_key}, decoded together");
    }
}

#[test]
fn f32_decoding_gives_transformers_greedy_tokens() {
    check(DType::F32, "f32", [usize::MAX; 2]);
    common::in_a_pool_of_two(|| check(DType::F32, "f32", [usize::MAX; 2]));
}

/// In bf16 the two implementations round different intermediates (ours: the norms and the
/// attention in f32 or f64, the products summed in f32 in another order), so a near tie can
/// go either way: the story's third token does (it flipped with the summation order). The confident
/// continuation of "The capital of France is" holds whole.
#[test]
fn bf16_decoding_gives_transformers_greedy_tokens() {
    common::in_a_pool_of_two(|| check(DType::BF16, "bf16", [2, usize::MAX]));
}
