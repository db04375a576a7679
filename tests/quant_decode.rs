//! Decoding SmolLM2-135M-Instruct from its Q4_1 GGUF (f32 activations, and 8-bit ones), and in
//! NF4, with the fused few-row products (each step's one row reads the codes in place; the
//! GGUF's tied head its Q8_0 embedding) gives the greedy tokens of the composed form: the argmax at every position of
//! one full-sequence forward over prompt and completion, whose 20+ rows take the tiled
//! dequantize-then-GEMM path and the dense head.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use prolora::ctx::Ctx;
use prolora::model::nf4::Quantization;
use prolora::model::Llama;
use prolora::source::ModelSource;

/// Greedy tokens decoded one at a time from the cache, after a prompt prefilled whole.
fn decode(model: &Llama, prompt: &[u32], new: usize) -> Vec<u32> {
    let ctx = Ctx::eval();
    let mut cache = model.new_cache();
    let mut input = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut out = Vec::new();
    for _ in 0..new {
        let h = model.hidden_cached(&input, &ctx, &mut cache).unwrap();
        let t = h.dim(1).unwrap();
        let logits = model.head(&h.narrow(1, t - 1, 1).unwrap()).unwrap();
        let next: u32 = logits
            .flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        out.push(next);
        input = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
    }
    out
}

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

fn check(quant: Quantization) {
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
    let tokens = decode(&model, &prompt, new);
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
