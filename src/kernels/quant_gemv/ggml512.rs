//! ggml Q4_0, Q4_1 and Q8_0 rows with AVX-512F and f32 activations, several weight rows per
//! pass. Sixteen bytes of nibbles widened to 32-bit lanes feed two lookups of a 16-entry f32
//! table (`q − 8` for Q4_0, `q` for Q4_1) held in one register: `vpermps` reads only an
//! index's low four bits, so the low nibbles need no mask and the high ones one shift — three
//! operations for 32 codes where AVX2 needs ten (Q4_1) or fourteen (Q4_0). Each block's f16
//! scale (and Q4_1's min) is converted sixteen blocks at a time. With one row of `x` and short
//! rows, four weight rows go together, so each value of `x` loaded serves four rows and four
//! chains of sums are in flight ([`super::rows_together`]).
//!
//! The sums are those of the AVX2 loop in another order (`s_b · Σ_i q_i·x_i` per block, Q4_1's
//! `m_b · Σ_i x_i` apart), within [`super::TOLERANCE`].

use super::{GgmlBlocks, Prepared, GGML_BLOCK, PREFETCH_BYTES};
use std::arch::x86_64::*;

/// Blocks whose scales are converted by one instruction.
const CHUNK: usize = 16;

/// The rows `first..first + W` of `W (rows, cols)` in `kind`'s blocks against the rows
/// `r0..r0 + R` of `xs`: `y[k · m + r0 + r]` for weight row `first + k` and row `r0 + r`.
///
/// # Safety
/// The CPU has AVX-512F and F16C; `bytes` holds the rows `first..first + W` whole.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn rows<const W: usize, const R: usize>(
    kind: GgmlBlocks,
    bytes: &[u8],
    first: usize,
    xs: &Prepared,
    r0: usize,
    y: &mut [f32],
) {
    match kind {
        GgmlBlocks::Q4_0 => sweep::<W, R, 0>(bytes, first, xs, r0, y),
        GgmlBlocks::Q4_1 => sweep::<W, R, 1>(bytes, first, xs, r0, y),
        GgmlBlocks::Q8_0 => sweep::<W, R, 2>(bytes, first, xs, r0, y),
    }
}

/// [`rows`] for one block layout (`KIND`: 0 Q4_0, 1 Q4_1, 2 Q8_0).
#[allow(clippy::needless_range_loop)] // one index walks several arrays (rows, scales, sums)
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn sweep<const W: usize, const R: usize, const KIND: u8>(
    bytes: &[u8],
    first: usize,
    xs: &Prepared,
    r0: usize,
    y: &mut [f32],
) {
    let (size, codes_at) = match KIND {
        0 => (18, 2),
        1 => (20, 4),
        _ => (34, 2),
    };
    let n = xs.cols / GGML_BLOCK;
    debug_assert!(bytes.len() >= (first + W) * n * size);
    let base: [*const u8; W] = std::array::from_fn(|k| bytes.as_ptr().add((first + k) * n * size));
    let x: [*const f32; R] = std::array::from_fn(|r| xs.row(r0 + r).as_ptr());
    let table: [f32; 16] = std::array::from_fn(|q| q as f32 - if KIND == 0 { 8.0 } else { 0.0 });
    let t = _mm512_loadu_ps(table.as_ptr());
    let z = _mm512_setzero_ps();
    let mut acc = [[z; R]; W];
    let mut offsets = [[z; R]; W];
    let mut c = 0;
    while c < n {
        let len = (n - c).min(CHUNK);
        // The chunk's scales (and Q4_1's mins) in f32, zero past its end: one gather of the
        // first four bytes of each block (Q4_1's d and m), halves converted sixteen at once.
        let mask = (u32::MAX >> (32 - len)) as __mmask16;
        let at = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(size as i32),
        );
        let mut d = [[0f32; CHUNK]; W];
        let mut mins = [[0f32; CHUNK]; W];
        for k in 0..W {
            // The hardware's stream prefetcher alone falls behind four interleaved rows. Past
            // the row's end this touches the next rows' bytes (or none: a prefetch never
            // faults).
            let ahead = base[k].wrapping_add(c * size + PREFETCH_BYTES);
            for line in (0..len * size).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
            }
            let heads = _mm512_mask_i32gather_epi32::<1>(
                _mm512_setzero_si512(),
                mask,
                at,
                base[k].add(c * size).cast(),
            );
            _mm512_storeu_ps(d[k].as_mut_ptr(), halves(heads));
            if KIND == 1 {
                _mm512_storeu_ps(mins[k].as_mut_ptr(), halves(_mm512_srli_epi32(heads, 16)));
            }
        }
        if KIND == 1 {
            for r in 0..R {
                let sums = _mm512_maskz_loadu_ps(mask, xs.sums(r0 + r).as_ptr().add(c));
                for k in 0..W {
                    let m = _mm512_loadu_ps(mins[k].as_ptr());
                    offsets[k][r] = _mm512_fmadd_ps(m, sums, offsets[k][r]);
                }
            }
        }
        for j in 0..len {
            let b = c + j;
            let e = b * GGML_BLOCK;
            for k in 0..W {
                let p = base[k].add(b * size + codes_at);
                let (lo, hi) = if KIND == 2 {
                    (signed16(p), signed16(p.add(16)))
                } else {
                    let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
                    (
                        _mm512_permutexvar_ps(idx, t),
                        _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), t),
                    )
                };
                let scale = _mm512_set1_ps(d[k][j]);
                for r in 0..R {
                    let sum = _mm512_mul_ps(lo, _mm512_loadu_ps(x[r].add(e)));
                    let sum = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x[r].add(e + 16)), sum);
                    acc[k][r] = _mm512_fmadd_ps(sum, scale, acc[k][r]);
                }
            }
        }
        c += len;
    }
    let m = xs.m;
    for k in 0..W {
        for r in 0..R {
            y[k * m + r0 + r] =
                _mm512_reduce_add_ps(acc[k][r]) + _mm512_reduce_add_ps(offsets[k][r]);
        }
    }
}

/// The f16 values in the low halves of sixteen 32-bit lanes, in f32.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn halves(lanes: __m512i) -> __m512 {
    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(lanes))
}

/// Sixteen i8 codes at `p` in f32.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn signed16(p: *const u8) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
}
