//! A training step's frozen products of one SmolLM2-135M layer (q/k/v and gate/up stacked,
//! o, down; 250 rows), forward and input gradient, with the weight in f32, in ggml Q4_1
//! blocks and in NF4 with double quantization: the time a quantized base adds to the
//! step's linears. Best of N alternated rounds, ms per layer.
//!
//!   cargo bench --bench frozen_products [-- ROWS]

use candle_core::{DType, Device, Tensor, Var};
use half::f16;
use prolora::gguf::quants::BlockMatrix;
use prolora::gguf::GgmlType;
use prolora::model::frozen::FrozenLinear;
use prolora::model::nf4::Nf4Tensor;
use std::time::Instant;

/// (out, in) of the parts of each linear the step computes, parts stacked.
const LAYER: [&[(usize, usize)]; 4] = [
    &[(576, 576), (192, 576), (192, 576)],
    &[(576, 576)],
    &[(1536, 576), (1536, 576)],
    &[(576, 1536)],
];

fn values(o: usize, h: usize, salt: usize) -> Vec<f32> {
    (0..o * h)
        .map(|i| ((i * 37 + salt) % 101) as f32 / 700.0 - 0.07)
        .collect()
}

/// Q4_1 blocks of `values`: each block's minimum and step, its codes rounded.
fn q4_1(o: usize, h: usize, salt: usize) -> BlockMatrix {
    let mut bytes = Vec::with_capacity(o * h / 32 * 20);
    for block in values(o, h, salt).chunks_exact(32) {
        let min = block.iter().copied().fold(f32::MAX, f32::min);
        let max = block.iter().copied().fold(f32::MIN, f32::max);
        let d = (max - min) / 15.0;
        bytes.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        bytes.extend_from_slice(&f16::from_f32(min).to_le_bytes());
        let code = |v: f32| ((v - min) / d).round().clamp(0.0, 15.0) as u8;
        for k in 0..16 {
            bytes.push(code(block[k]) | (code(block[k + 16]) << 4));
        }
    }
    BlockMatrix::new(GgmlType::Q4_1, o, h, bytes).unwrap()
}

fn layer(kind: &str) -> Vec<FrozenLinear> {
    let dev = Device::Cpu;
    LAYER
        .iter()
        .map(|parts| {
            let parts = parts
                .iter()
                .enumerate()
                .map(|(salt, &(o, h))| match kind {
                    "f32" => FrozenLinear::new(
                        Tensor::from_vec(values(o, h, salt), (o, h), &dev).unwrap(),
                    ),
                    "Q4_1" => FrozenLinear::blocks(q4_1(o, h, salt), DType::F32, &dev).unwrap(),
                    _ => FrozenLinear::nf4(
                        Nf4Tensor::quantize("w", &values(o, h, salt), &[o, h], true).unwrap(),
                        &dev,
                    )
                    .unwrap(),
                })
                .collect();
            FrozenLinear::stack(parts).unwrap()
        })
        .collect()
}

/// Forward and input gradient of every linear of the layer, once (the output's gradient is
/// ones, as `backward` seeds it).
fn step(linears: &[FrozenLinear], inputs: &[Var]) {
    for (l, x) in linears.iter().zip(inputs) {
        let y = l.forward(x.as_tensor()).unwrap();
        let grads = y.backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
    }
}

fn main() {
    let rows: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(250);
    let dev = Device::Cpu;
    let inputs: Vec<Var> = LAYER
        .iter()
        .map(|parts| {
            let h = parts[0].1;
            Var::from_tensor(&Tensor::from_vec(values(rows, h, 7), (rows, h), &dev).unwrap())
                .unwrap()
        })
        .collect();
    let kinds = ["f32", "Q4_1", "NF4"];
    let layers: Vec<Vec<FrozenLinear>> = kinds.iter().map(|k| layer(k)).collect();
    let mut best = [f64::MAX; 3];
    for _ in 0..30 {
        for (b, l) in best.iter_mut().zip(&layers) {
            let t = Instant::now();
            step(l, &inputs);
            *b = b.min(t.elapsed().as_secs_f64());
        }
    }
    println!("| weight | ms per layer ({rows} rows) | vs f32 |\n|---|---|---|");
    for (k, b) in kinds.iter().zip(best) {
        println!("| {k} | {:.2} | {:.2}× |", b * 1e3, b / best[0]);
    }
}
