//! ggml Q4_0, Q4_1 and Q8_0 weight rows times activations quantized to 8 bits, with integer
//! dot products: llama.cpp's route. Each row of `x` is quantized once per product, in blocks of
//! 32 (ggml's Q8_0 / Q8_1: `d = amax / 127`, codes `round(x / d)` to the nearest, ties to
//! even), and each block's `Σ q_w·q_x` is an exact integer sum (AVX2 `maddubs` + `madd`,
//! AVX-512 VNNI `vpdpbusd`), scaled once per block in f32:
//!
//! - Q8_0 `d_w·q_w`: `d_w·d_x · Σ q_w·q_x`;
//! - Q4_1 `d_w·q_w + m_w`: `d_w·d_x · Σ q_w·q_x + m_w · (d_x·Σ q_x)`;
//! - Q4_0 `d_w·(q_w − 8)`: `d_w·d_x · (Σ q_w·q_x − 8·Σ q_x)`,
//!
//! with the block terms `Σ q_x` (times `d_x` for Q4_1) computed once per product. So the result is the product of
//! the dequantized weights and the *dequantized activations* `x̂ = d_x·q_x` up to the order and
//! rounding of the f32 sums ([`super::quant_gemv::TOLERANCE`]), and differs from the f32
//! product by at most `Σ_b (amax_b(x) / 254) · Σ_{i∈b} |w_i|` more (see [`activation_bound`];
//! docs/methods.md, "Fused quantized products").

use super::quant_gemv::GgmlBlocks;

/// Values per ggml block (and per block of quantized activations).
const BLOCK: usize = 32;

/// Rows of `x` quantized in blocks of 32, with what the weight's format adds per block.
pub struct Q8Rows {
    blocks: usize,
    codes: Vec<i8>,
    /// `d_x` per block.
    scales: Vec<f32>,
    /// Per block: Q4_1 `d_x·Σ q_x` (times `m_w`), Q4_0 `−8·Σ q_x` (times `d_w·d_x`); empty
    /// for Q8_0.
    offsets: Vec<f32>,
}

impl Q8Rows {
    /// `x` is `m` rows of `cols` values, `cols` a multiple of 32; `kind` the weight's blocks.
    pub fn new(x: &[f32], cols: usize, kind: GgmlBlocks) -> Self {
        let blocks = cols / BLOCK;
        let n = x.len() / BLOCK;
        let mut codes = vec![0i8; x.len()];
        let mut scales = vec![0f32; n];
        let mut sums = vec![0i32; n];
        quantize(x, &mut codes, &mut scales, &mut sums);
        let offsets = match kind {
            GgmlBlocks::Q4_0 => sums.iter().map(|&s| -8.0 * s as f32).collect(),
            GgmlBlocks::Q4_1 => scales
                .iter()
                .zip(&sums)
                .map(|(d, &s)| d * s as f32)
                .collect(),
            GgmlBlocks::Q8_0 => Vec::new(),
        };
        Self {
            blocks,
            codes,
            scales,
            offsets,
        }
    }

    /// Row `r` of the activations as quantized, dequantized: `d_x · q_x`.
    #[cfg(test)]
    pub fn dequantized(&self, r: usize) -> Vec<f32> {
        let n = self.blocks * BLOCK;
        self.codes[r * n..(r + 1) * n]
            .iter()
            .enumerate()
            .map(|(i, &q)| self.scales[r * self.blocks + i / BLOCK] * f32::from(q))
            .collect()
    }

    fn codes(&self, r: usize) -> *const i8 {
        self.codes[r * self.blocks * BLOCK..].as_ptr()
    }
}

/// Each block of 32 values of `x` to codes, its `d` and its `Σ q`; in AVX2 registers where the
/// CPU has them (the same arithmetic: a decoding step quantizes 120 rows, and the compiler's
/// loop took 1 µs for 576 values).
fn quantize(x: &[f32], codes: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { simd::quantize_avx2(x, codes, scales, sums) };
    }
    quantize_portable(x, codes, scales, sums)
}

#[inline(always)]
fn quantize_portable(x: &[f32], codes: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
    const LANES: usize = 8;
    for (((xb, qb), d), sum) in x
        .chunks_exact(BLOCK)
        .zip(codes.chunks_exact_mut(BLOCK))
        .zip(scales.iter_mut())
        .zip(sums.iter_mut())
    {
        // The largest |v| in eight lanes (max is exact in any order; NaN never wins, as in
        // `f32::max`).
        let mut lanes = [0f32; LANES];
        for c in xb.chunks_exact(LANES) {
            for (m, v) in lanes.iter_mut().zip(c) {
                let a = v.abs();
                *m = if a > *m { a } else { *m };
            }
        }
        let amax = lanes.iter().fold(0f32, |a, &v| a.max(v));
        *d = amax / 127.0;
        let inverse = if *d != 0.0 { 1.0 / *d } else { 0.0 };
        // |v · inverse| ≤ 127 (up to a rounding): the cast does not saturate. Adding and
        // taking away 1.5·2²³ rounds to the nearest integer, ties to even, as
        // `round_ties_even` does (for |y| < 2²²), without its libm call per value.
        const SHIFT: f32 = 12_582_912.0;
        let mut total = [0i32; LANES];
        for (qc, c) in qb.chunks_exact_mut(LANES).zip(xb.chunks_exact(LANES)) {
            for ((q, &v), t) in qc.iter_mut().zip(c).zip(total.iter_mut()) {
                *q = ((v * inverse + SHIFT) - SHIFT) as i32 as i8;
                *t += i32::from(*q);
            }
        }
        *sum = total.iter().sum();
    }
}

/// The bound on |this product − the f32 product| that the activations' rounding adds:
/// `Σ_b (amax_b(x) / 254) · Σ_{i∈b} |w_i|` (each code is off by at most half a step `d_x/2`).
#[cfg(test)]
pub fn activation_bound(w: &[f32], x: &[f32]) -> f64 {
    w.chunks_exact(BLOCK)
        .zip(x.chunks_exact(BLOCK))
        .map(|(wb, xb)| {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            f64::from(amax) / 254.0 * wb.iter().map(|v| f64::from(v.abs())).sum::<f64>()
        })
        .sum()
}

/// Which loops compute the integer sums; all give the same block sums exactly.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kernel {
    Portable,
    /// AVX2 `maddubs` + `madd` (and FMA, F16C).
    Avx2,
    /// As `Avx2` with AVX-512 VNNI (`vpdpbusd` on 256-bit registers).
    Vnni,
}

/// The kernels this CPU runs, the fastest last.
pub fn kernels() -> Vec<Kernel> {
    let mut k = vec![Kernel::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            k.push(Kernel::Avx2);
            if has!("avx512vnni") && has!("avx512vl") {
                k.push(Kernel::Vnni);
            }
        }
    }
    k
}

/// The fastest kernel this CPU runs.
pub fn fastest() -> Kernel {
    static FASTEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *FASTEST.get_or_init(|| *kernels().last().expect("the portable kernel"))
}

/// `y[r] = Σ_i x̂_r[i] · W[row, i]` for every row `r` of `xs`; `blocks` is the weight row's
/// bytes (`xs.blocks` blocks of `kind`).
pub fn row_dots(kind: GgmlBlocks, blocks: &[u8], xs: &Q8Rows, y: &mut [f32], kernel: Kernel) {
    debug_assert_eq!(blocks.len(), xs.blocks * kind.block_bytes());
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable {
        let mut r = 0;
        while r < y.len() {
            let n = (y.len() - r).min(4);
            let out = &mut y[r..r + n];
            // SAFETY: `kernel` is one `kernels()` found this CPU to run; `blocks` holds
            // `xs.blocks` whole blocks and `xs` the rows `r..r + n`.
            unsafe {
                match (kernel == Kernel::Vnni, n) {
                    (true, 4) => simd::row_vnni::<4>(kind, blocks, xs, r, out),
                    (true, 3) => simd::row_vnni::<3>(kind, blocks, xs, r, out),
                    (true, 2) => simd::row_vnni::<2>(kind, blocks, xs, r, out),
                    (true, _) => simd::row_vnni::<1>(kind, blocks, xs, r, out),
                    (false, 4) => simd::row_avx2::<4>(kind, blocks, xs, r, out),
                    (false, 3) => simd::row_avx2::<3>(kind, blocks, xs, r, out),
                    (false, 2) => simd::row_avx2::<2>(kind, blocks, xs, r, out),
                    (false, _) => simd::row_avx2::<1>(kind, blocks, xs, r, out),
                }
            }
            r += n;
        }
        return;
    }
    let _ = kernel;
    for (r, y) in y.iter_mut().enumerate() {
        *y = portable_row(kind, blocks, xs, r);
    }
}

/// Weight rows taken together by [`four_rows`].
pub const TOGETHER: usize = 4;

/// [`row_dots`] of [`TOGETHER`] consecutive weight rows (`blocks`, `xs.blocks` blocks of `kind`
/// each) against the one row of `xs`: `y[k]` for weight row `k`, each with the bits `row_dots`
/// gives it alone — the same operations in the same order, the rows interleaved, so that four
/// chains of sums are in flight (a short row alone waits on the latency of its few). `false`
/// where `kernel` has no such loop (the caller goes row by row).
pub fn four_rows(
    kind: GgmlBlocks,
    blocks: &[u8],
    xs: &Q8Rows,
    y: &mut [f32],
    kernel: Kernel,
) -> bool {
    debug_assert_eq!(blocks.len(), TOGETHER * xs.blocks * kind.block_bytes());
    debug_assert_eq!(xs.codes.len(), xs.blocks * BLOCK);
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable && y.len() >= TOGETHER && xs.codes.len() == xs.blocks * BLOCK {
        // SAFETY: `kernel` is one `kernels()` found this CPU to run; `blocks` holds four rows
        // of `xs.blocks` whole blocks and `xs` one row.
        unsafe {
            match kernel {
                Kernel::Vnni => simd::rows_vnni::<TOGETHER>(kind, blocks, xs, y),
                _ => simd::rows_avx2::<TOGETHER>(kind, blocks, xs, y),
            }
        }
        return true;
    }
    let _ = (kind, blocks, y, kernel);
    false
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Per block: the integer sum of codes, scaled by both scales, plus the offset term.
fn portable_row(kind: GgmlBlocks, blocks: &[u8], xs: &Q8Rows, r: usize) -> f32 {
    let first = r * xs.blocks;
    let codes = &xs.codes[first * BLOCK..(first + xs.blocks) * BLOCK];
    let mut total = 0f32;
    for (b, (blk, xq)) in blocks
        .chunks_exact(kind.block_bytes())
        .zip(codes.chunks_exact(BLOCK))
        .enumerate()
    {
        let d = f16_at(blk, 0);
        let isum: i32 = match kind {
            GgmlBlocks::Q8_0 => blk[2..]
                .iter()
                .zip(xq)
                .map(|(&w, &q)| i32::from(w as i8) * i32::from(q))
                .sum(),
            _ => {
                let qs = &blk[if kind == GgmlBlocks::Q4_0 { 2 } else { 4 }..];
                (0..16)
                    .map(|i| {
                        i32::from(qs[i] & 15) * i32::from(xq[i])
                            + i32::from(qs[i] >> 4) * i32::from(xq[i + 16])
                    })
                    .sum()
            }
        };
        total += d * xs.scales[first + b] * isum as f32;
        match kind {
            GgmlBlocks::Q4_0 => total += d * xs.scales[first + b] * xs.offsets[first + b],
            GgmlBlocks::Q4_1 => total += f16_at(blk, 2) * xs.offsets[first + b],
            GgmlBlocks::Q8_0 => {}
        }
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::*;
    use std::arch::x86_64::*;

    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q8_0: u8 = 2;

    /// `R` rows of `xs` from `r0` against one weight row, with `maddubs` + `madd`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row_avx2<const R: usize>(
        kind: GgmlBlocks,
        blocks: &[u8],
        xs: &Q8Rows,
        r0: usize,
        y: &mut [f32],
    ) {
        let out = match kind {
            GgmlBlocks::Q4_0 => sweep::<R, Q4_0, false>(blocks, xs, r0),
            GgmlBlocks::Q4_1 => sweep::<R, Q4_1, false>(blocks, xs, r0),
            GgmlBlocks::Q8_0 => sweep::<R, Q8_0, false>(blocks, xs, r0),
        };
        y[..R].copy_from_slice(&out);
    }

    /// As [`row_avx2`], the integer sums with `vpdpbusd`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn row_vnni<const R: usize>(
        kind: GgmlBlocks,
        blocks: &[u8],
        xs: &Q8Rows,
        r0: usize,
        y: &mut [f32],
    ) {
        let out = match kind {
            GgmlBlocks::Q4_0 => sweep::<R, Q4_0, true>(blocks, xs, r0),
            GgmlBlocks::Q4_1 => sweep::<R, Q4_1, true>(blocks, xs, r0),
            GgmlBlocks::Q8_0 => sweep::<R, Q8_0, true>(blocks, xs, r0),
        };
        y[..R].copy_from_slice(&out);
    }

    /// `W` weight rows against one row of `xs`, with `maddubs` + `madd` ([`super::four_rows`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_avx2<const W: usize>(
        kind: GgmlBlocks,
        blocks: &[u8],
        xs: &Q8Rows,
        y: &mut [f32],
    ) {
        let out = match kind {
            GgmlBlocks::Q4_0 => sweep_rows::<W, Q4_0, false>(blocks, xs),
            GgmlBlocks::Q4_1 => sweep_rows::<W, Q4_1, false>(blocks, xs),
            GgmlBlocks::Q8_0 => sweep_rows::<W, Q8_0, false>(blocks, xs),
        };
        y[..W].copy_from_slice(&out);
    }

    /// As [`rows_avx2`], the integer sums with `vpdpbusd`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn rows_vnni<const W: usize>(
        kind: GgmlBlocks,
        blocks: &[u8],
        xs: &Q8Rows,
        y: &mut [f32],
    ) {
        let out = match kind {
            GgmlBlocks::Q4_0 => sweep_rows::<W, Q4_0, true>(blocks, xs),
            GgmlBlocks::Q4_1 => sweep_rows::<W, Q4_1, true>(blocks, xs),
            GgmlBlocks::Q8_0 => sweep_rows::<W, Q8_0, true>(blocks, xs),
        };
        y[..W].copy_from_slice(&out);
    }

    /// [`sweep`] with one row of `xs` (`R` = 1) for each of `W` consecutive weight rows, the
    /// rows interleaved block by block: per row the same operations in the same order.
    #[inline(always)]
    unsafe fn sweep_rows<const W: usize, const KIND: u8, const VNNI: bool>(
        blocks: &[u8],
        xs: &Q8Rows,
    ) -> [f32; W] {
        let size = match KIND {
            Q4_0 => 18,
            Q4_1 => 20,
            _ => 34,
        };
        let n = xs.blocks;
        let base: [*const u8; W] = std::array::from_fn(|k| blocks.as_ptr().add(k * n * size));
        let x = [xs.codes(0)];
        let z = _mm256_setzero_ps();
        let (mut even, mut odd, mut off) = ([[z]; W], [[z]; W], [z; W]);
        let s = size as i32;
        let at = _mm256_setr_epi32(0, s, 2 * s, 3 * s, 4 * s, 5 * s, 6 * s, 7 * s);
        let mut scales = [[[0f32; 8]]; W];
        let mut b = 0;
        while b + 8 <= n {
            let dx = _mm256_loadu_ps(xs.scales.as_ptr().add(b));
            for k in 0..W {
                let blk = base[k].add(b * size);
                // Four rows' streams are more than the hardware prefetcher follows. Past the
                // row's end this touches the next rows' bytes (or none: a prefetch never
                // faults).
                let ahead = blk.wrapping_add(PREFETCH_BYTES);
                for line in (0..8 * size).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
                }
                let heads = _mm256_i32gather_epi32::<1>(blk as *const i32, at);
                let sr = _mm256_mul_ps(halves::<0>(heads), dx);
                _mm256_storeu_ps(scales[k][0].as_mut_ptr(), sr);
                if KIND != Q8_0 {
                    let o = _mm256_loadu_ps(xs.offsets.as_ptr().add(b));
                    let c = if KIND == Q4_0 { sr } else { halves::<2>(heads) };
                    off[k] = _mm256_fmadd_ps(c, o, off[k]);
                }
            }
            for j in (0..8).step_by(2) {
                for k in 0..W {
                    let blk = base[k].add(b * size);
                    dots::<1, KIND, VNNI>(
                        blk.add(j * size),
                        b + j,
                        &x,
                        &scales[k],
                        j,
                        &mut even[k],
                    );
                    dots::<1, KIND, VNNI>(
                        blk.add((j + 1) * size),
                        b + j + 1,
                        &x,
                        &scales[k],
                        j + 1,
                        &mut odd[k],
                    );
                }
            }
            b += 8;
        }
        let mut off_tail = [0f32; W];
        while b < n {
            for k in 0..W {
                let blk = base[k].add(b * size);
                let d = f16(blk);
                scales[k][0][0] = d * *xs.scales.get_unchecked(b);
                if KIND != Q8_0 {
                    let c = if KIND == Q4_0 {
                        scales[k][0][0]
                    } else {
                        f16(blk.add(2))
                    };
                    off_tail[k] += c * *xs.offsets.get_unchecked(b);
                }
                dots::<1, KIND, VNNI>(blk, b, &x, &scales[k], 0, &mut even[k]);
            }
            b += 1;
        }
        std::array::from_fn(|k| {
            hsum(_mm256_add_ps(_mm256_add_ps(even[k][0], odd[k][0]), off[k])) + off_tail[k]
        })
    }

    /// How far ahead of the blocks at hand [`sweep_rows`] prefetches each row, in bytes: about
    /// a memory latency's worth of streaming, as the NF4 and f32-activation kernels do.
    const PREFETCH_BYTES: usize = super::super::quant_gemv::PREFETCH_BYTES;

    /// `Σ_b d_w·d_x · Σ q_w·q_x` (+ the offset terms) over the row's blocks. Eight blocks per
    /// step: their scales (and Q4_1's mins) gathered into one register and multiplied by the
    /// eight `d_x` at once, the offset terms summed in lanes too; each block then costs its
    /// integer dot and one FMA, alternating between two sets of totals (one chain of FMAs would
    /// wait on its latency). The last `n mod 8` blocks go one at a time. No target features of
    /// its own: it inlines into the two callers and takes theirs.
    #[inline(always)]
    unsafe fn sweep<const R: usize, const KIND: u8, const VNNI: bool>(
        blocks: &[u8],
        xs: &Q8Rows,
        r0: usize,
    ) -> [f32; R] {
        let size = match KIND {
            Q4_0 => 18,
            Q4_1 => 20,
            _ => 34,
        };
        let n = xs.blocks;
        let base = blocks.as_ptr();
        let x: [*const i8; R] = std::array::from_fn(|r| xs.codes(r0 + r));
        let first: [usize; R] = std::array::from_fn(|r| (r0 + r) * n);
        let z = _mm256_setzero_ps();
        let (mut even, mut odd, mut off) = ([z; R], [z; R], [z; R]);
        let s = size as i32;
        let at = _mm256_setr_epi32(0, s, 2 * s, 3 * s, 4 * s, 5 * s, 6 * s, 7 * s);
        let mut scales = [[0f32; 8]; R];
        let mut b = 0;
        while b + 8 <= n {
            let blk = base.add(b * size);
            // Each block's first four bytes: d (low half), and Q4_1's m (high half).
            let heads = _mm256_i32gather_epi32::<1>(blk as *const i32, at);
            let d = halves::<0>(heads);
            for r in 0..R {
                let sr = _mm256_mul_ps(d, _mm256_loadu_ps(xs.scales.as_ptr().add(first[r] + b)));
                _mm256_storeu_ps(scales[r].as_mut_ptr(), sr);
                if KIND != Q8_0 {
                    let o = _mm256_loadu_ps(xs.offsets.as_ptr().add(first[r] + b));
                    let c = if KIND == Q4_0 { sr } else { halves::<2>(heads) };
                    off[r] = _mm256_fmadd_ps(c, o, off[r]);
                }
            }
            for k in (0..8).step_by(2) {
                dots::<R, KIND, VNNI>(blk.add(k * size), b + k, &x, &scales, k, &mut even);
                dots::<R, KIND, VNNI>(
                    blk.add((k + 1) * size),
                    b + k + 1,
                    &x,
                    &scales,
                    k + 1,
                    &mut odd,
                );
            }
            b += 8;
        }
        let mut off_tail = [0f32; R];
        while b < n {
            let blk = base.add(b * size);
            let d = f16(blk);
            for r in 0..R {
                scales[r][0] = d * *xs.scales.get_unchecked(first[r] + b);
                if KIND != Q8_0 {
                    let c = if KIND == Q4_0 {
                        scales[r][0]
                    } else {
                        f16(blk.add(2))
                    };
                    off_tail[r] += c * *xs.offsets.get_unchecked(first[r] + b);
                }
            }
            dots::<R, KIND, VNNI>(blk, b, &x, &scales, 0, &mut even);
            b += 1;
        }
        std::array::from_fn(|r| {
            hsum(_mm256_add_ps(_mm256_add_ps(even[r], odd[r]), off[r])) + off_tail[r]
        })
    }

    /// Block `b` (at `blk`) into each row's totals: `Σ q_w·q_x` in eight lanes, times the
    /// row's `scales[r][k]` (`d_w·d_x`).
    #[inline(always)]
    unsafe fn dots<const R: usize, const KIND: u8, const VNNI: bool>(
        blk: *const u8,
        b: usize,
        x: &[*const i8; R],
        scales: &[[f32; 8]; R],
        k: usize,
        acc: &mut [__m256; R],
    ) {
        let (w, signed) = weights::<KIND>(blk);
        for r in 0..R {
            let xq = _mm256_loadu_si256(x[r].add(b * BLOCK) as *const __m256i);
            let isum = dot::<VNNI>(w, signed, xq);
            let scale = _mm256_broadcast_ss(&scales[r][k]);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[r]);
        }
    }

    /// The f16 at byte `AT` (0 or 2) of each of eight gathered i32 lanes, as f32.
    #[inline(always)]
    unsafe fn halves<const AT: i8>(v: __m256i) -> __m256 {
        let (a, c) = (AT, AT + 1);
        #[rustfmt::skip]
        let pick = _mm256_setr_epi8(
            a, c, a + 4, c + 4, a + 8, c + 8, a + 12, c + 12, -1, -1, -1, -1, -1, -1, -1, -1,
            a, c, a + 4, c + 4, a + 8, c + 8, a + 12, c + 12, -1, -1, -1, -1, -1, -1, -1, -1,
        );
        // Four f16 in the low eight bytes of each 128-bit lane: join the two quadwords.
        let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_shuffle_epi8(v, pick));
        _mm256_cvtph_ps(_mm256_castsi256_si128(packed))
    }

    /// The block's 32 weight codes in byte lanes: Q4 nibbles (0..16, low nibbles first), or
    /// Q8_0's signed bytes (`true`).
    #[inline(always)]
    unsafe fn weights<const KIND: u8>(blk: *const u8) -> (__m256i, bool) {
        match KIND {
            Q8_0 => (_mm256_loadu_si256(blk.add(2) as *const __m256i), true),
            _ => {
                let raw =
                    _mm_loadu_si128(blk.add(if KIND == Q4_0 { 2 } else { 4 }) as *const __m128i);
                let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
                (_mm256_and_si256(both, _mm256_set1_epi8(15)), false)
            }
        }
    }

    /// Eight i32 lanes summing to `Σ w_i·x_i`. `maddubs` multiplies unsigned by signed bytes:
    /// signed weights lend their sign to `x` (`|w|·(sign(w)·x)`; `|w| ≤ 128`, `|x| ≤ 127`, so
    /// the pairwise i16 sums cannot saturate, nor can the Q4 ones: 2·15·127).
    #[inline(always)]
    unsafe fn dot<const VNNI: bool>(w: __m256i, signed: bool, x: __m256i) -> __m256i {
        let (w, x) = if signed {
            (_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
        } else {
            (w, x)
        };
        if VNNI {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
        }
    }

    #[inline(always)]
    unsafe fn f16(p: *const u8) -> f32 {
        let bits = i32::from(u16::from_le_bytes([*p, *p.add(1)]));
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }

    /// [`super::quantize_portable`] in registers: a block's four vectors of eight values,
    /// their largest |v| (exact in any order), the same division, products and rounding per
    /// value, the codes narrowed by saturating packs (within ±127 already). A block with a
    /// value or an inverse scale that is not finite goes to the portable loop, whose casts
    /// saturate where the conversion here would not.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_avx2(x: &[f32], codes: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
        let blocks = x.len() / BLOCK;
        assert!(codes.len() >= blocks * BLOCK && scales.len() >= blocks && sums.len() >= blocks);
        let sign = _mm256_set1_ps(-0.0);
        let infinity = _mm256_set1_ps(f32::INFINITY);
        let shift = _mm256_set1_ps(12_582_912.0);
        // The packs interleave 128-bit lanes: 4-byte groups come out in this order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for b in 0..blocks {
            let (at, end) = (b * BLOCK, (b + 1) * BLOCK);
            let p = x.as_ptr().add(at);
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
            let a = v.map(|v| _mm256_andnot_ps(sign, v));
            let wild = a.map(|a| _mm256_cmp_ps::<_CMP_NLT_UQ>(a, infinity));
            let wild = _mm256_or_ps(
                _mm256_or_ps(wild[0], wild[1]),
                _mm256_or_ps(wild[2], wild[3]),
            );
            let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
            let d = amax / 127.0;
            let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
            if _mm256_movemask_ps(wild) != 0 || !inverse.is_finite() {
                super::quantize_portable(
                    &x[at..end],
                    &mut codes[at..end],
                    &mut scales[b..b + 1],
                    &mut sums[b..b + 1],
                );
                continue;
            }
            let inverse = _mm256_set1_ps(inverse);
            let q = v.map(|v| {
                let r = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(v, inverse), shift), shift);
                _mm256_cvtps_epi32(r)
            });
            let total =
                _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let t = _mm_add_epi32(
                _mm256_castsi256_si128(total),
                _mm256_extracti128_si256(total, 1),
            );
            let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
            let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01));
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let bytes = _mm256_permutevar8x32_epi32(bytes, order);
            _mm256_storeu_si256(codes.as_mut_ptr().add(at).cast(), bytes);
            scales[b] = d;
            sums[b] = _mm_cvtsi128_si32(t);
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_round_to_the_nearest_code_of_their_block() {
        // Ties included: 0.5 and 2.5 steps of the second block (amax 127).
        let mut x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
        x[32..64]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as f32 * 0.5);
        x[63] = 127.0;
        let q = Q8Rows::new(&x, 64, GgmlBlocks::Q4_1);
        for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert_eq!(q.scales[b], amax / 127.0);
            let codes = &q.codes[b * BLOCK..(b + 1) * BLOCK];
            assert_eq!(codes.iter().map(|c| c.unsigned_abs()).max(), Some(127));
            let inverse = 1.0 / q.scales[b];
            for (&c, &v) in codes.iter().zip(xb) {
                assert_eq!(f32::from(c), (v * inverse).round_ties_even());
                assert!((f32::from(c) * q.scales[b] - v).abs() <= q.scales[b] * 0.5 * 1.0001);
            }
            let sum: i32 = codes.iter().map(|&c| i32::from(c)).sum();
            assert_eq!(q.offsets[b], q.scales[b] * sum as f32);
        }
        let zeros = Q8Rows::new(&[0.0; 32], 32, GgmlBlocks::Q4_0);
        assert!(zeros.codes.iter().all(|&c| c == 0) && zeros.scales == [0.0]);
    }

    /// The AVX2 quantizer gives the portable loop's codes, scales and sums bit for bit, ties,
    /// zeros, tiny scales and values that are not finite included.
    #[test]
    fn avx2_quantizer_equals_the_portable_loop() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let mut x: Vec<f32> = (0..32 * 12)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.0137)
                .collect();
            x[32..64]
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = i as f32 * 0.5 - 7.0);
            x[63] = 127.0;
            x[64..96].fill(0.0);
            x[96..128]
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = i as f32 * 1e-44);
            x[130] = f32::NAN;
            x[170] = f32::INFINITY;
            x[200] = f32::NEG_INFINITY;
            x[240] = f32::MIN_POSITIVE;
            let n = x.len() / BLOCK;
            let [mut simd, mut portable] =
                [0, 1].map(|_| (vec![0i8; x.len()], vec![0f32; n], vec![0i32; n]));
            // SAFETY: the CPU has AVX2.
            unsafe { simd::quantize_avx2(&x, &mut simd.0, &mut simd.1, &mut simd.2) };
            quantize_portable(&x, &mut portable.0, &mut portable.1, &mut portable.2);
            let bits = |d: &[f32]| d.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                (&simd.0, bits(&simd.1), &simd.2),
                (&portable.0, bits(&portable.1), &portable.2)
            );
        }
    }

    /// Four weight rows together give each row the bits it gets alone, for every kernel that
    /// has the loop, with rows of two groups of eight blocks and three alone.
    #[test]
    fn four_rows_give_each_row_its_bits_alone() {
        let n = 19;
        for kind in [GgmlBlocks::Q4_0, GgmlBlocks::Q4_1, GgmlBlocks::Q8_0] {
            let size = kind.block_bytes();
            let mut bytes = Vec::new();
            for b in 0..TOGETHER * n {
                let d = half::f16::from_f32(0.01 * (1 + b % 7) as f32).to_le_bytes();
                let m = half::f16::from_f32(-0.05 * (b % 3) as f32).to_le_bytes();
                bytes.extend(d);
                if kind == GgmlBlocks::Q4_1 {
                    bytes.extend(m);
                }
                let codes = size - if kind == GgmlBlocks::Q4_1 { 4 } else { 2 };
                bytes.extend((0..codes).map(|i| ((b * 37 + i * 11) % 256) as u8));
            }
            let x: Vec<f32> = (0..n * BLOCK)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * [1.0, 0.01, 3.0][i / BLOCK % 3])
                .collect();
            let xs = Q8Rows::new(&x, n * BLOCK, kind);
            for kernel in kernels().into_iter().filter(|&k| k != Kernel::Portable) {
                let mut together = [0f32; TOGETHER];
                assert!(four_rows(kind, &bytes, &xs, &mut together, kernel));
                for (k, got) in together.iter().enumerate() {
                    let mut alone = [0f32];
                    row_dots(
                        kind,
                        &bytes[k * n * size..(k + 1) * n * size],
                        &xs,
                        &mut alone,
                        kernel,
                    );
                    assert_eq!(
                        got.to_bits(),
                        alone[0].to_bits(),
                        "{kind:?} {kernel:?} row {k}"
                    );
                }
            }
        }
    }
}
