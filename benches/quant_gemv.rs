//! The fused few-row products of ggml blocks (src/kernels/quant_gemv.rs) at SmolLM2's and the
//! 7B shape's sizes, with the activations in f32 and quantized to 8 bits (integer dots): the
//! measurement behind `--int8-activations` (`quant_gemv::use_int8_activations`).
//!
//!   cargo bench --bench quant_gemv [-- ROWS]   # ROWS of x per product (default 1)
//!   cargo bench --bench quant_gemv -- decode7b  # the 7B NF4 preset's decoding steps
//!   cargo bench --bench quant_gemv -- stream    # weights streamed from memory, 1 and 2 threads
//!
//! Prints one markdown row per format and shape: GB/s of weight bytes read, each route.
//! `decode7b` times each batch-1 decoding step of the `llama2-7b` preset (random NF4 + double
//! quant weights, ~4 GiB) inside one process, so the load, which varies by seconds from run to
//! run, stays out of the rate; the steps run as `prolora generate` runs them (on a team,
//! `kernels::team`). `stream` sets the products against the memory: one and two threads reading
//! 512 MiB in a plain loop and with prefetches 4 KiB ahead (GiB/s), then the one-row products
//! of 256 MiB of SmolLM2-shaped Q4_0 / Q4_1 / Q8_0 matrices, one after another as a decoding
//! step reads its layers (GB/s of weights, each route).

mod greedy;
mod timing;

use candle_core::{DType, Device};
use prolora::kernels::quant_gemv::{xwt_routed, GgmlBlocks, QuantMatrix};
use prolora::model::nf4::Quantization;
use prolora::source::ModelSource;
use std::time::Instant;

fn main() {
    if std::env::args().any(|a| a == "stream") {
        return stream();
    }
    if std::env::args().any(|a| a == "decode7b") {
        // As `prolora generate` decodes: inside rayon's pool, each step on a team.
        let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
        return pool.install(decode7b);
    }
    let m: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1);
    let threads = rayon::current_num_threads();
    println!("{m} row(s) of x, {threads} threads; best of 20 calls (of 5 for the 7B shape)\n");
    println!("| format | weight (rows × cols) | f32 activations GB/s | 8-bit activations GB/s | int / f32 |");
    println!("|---|---|---|---|---|");
    let shapes = [
        (576, 1536, "SmolLM2 down"),
        (1536, 576, "SmolLM2 gate/up"),
        (49152, 576, "SmolLM2 head"),
        (11008, 4096, "7B gate/up"),
    ];
    for kind in [GgmlBlocks::Q4_0, GgmlBlocks::Q4_1, GgmlBlocks::Q8_0] {
        for (rows, cols, what) in shapes {
            let bytes = blocks(kind, rows * cols / 32);
            let w = QuantMatrix::Ggml {
                kind,
                bytes: &bytes,
                rows,
                cols,
            };
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
                .collect();
            let reps = if rows * cols > 1 << 24 { 5 } else { 20 };
            let rate = |int8| {
                let s = best(reps, || {
                    std::hint::black_box(xwt_routed(&w, &x, m, int8).unwrap());
                });
                bytes.len() as f64 / s / 1e9
            };
            let (f, i) = (rate(false), rate(true));
            println!(
                "| {kind:?} | {what} ({rows} × {cols}) | {f:.1} | {i:.1} | {:.2}× |",
                i / f
            );
        }
    }
}

/// The memory's read rate and the products' rate on weights that do not fit the caches.
fn stream() {
    let bytes: Vec<u8> = (0..512usize << 20).map(|i| (i * 131 % 251) as u8).collect();
    println!(
        "| threads | plain read GiB/s | read with prefetch 4 KiB ahead GiB/s |\n|---|---|---|"
    );
    for threads in [1, 2] {
        let rate = |prefetch: bool| {
            let s = best(3, || {
                std::thread::scope(|scope| {
                    for part in bytes.chunks(bytes.len() / threads) {
                        scope.spawn(move || std::hint::black_box(read(part, prefetch)));
                    }
                })
            });
            bytes.len() as f64 / s / (1u64 << 30) as f64
        };
        println!("| {threads} | {:.1} | {:.1} |", rate(false), rate(true));
    }
    drop(bytes);
    println!(
        "\n| format | threads | f32 activations GB/s | 8-bit activations GB/s |\n|---|---|---|---|"
    );
    let (rows, cols) = (1536, 576);
    for kind in [GgmlBlocks::Q4_0, GgmlBlocks::Q4_1, GgmlBlocks::Q8_0] {
        let one = blocks(kind, rows * cols / 32);
        let copies: Vec<Vec<u8>> = (0..(256usize << 20) / one.len())
            .map(|_| one.clone())
            .collect();
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
            .collect();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let rate = |int8| {
                let s = pool.install(|| {
                    best(3, || {
                        for bytes in &copies {
                            let w = QuantMatrix::Ggml {
                                kind,
                                bytes,
                                rows,
                                cols,
                            };
                            std::hint::black_box(xwt_routed(&w, &x, 1, int8).unwrap());
                        }
                    })
                });
                (copies.len() * one.len()) as f64 / s / 1e9
            };
            println!(
                "| {kind:?} | {threads} | {:.1} | {:.1} |",
                rate(false),
                rate(true)
            );
        }
    }
}

/// Reads `bytes` once (an xor of its 64-byte lines), prefetching 4 KiB ahead or not.
fn read(bytes: &[u8], prefetch: bool) -> u64 {
    let mut acc = [0u64; 8];
    for (i, line) in bytes.chunks_exact(64).enumerate() {
        #[cfg(target_arch = "x86_64")]
        if prefetch {
            // SAFETY: a prefetch never faults, wherever it points.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                _mm_prefetch::<_MM_HINT_T0>(bytes.as_ptr().wrapping_add(i * 64 + 4096).cast());
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (i, prefetch);
        for (a, w) in acc.iter_mut().zip(line.chunks_exact(8)) {
            *a ^= u64::from_le_bytes(w.try_into().unwrap());
        }
    }
    acc.iter().fold(0, |a, b| a ^ b)
}

/// Blocks of `kind` with varied codes and small finite f16 scales (and mins).
fn blocks(kind: GgmlBlocks, n: usize) -> Vec<u8> {
    let size = kind.block_bytes();
    let mut bytes: Vec<u8> = (0..n * size).map(|i| (i * 131 % 251) as u8).collect();
    for (b, blk) in bytes.chunks_exact_mut(size).enumerate() {
        let d = half::f16::from_f32(0.01 + 0.003 * (b % 5) as f32).to_le_bytes();
        blk[0..2].copy_from_slice(&d);
        if kind == GgmlBlocks::Q4_1 {
            blk[2..4].copy_from_slice(&half::f16::from_f32(-0.04).to_le_bytes());
        }
    }
    bytes
}

/// The best of `reps` timings of `f`, in seconds (after one untimed call).
/// [`timing::best`] after one untimed run (first touches, caches).
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    timing::best(reps, f)
}

/// Batch-1 greedy decoding steps of the 7B NF4 preset after an 8-token prefill, on a team as
/// `prolora generate` runs them: each step's milliseconds (best and median of 32) and the GB/s
/// of weights that implies.
fn decode7b() {
    let source = ModelSource::resolve("llama2-7b", "main").unwrap();
    let t = Instant::now();
    let model = source
        .load_quantized(
            DType::F32,
            Quantization::Nf4 { double_quant: true },
            &Device::Cpu,
        )
        .unwrap();
    let load_s = t.elapsed().as_secs_f64();
    let prompt = [1u32, 450, 4996, 17354, 1701, 432, 17204, 975];
    let steps = greedy::greedy_steps(&model, &prompt, 32, |_| true);
    let mut decode: Vec<f64> = steps.iter().map(|&(_, s)| s).collect();
    decode.sort_by(f64::total_cmp);
    // NF4 linears (codes, one-byte scales per 64, an f32 per 256 scales) and the f32 head.
    let linear = 32.0 * (4.0 * 4096.0 * 4096.0 + 3.0 * 4096.0 * 11008.0);
    let read = linear * (0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0)) + 32000.0 * 4096.0 * 4.0;
    let (best, median) = (decode[0], decode[decode.len() / 2]);
    println!("| 7B NF4 preset | load {load_s:.1} s | step best {:.0} ms ({:.2} tok/s, {:.1} GB/s) | median {:.0} ms ({:.2} tok/s, {:.1} GB/s) |",
        best * 1e3, 1.0 / best, read / best / 1e9, median * 1e3, 1.0 / median, read / median / 1e9);
}
