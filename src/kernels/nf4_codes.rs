//! NF4's constants as bitsandbytes defines them: the block sizes, the 16-value code table and
//! the 8-bit dynamic map of double quantization. The quantizer (model::nf4) and the CUDA
//! dequantization kernel both read them from here.

/// Elements per absmax block.
pub const BLOCK: usize = 64;
/// Absmax values per nested (double-quantization) block.
pub const NESTED_BLOCK: usize = 256;

/// The NF4 code table (index → value), bitsandbytes' constants.
pub const NF4: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), reproduced bit
/// for bit: it is built with `torch.linspace` in f32, whose rounding the fused multiply-adds
/// below copy (the recipe is in tests/fixtures/nf4/README.md).
pub fn dynamic_map() -> [f32; 256] {
    let mut v: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let n = (1usize << i) + 1;
        let step = (1.0f32 - 0.1f32) / (n - 1) as f32;
        let bounds: Vec<f32> = (0..n)
            .map(|k| {
                if k < n / 2 {
                    step.mul_add(k as f32, 0.1)
                } else {
                    (-step).mul_add((n - 1 - k) as f32, 1.0)
                }
            })
            .collect();
        let scale = 10f64.powi(i - 6) as f32;
        for k in 0..n - 1 {
            let mean = (bounds[k] + bounds[k + 1]) / 2.0;
            v.push(scale * mean);
            v.push(-scale * mean);
        }
    }
    v.push(0.0);
    v.push(1.0);
    v.sort_by(f32::total_cmp);
    v.try_into()
        .expect("7 levels of 2^i means, 0 and 1: 256 entries")
}
