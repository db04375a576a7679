//! Decoding SmolLM2-135M-Instruct from its Q4_1 GGUF (f32 activations, and 8-bit ones), and in
//! NF4, with the fused few-row products (each step's one row reads the codes in place; the
//! GGUF's tied head its Q8_0 embedding; `generate::complete` on a team, as the CLI decodes) gives
//! the greedy tokens of the composed form: the argmax at every position of
//! one full-sequence forward over prompt and completion, whose 20+ rows take the tiled
//! dequantize-then-GEMM path and the dense head.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use prolora::ctx::Ctx;
use prolora::generate::{complete, Settings};
use prolora::model::nf4::Quantization;
use prolora::model::Llama;
use prolora::source::ModelSource;

/// The composed form's prediction after each prefix of `ids` (one forward, many rows), and
/// its margin there (top logit − runner-up).
fn composed_argmax(model: &Llama, ids: &[u32]) -> Vec<(u32, f32)> {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.logits(&input, &Ctx::eval()).unwrap().i(0).unwrap();
    (0..ids.len())
        .map(|p| {
            let mut row: Vec<(f32, u32)> = logits
                .i(p)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .zip(0u32..)
                .collect();
            row.sort_by(|a, b| b.0.total_cmp(&a.0));
            (row[0].1, row[0].0 - row[1].0)
        })
        .collect()
}

/// Greedy decoding (`generate::complete`: the prompt prefilled whole, then a token a step from
/// the cache, on a team as the CLI runs it) against the composed form.
fn check(quant: Quantization) {
    common::in_a_pool_of_two(|| check_in_pool(quant));
}

fn check_in_pool(quant: Quantization) {
    let path = common::smollm2::smollm2_gguf();
    let source = ModelSource::resolve(path.to_str().unwrap(), "main").unwrap();
    let model = source
        .load_quantized(DType::F32, quant, &Device::Cpu)
        .unwrap();
    // "<|im_start|>user\nThe capital of France is<|im_end|>\n<|im_start|>assistant\n"
    let prompt = [
        1u32, 4093, 198, 504, 3575, 282, 4649, 314, 2, 198, 1, 520, 9531, 198,
    ];
    let new = 10;
    let tokenizer = source.tokenizer(None).unwrap().tokenizer().clone();
    let tokens = complete(&model, &tokenizer, &prompt, &Settings::greedy(new))
        .unwrap()
        .ids;
    // Up to the answer's end-of-turn token, itself compared.
    assert!(tokens.len() > 3, "{quant:?}: {tokens:?}");
    let all: Vec<u32> = prompt.iter().chain(&tokens).copied().collect();
    let composed = composed_argmax(&model, &all);
    for (k, &token) in tokens.iter().enumerate() {
        let (want, margin) = composed[prompt.len() - 1 + k];
        assert_eq!(
            token, want,
            "{quant:?}: new token {k} (composed margin {margin})"
        );
    }
}

#[test]
fn gguf_blocks_decode_the_composed_greedy_tokens() {
    check(Quantization::None);
    // llama.cpp's route (`--int8-activations`: Q4_1's activations rounded to 8 bits) keeps
    // this prompt's greedy tokens too. (Process-wide; the other test here is NF4, which never
    // takes it.)
    prolora::kernels::quant_gemv::use_int8_activations(true);
    check(Quantization::None);
    prolora::kernels::quant_gemv::use_int8_activations(false);
}

#[test]
fn nf4_decodes_the_composed_greedy_tokens() {
    check(Quantization::Nf4 { double_quant: true });
}
