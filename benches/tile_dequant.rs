//! The tile dequantizers on one core, each kernel this CPU runs, against a copy of the same
//! size: GB/s of f32 written. Tiles of SmolLM2's gate/up stack (3072 × 576) and of a
//! 256-row slice of it (in the L2 cache).
//!
//!   cargo bench --bench tile_dequant

mod timing;
use timing::best;

use prolora::kernels::quant_gemv::GgmlBlocks;
use prolora::kernels::tile_dequant::{ggml_with, kernels, nf4_with};

fn main() {
    let cols = 576;
    println!("| tile | format | kernel | GB/s |\n|---|---|---|---|");
    for rows in [3072usize, 256] {
        // The same number of values written per measurement for both tile sizes.
        let reps = 3072 / rows;
        let gbs = |s: f64| (4 * rows * cols * reps) as f64 / s / 1e9;
        let mut out = vec![0f32; rows * cols];
        for kind in [GgmlBlocks::Q4_0, GgmlBlocks::Q4_1, GgmlBlocks::Q8_0] {
            let bytes: Vec<u8> = (0..rows * cols / 32 * kind.block_bytes())
                .map(|i| (i * 7 % 251) as u8)
                .collect();
            for k in kernels() {
                let s = best(20, || {
                    for _ in 0..reps {
                        ggml_with(k, kind, &bytes, &mut out)
                    }
                });
                println!("| {rows} × {cols} | {kind:?} | {k:?} | {:.1} |", gbs(s));
            }
        }
        let blocks = rows * cols / 64;
        let amax: Vec<f32> = (0..blocks).map(|i| 0.01 * (i % 13) as f32).collect();
        let codes: Vec<u8> = (0..blocks * 32).map(|i| (i * 7 % 251) as u8).collect();
        for k in kernels() {
            let s = best(20, || {
                for _ in 0..reps {
                    nf4_with(k, &codes, &amax, &mut out)
                }
            });
            println!("| {rows} × {cols} | NF4 | {k:?} | {:.1} |", gbs(s));
        }
        let src = out.clone();
        let s = best(20, || {
            for _ in 0..reps {
                out.copy_from_slice(&src)
            }
        });
        println!("| {rows} × {cols} | f32 copy | – | {:.1} |", gbs(s));
    }
}
