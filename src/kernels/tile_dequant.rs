//! Whole quantization blocks dequantized to f32, for the tiles the training step's GEMMs read
//! (ggml Q4_0, Q4_1, Q8_0 and NF4), vectorised with AVX-512F or AVX2 where the CPU has them.
//!
//! Every kernel gives the portable form's bits: each value is the same f32 product (and
//! Q4_1's sum) of the same operands, rounded once per operation, never fused; the f16 scales
//! widen to f32 exactly (F16C). Only the order of the stores differs.

use super::nf4_codes::{BLOCK as NF4_BLOCK, NF4};
use super::quant_gemv::GgmlBlocks;

/// Values per ggml block of Q4_0, Q4_1 and Q8_0.
const GGML_BLOCK: usize = 32;

/// An instruction set the dequantizers run on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kernel {
    /// Plain Rust, on any CPU.
    Portable,
    /// AVX2 and F16C: eight values a register, NF4's table in two.
    Avx2,
    /// AVX-512F (and F16C): sixteen values a register; a 16-entry table (NF4's values, Q4_0's
    /// and Q4_1's integers) in one, looked up by one permute.
    Avx512,
}

/// The kernels this CPU runs, the fastest last.
pub fn kernels() -> Vec<Kernel> {
    let mut k = vec![Kernel::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("f16c") {
            k.push(Kernel::Avx2);
            if has!("avx512f") {
                k.push(Kernel::Avx512);
            }
        }
    }
    k
}

fn fastest() -> Kernel {
    static FASTEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *FASTEST.get_or_init(|| *kernels().last().expect("the portable kernel"))
}

/// Dequantizes `bytes`, whole blocks of `kind`, into `out` (32 values a block).
pub fn ggml_into(kind: GgmlBlocks, bytes: &[u8], out: &mut [f32]) {
    ggml_with(fastest(), kind, bytes, out)
}

/// [`ggml_into`] on the kernel the caller names (the tests compare them all).
pub fn ggml_with(kernel: Kernel, kind: GgmlBlocks, bytes: &[u8], out: &mut [f32]) {
    let size = kind.block_bytes();
    assert!(
        bytes.len().is_multiple_of(size) && bytes.len() / size * GGML_BLOCK == out.len(),
        "ggml blocks: {} bytes for {} values",
        bytes.len(),
        out.len()
    );
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the kernel was detected (or chosen among the detected ones); sizes checked.
        Kernel::Avx512 => unsafe { avx512::ggml(kind, bytes, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx2 => unsafe { avx2::ggml(kind, bytes, out) },
        _ => portable::ggml(kind, bytes, out),
    }
}

/// Dequantizes whole NF4 blocks: `out[i] = NF4[code i] · amax[i / 64]`, codes two to a byte,
/// the first value in the high nibble.
pub fn nf4_into(bytes: &[u8], amax: &[f32], out: &mut [f32]) {
    nf4_with(fastest(), bytes, amax, out)
}

/// [`nf4_into`] on the kernel the caller names.
pub fn nf4_with(kernel: Kernel, bytes: &[u8], amax: &[f32], out: &mut [f32]) {
    assert!(
        out.len().is_multiple_of(NF4_BLOCK)
            && bytes.len() * 2 == out.len()
            && amax.len() == out.len() / NF4_BLOCK,
        "NF4 blocks: {} bytes and {} scales for {} values",
        bytes.len(),
        amax.len(),
        out.len()
    );
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the kernel was detected; sizes checked.
        Kernel::Avx512 => unsafe { avx512::nf4(bytes, amax, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx2 => unsafe { avx2::nf4(bytes, amax, out) },
        _ => nf4_portable(bytes, amax, out, |v| v),
    }
}

/// NF4 blocks (the last may be partial when `out` ends in it) in any output type: `to` rounds
/// each f32 product `NF4[code] · amax`. One table lookup gives both values of a byte.
pub fn nf4_portable<T>(bytes: &[u8], amax: &[f32], out: &mut [T], to: impl Fn(f32) -> T) {
    for ((o, b), &a) in out
        .chunks_mut(NF4_BLOCK)
        .zip(bytes.chunks(NF4_BLOCK / 2))
        .zip(amax)
    {
        for (o2, &byte) in o.chunks_exact_mut(2).zip(b) {
            let [hi, lo] = NF4_PAIRS[byte as usize];
            o2[0] = to(hi * a);
            o2[1] = to(lo * a);
        }
    }
}

/// Both NF4 values of each byte.
static NF4_PAIRS: [[f32; 2]; 256] = {
    let mut t = [[0f32; 2]; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = [NF4[b >> 4], NF4[b & 15]];
        b += 1;
    }
    t
};

mod portable {
    use super::{GgmlBlocks, GGML_BLOCK};
    use half::f16;

    pub fn ggml(kind: GgmlBlocks, bytes: &[u8], out: &mut [f32]) {
        let one = match kind {
            GgmlBlocks::Q4_0 => q4_0,
            GgmlBlocks::Q4_1 => q4_1,
            GgmlBlocks::Q8_0 => q8_0,
        };
        for (b, o) in bytes
            .chunks_exact(kind.block_bytes())
            .zip(out.chunks_exact_mut(GGML_BLOCK))
        {
            one(b, o);
        }
    }

    fn half_at(b: &[u8], at: usize) -> f32 {
        f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
    }

    /// d (f16), 32 × i8: `q · d`.
    fn q8_0(b: &[u8], out: &mut [f32]) {
        let d = half_at(b, 0);
        for (o, &q) in out.iter_mut().zip(&b[2..34]) {
            *o = f32::from(q as i8) * d;
        }
    }

    /// d (f16), 16 bytes of nibbles (low nibbles are values 0..16, high 16..32): `d · (q − 8)`.
    fn q4_0(b: &[u8], out: &mut [f32]) {
        let d = half_at(b, 0);
        for (i, &q) in b[2..18].iter().enumerate() {
            out[i] = d * f32::from((q & 0x0F) as i8 - 8);
            out[i + 16] = d * f32::from((q >> 4) as i8 - 8);
        }
    }

    /// d, m (f16), nibbles as Q4_0: `d · q + m`.
    fn q4_1(b: &[u8], out: &mut [f32]) {
        let (d, m) = (half_at(b, 0), half_at(b, 2));
        for (i, &q) in b[4..20].iter().enumerate() {
            out[i] = d * f32::from(q & 0x0F) + m;
            out[i + 16] = d * f32::from(q >> 4) + m;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{GgmlBlocks, GGML_BLOCK, NF4, NF4_BLOCK};
    use std::arch::x86_64::*;

    /// The first two f16 at `p` (a block's d, and Q4_1's m), broadcast in f32.
    #[target_feature(enable = "avx512f,f16c")]
    #[inline]
    unsafe fn scales(p: *const u8) -> (__m512, __m512) {
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned()));
        (
            _mm512_broadcastss_ps(dm),
            _mm512_broadcastss_ps(_mm_movehdup_ps(dm)),
        )
    }

    /// # Safety
    /// AVX-512F and F16C; `out` holds 32 values per block of `bytes`.
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn ggml(kind: GgmlBlocks, bytes: &[u8], out: &mut [f32]) {
        let size = kind.block_bytes();
        let offset = if kind == GgmlBlocks::Q4_0 { 8.0 } else { 0.0 };
        let table: [f32; 16] = std::array::from_fn(|q| q as f32 - offset);
        let t = _mm512_loadu_ps(table.as_ptr());
        for (b, o) in bytes
            .chunks_exact(size)
            .zip(out.chunks_exact_mut(GGML_BLOCK))
        {
            let (p, o) = (b.as_ptr(), o.as_mut_ptr());
            let (d, m) = scales(p);
            let (lo, hi) = match kind {
                GgmlBlocks::Q8_0 => {
                    let q = |at: usize| {
                        let bytes = _mm_loadu_si128(p.add(at).cast());
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes))
                    };
                    (_mm512_mul_ps(q(2), d), _mm512_mul_ps(q(18), d))
                }
                _ => {
                    // vpermps reads an index's low four bits: the low nibbles need no mask.
                    let at = if kind == GgmlBlocks::Q4_1 { 4 } else { 2 };
                    let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(at).cast()));
                    let lo = _mm512_mul_ps(d, _mm512_permutexvar_ps(idx, t));
                    let hi = _mm512_mul_ps(d, _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), t));
                    match kind {
                        GgmlBlocks::Q4_1 => (_mm512_add_ps(lo, m), _mm512_add_ps(hi, m)),
                        _ => (lo, hi),
                    }
                }
            };
            _mm512_storeu_ps(o, lo);
            _mm512_storeu_ps(o.add(16), hi);
        }
    }

    /// # Safety
    /// AVX-512F; `bytes` and `amax` are whole blocks of `out`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn nf4(bytes: &[u8], amax: &[f32], out: &mut [f32]) {
        let t = _mm512_loadu_ps(NF4.as_ptr());
        // Lanes of (high, low) pairs: values 0..8 of both lookups, then 8..16.
        let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let second =
            _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        for ((b, o), &a) in bytes
            .chunks_exact(NF4_BLOCK / 2)
            .zip(out.chunks_exact_mut(NF4_BLOCK))
            .zip(amax)
        {
            let a = _mm512_set1_ps(a);
            for half in 0..2 {
                let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.as_ptr().add(16 * half).cast()));
                let hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), t), a);
                let lo = _mm512_mul_ps(_mm512_permutexvar_ps(idx, t), a);
                let o = o.as_mut_ptr().add(32 * half);
                _mm512_storeu_ps(o, _mm512_permutex2var_ps(hi, first, lo));
                _mm512_storeu_ps(o.add(16), _mm512_permutex2var_ps(hi, second, lo));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{GgmlBlocks, GGML_BLOCK, NF4, NF4_BLOCK};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 and F16C; `out` holds 32 values per block of `bytes`.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn ggml(kind: GgmlBlocks, bytes: &[u8], out: &mut [f32]) {
        let size = kind.block_bytes();
        let (mask, eight) = (_mm256_set1_epi32(0x0F), _mm256_set1_epi32(8));
        for (b, o) in bytes
            .chunks_exact(size)
            .zip(out.chunks_exact_mut(GGML_BLOCK))
        {
            let (p, o) = (b.as_ptr(), o.as_mut_ptr());
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned()));
            let d = _mm256_broadcastss_ps(dm);
            // Eight integer codes a register, in the order of the block's values.
            let codes: [__m256i; 4] = match kind {
                GgmlBlocks::Q8_0 => std::array::from_fn(|k| {
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(2 + 8 * k).cast()))
                }),
                _ => {
                    let at = if kind == GgmlBlocks::Q4_1 { 4 } else { 2 };
                    let q = _mm_loadu_si128(p.add(at).cast());
                    let (w0, w1) = (
                        _mm256_cvtepu8_epi32(q),
                        _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(q)),
                    );
                    let nibbles = [
                        _mm256_and_si256(w0, mask),
                        _mm256_and_si256(w1, mask),
                        _mm256_srli_epi32::<4>(w0),
                        _mm256_srli_epi32::<4>(w1),
                    ];
                    match kind {
                        GgmlBlocks::Q4_0 => nibbles.map(|n| _mm256_sub_epi32(n, eight)),
                        _ => nibbles,
                    }
                }
            };
            for (k, c) in codes.into_iter().enumerate() {
                let q = _mm256_cvtepi32_ps(c);
                let v = match kind {
                    GgmlBlocks::Q8_0 => _mm256_mul_ps(q, d),
                    GgmlBlocks::Q4_0 => _mm256_mul_ps(d, q),
                    GgmlBlocks::Q4_1 => {
                        let m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
                        _mm256_add_ps(_mm256_mul_ps(d, q), m)
                    }
                };
                _mm256_storeu_ps(o.add(8 * k), v);
            }
        }
    }

    /// # Safety
    /// AVX2; `bytes` and `amax` are whole blocks of `out`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn nf4(bytes: &[u8], amax: &[f32], out: &mut [f32]) {
        let (low, high) = (
            _mm256_loadu_ps(NF4.as_ptr()),
            _mm256_loadu_ps(NF4.as_ptr().add(8)),
        );
        // Codes 0..8 from one half of the table, 8..16 from the other, by bit 3.
        let lookup = |idx: __m256i| {
            let pick = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
            _mm256_blendv_ps(
                _mm256_permutevar8x32_ps(low, idx),
                _mm256_permutevar8x32_ps(high, idx),
                pick,
            )
        };
        for ((b, o), &a) in bytes
            .chunks_exact(NF4_BLOCK / 2)
            .zip(out.chunks_exact_mut(NF4_BLOCK))
            .zip(amax)
        {
            let a = _mm256_set1_ps(a);
            for quarter in 0..4 {
                let idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(b.as_ptr().add(8 * quarter).cast()));
                let hi = _mm256_mul_ps(lookup(_mm256_srli_epi32::<4>(idx)), a);
                let lo = _mm256_mul_ps(lookup(idx), a);
                // (h0 l0 h1 l1 | h4 l4 h5 l5) and (h2 l2 h3 l3 | h6 l6 h7 l7), lanes rejoined.
                let (even, odd) = (_mm256_unpacklo_ps(hi, lo), _mm256_unpackhi_ps(hi, lo));
                let o = o.as_mut_ptr().add(16 * quarter);
                _mm256_storeu_ps(o, _mm256_permute2f128_ps::<0x20>(even, odd));
                _mm256_storeu_ps(o.add(8), _mm256_permute2f128_ps::<0x31>(even, odd));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes covering every nibble and byte value, with f16 scales of both signs
    /// (normal and subnormal) written where each block keeps them.
    fn ggml_bytes(kind: GgmlBlocks, blocks: usize, seed: u64) -> Vec<u8> {
        let size = kind.block_bytes();
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut bytes: Vec<u8> = (0..blocks * size).map(|_| next() as u8).collect();
        let scale_values = [0.0123f32, -0.5, 3.0e-6, 1.75, -2.0e-7, 0.0];
        for (i, b) in bytes.chunks_exact_mut(size).enumerate() {
            let d = half::f16::from_f32(scale_values[i % scale_values.len()]);
            b[..2].copy_from_slice(&d.to_bits().to_le_bytes());
            if kind == GgmlBlocks::Q4_1 {
                let m = half::f16::from_f32(-0.37 * (i % 5) as f32);
                b[2..4].copy_from_slice(&m.to_bits().to_le_bytes());
            }
        }
        bytes
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn ggml_kernels_equal_the_portable_form_bit_for_bit() {
        for kind in [GgmlBlocks::Q4_0, GgmlBlocks::Q4_1, GgmlBlocks::Q8_0] {
            // One block, a row of three, several rows' worth of an odd count.
            for blocks in [1, 3, 37] {
                let bytes = ggml_bytes(kind, blocks, blocks as u64 + 7);
                let mut want = vec![f32::NAN; blocks * GGML_BLOCK];
                ggml_with(Kernel::Portable, kind, &bytes, &mut want);
                for kernel in kernels() {
                    let mut got = vec![f32::NAN; blocks * GGML_BLOCK];
                    ggml_with(kernel, kind, &bytes, &mut got);
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{kind:?} {kernel:?} {blocks} blocks"
                    );
                }
            }
        }
    }

    #[test]
    fn portable_ggml_values_are_the_formulas() {
        let bytes = ggml_bytes(GgmlBlocks::Q4_1, 1, 3);
        let mut out = [0f32; 32];
        ggml_with(Kernel::Portable, GgmlBlocks::Q4_1, &bytes, &mut out);
        let d = half::f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32();
        let m = half::f16::from_bits(u16::from_le_bytes([bytes[2], bytes[3]])).to_f32();
        assert_eq!(out[0], d * f32::from(bytes[4] & 15) + m);
        assert_eq!(out[16], d * f32::from(bytes[4] >> 4) + m);
        assert_eq!(out[31], d * f32::from(bytes[19] >> 4) + m);
    }

    #[test]
    fn nf4_kernels_equal_the_portable_form_bit_for_bit() {
        for blocks in [1, 2, 5, 23] {
            let bytes: Vec<u8> = (0..blocks * NF4_BLOCK / 2)
                .map(|i| (i * 37 + blocks) as u8)
                .collect();
            let amax: Vec<f32> = (0..blocks)
                .map(|b| [0.031, 1.7, 0.0, 2.5e-3, 0.9][b % 5] * (1.0 + b as f32 / 7.0))
                .collect();
            let mut want = vec![f32::NAN; blocks * NF4_BLOCK];
            nf4_with(Kernel::Portable, &bytes, &amax, &mut want);
            assert_eq!(want[0], NF4[bytes[0] as usize >> 4] * amax[0]);
            assert_eq!(want[1], NF4[bytes[0] as usize & 15] * amax[0]);
            for kernel in kernels() {
                let mut got = vec![f32::NAN; blocks * NF4_BLOCK];
                nf4_with(kernel, &bytes, &amax, &mut got);
                assert_eq!(bits(&got), bits(&want), "{kernel:?} {blocks} blocks");
            }
        }
    }
}
