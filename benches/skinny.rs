//! The skinny product against candle's GEMM at a decoding step's row counts, on SmolLM2's
//! shapes (q/o 576 × 576, k/v 192 × 576, gate/up 1536 × 576, down 576 × 1536, the 49,152-row
//! head): GFLOP/s of each, both on the same threads. Also at a training step's 128 and 256
//! rows, where the skinny product is not used: whether a faster product is there to take.
//!
//!   cargo bench --bench skinny

mod timing;
use timing::best;

use candle_core::{Device, Tensor};
use prolora::kernels::skinny;

fn main() -> candle_core::Result<()> {
    if !skinny::available() {
        println!("this CPU has no AVX2 + FMA: the skinny product is not used");
        return Ok(());
    }
    let shapes = [
        (576, 576),
        (192, 576),
        (1536, 576),
        (576, 1536),
        (49152, 576),
    ];
    println!(
        "{} threads\n| rows | weight | skinny GFLOP/s | GEMM GFLOP/s |\n|---|---|---|---|",
        rayon::current_num_threads()
    );
    for m in [1usize, 4, 16, 32, 64, 128, 256] {
        for (n, k) in shapes {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 97) as f32 / 48.0 - 1.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 104729) % 89) as f32 / 44.0 - 1.0)
                .collect();
            let reps = (2e8 / (m * n * k) as f64).ceil() as usize;
            let flop = (2 * m * n * k * reps) as f64;
            let s = best(7, || {
                for _ in 0..reps {
                    std::hint::black_box(skinny::xwt(&x, &w, m, k, n));
                }
            });
            let (xt, wt) = (
                Tensor::from_slice(&x, (m, k), &Device::Cpu)?,
                Tensor::from_slice(&w, (n, k), &Device::Cpu)?,
            );
            let g = best(7, || {
                for _ in 0..reps {
                    std::hint::black_box(xt.matmul(&wt.t().unwrap()).unwrap());
                }
            });
            println!(
                "| {m} | {n} × {k} | {:.1} | {:.1} |",
                flop / s / 1e9,
                flop / g / 1e9
            );
        }
    }
    Ok(())
}
