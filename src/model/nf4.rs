//! NF4 4-bit block quantization, bit-exact with bitsandbytes `quantize_4bit(quant_type="nf4")`
//! (docs/methods.md §5, rules pinned by `tests/fixtures/nf4/README.md`), with double quantization of
//! the per-block scales.
//!
//! Layout, as bitsandbytes: the tensor is flattened row-major and cut into blocks of 64 (the last
//! block may be partial); two codes per byte, the first element in the high nibble (an odd count
//! pads the last low nibble with the code of 0).

use crate::choice::named_enum;
use crate::kernels::quant_gemv::{Nf4Scales, QuantMatrix};
use crate::kernels::tile_dequant;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

pub use crate::kernels::nf4_codes::{dynamic_map, BLOCK, NESTED_BLOCK, NF4};

/// The code of 0.0: what an all-zero block and the padding nibble hold.
const ZERO_CODE: u8 = 7;

/// Decision thresholds: f32 midpoints of adjacent codes (bitsandbytes' kernel constants).
fn nf4_thresholds() -> [f32; 15] {
    std::array::from_fn(|k| (NF4[k] + NF4[k + 1]) * 0.5)
}

/// The NF4 code of a scaled value: the number of thresholds strictly below it, so a value
/// exactly on a threshold takes the lower code. Branch-free.
#[inline]
fn nf4_code(t: &[f32; 15], scaled: f32) -> u8 {
    t.iter().map(|&m| (scaled > m) as u8).sum()
}

/// Double-quantized block scales: `absmax_b = map[codes[b]] · scales[b / 256] + offset`.
#[derive(Clone, Debug, PartialEq)]
pub struct NestedAbsmax {
    pub codes: Vec<u8>,
    /// Per 256 blocks: max |absmax − offset| (bitsandbytes' `nested_absmax`).
    pub scales: Vec<f32>,
    /// mean(absmax).
    pub offset: f32,
}

/// The per-block scales: plain f32 or double-quantized.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Double(NestedAbsmax),
}

/// A tensor in NF4: 4-bit codes plus one scale per block of 64.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    pub shape: Vec<usize>,
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

/// A dtype the dequantization writes: `NF4[code] · absmax` is computed in f32, then cast.
pub trait Nf4Out: Copy + Send + Sync {
    fn from_f32(v: f32) -> Self;

    /// Whole blocks: `out[i] = NF4[code i] · amax[i / BLOCK]`, codes two to a byte, high first
    /// (the last block may be partial when `out` ends in it).
    fn blocks_into(bytes: &[u8], amax: &[f32], out: &mut [Self]) {
        tile_dequant::nf4_portable(bytes, amax, out, Self::from_f32)
    }
}
impl Nf4Out for f32 {
    #[inline]
    fn from_f32(v: f32) -> Self {
        v
    }

    /// The vectorised kernels, which give the portable form's bits.
    fn blocks_into(bytes: &[u8], amax: &[f32], out: &mut [f32]) {
        if out.len().is_multiple_of(BLOCK) {
            tile_dequant::nf4_into(bytes, amax, out)
        } else {
            tile_dequant::nf4_portable(bytes, amax, out, Self::from_f32)
        }
    }
}
impl Nf4Out for f64 {
    #[inline]
    fn from_f32(v: f32) -> Self {
        v as f64
    }
}
impl Nf4Out for bf16 {
    /// Round to nearest even on the bits, branch-free so the loop vectorises (the products are
    /// finite: quantization rejects non-finite input); `half`'s conversion also handles NaN.
    #[inline]
    fn from_f32(v: f32) -> Self {
        let b = v.to_bits();
        bf16::from_bits((b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16)
    }
}
impl Nf4Out for f16 {
    #[inline]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Blocks handed to one rayon task: big enough to amortise scheduling, small enough to balance.
const BLOCKS_PER_TASK: usize = 1024;

/// Values a task of a tile's dequantization writes (whole rows of the tile).
const ELEMS_PER_TASK: usize = 1 << 15;

impl Nf4Tensor {
    /// Quantizes `x` (row-major, `shape`); `name` is for errors. Non-finite values are an error:
    /// they would silently poison a whole block.
    pub fn quantize(name: &str, x: &[f32], shape: &[usize], double_quant: bool) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != x.len() {
            bail!("tensor {name}: {} values for shape {shape:?}", x.len());
        }
        if n == 0 {
            bail!("tensor {name}: empty, nothing to quantize");
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            bail!(
                "tensor {name}: value {} at flat index {i} is not finite; NF4 cannot represent it \
                 (check the checkpoint)",
                x[i]
            );
        }
        let t = nf4_thresholds();
        let mut absmax = vec![0f32; n.div_ceil(BLOCK)];
        let mut packed = code_buffer(n.div_ceil(2));
        // A block is 32 bytes, so byte chunks and value chunks stay aligned per task.
        packed
            .par_chunks_mut(BLOCK / 2 * BLOCKS_PER_TASK)
            .zip(absmax.par_chunks_mut(BLOCKS_PER_TASK))
            .zip(x.par_chunks(BLOCK * BLOCKS_PER_TASK))
            .for_each(|((bytes, amax), xs)| {
                for ((b, a), v) in bytes
                    .chunks_mut(BLOCK / 2)
                    .zip(amax.iter_mut())
                    .zip(xs.chunks(BLOCK))
                {
                    *a = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                    // An all-zero block: bitsandbytes' CPU kernel stores the code of 0 there.
                    let inv = if *a == 0.0 { 0.0 } else { 1.0 / *a };
                    for (k, byte) in b.iter_mut().enumerate() {
                        let hi = nf4_code(&t, v[2 * k] * inv);
                        let lo = v
                            .get(2 * k + 1)
                            .map_or(ZERO_CODE, |&x| nf4_code(&t, x * inv));
                        *byte = (hi << 4) | lo;
                    }
                }
            });
        let absmax = if double_quant {
            Absmax::Double(NestedAbsmax::quantize(&absmax))
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Self {
            shape: shape.to_vec(),
            packed,
            absmax,
        })
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn blocks(&self) -> usize {
        self.elem_count().div_ceil(BLOCK)
    }

    /// Bytes held: codes plus scales.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::Plain(a) => 4 * a.len(),
                Absmax::Double(d) => d.codes.len() + 4 * d.scales.len() + 4,
            }
    }

    /// The per-block scales in f32 (dequantized when double-quantized).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Double(d) => d.dequantize(),
        }
    }

    /// Dequantizes into `out` (the row-major tensor) on the current rayon pool.
    pub fn dequantize_into<T: Nf4Out>(&self, out: &mut [T]) {
        let n = self.elem_count();
        assert_eq!(out.len(), n, "dequantize_into: output of the tensor's size");
        let absmax = self.absmax_f32();
        let full = n / BLOCK;
        let (head, tail) = out.split_at_mut(full * BLOCK);
        head.par_chunks_mut(BLOCK * BLOCKS_PER_TASK)
            .zip(self.packed[..full * BLOCK / 2].par_chunks(BLOCK / 2 * BLOCKS_PER_TASK))
            .zip(absmax[..full].par_chunks(BLOCKS_PER_TASK))
            .for_each(|((out, bytes), amax)| T::blocks_into(bytes, amax, out));
        // The partial last block, if any.
        for (i, o) in tail.iter_mut().enumerate() {
            let k = full * BLOCK + i;
            let byte = self.packed[k / 2];
            let code = if k % 2 == 0 { byte >> 4 } else { byte & 15 };
            *o = T::from_f32(NF4[code as usize] * absmax[full]);
        }
    }

    /// Dequantizes the tile `rows × cols` of a 2-D tensor whose rows are whole blocks into
    /// `out` (row-major); `cols` starts and ends on block boundaries. `absmax` is
    /// `absmax_f32()`, computed once by the caller.
    pub fn dequantize_tile_into<T: Nf4Out>(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        absmax: &[f32],
        out: &mut [T],
    ) {
        let h = self.shape[self.shape.len() - 1];
        let whole = |v: usize| v % BLOCK == 0;
        assert!(
            whole(h) && whole(cols.start) && whole(cols.end),
            "whole blocks only"
        );
        let width = cols.len();
        assert_eq!(
            out.len(),
            rows.len() * width,
            "dequantize_tile_into: output of the tile's size"
        );
        // Runs of rows per task: one row of a narrow column tile is too little work for one.
        let run = (ELEMS_PER_TASK / width.max(1)).max(1);
        out.par_chunks_mut(width * run)
            .enumerate()
            .for_each(|(t, chunk)| {
                for (i, row) in chunk.chunks_exact_mut(width).enumerate() {
                    let first = (rows.start + t * run + i) * h + cols.start;
                    let bytes = &self.packed[first / 2..(first + width) / 2];
                    let amax = &absmax[first / BLOCK..(first + width) / BLOCK];
                    T::blocks_into(bytes, amax, row);
                }
            });
    }

    /// The tensor as the fused few-row product reads it, when it is a matrix of whole
    /// blocks per row.
    pub fn fused(&self) -> Option<QuantMatrix<'_>> {
        let [rows, cols] = self.shape[..] else {
            return None;
        };
        if !cols.is_multiple_of(BLOCK) {
            return None;
        }
        let scales = match &self.absmax {
            Absmax::Plain(a) => Nf4Scales::Plain(a),
            Absmax::Double(d) => {
                static MAP: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
                Nf4Scales::Double {
                    codes: &d.codes,
                    scales: &d.scales,
                    offset: d.offset,
                    map: MAP.get_or_init(dynamic_map),
                }
            }
        };
        Some(QuantMatrix::Nf4 {
            packed: &self.packed,
            scales,
            table: &NF4,
            rows,
            cols,
        })
    }

    /// The dequantized tensor in `dtype` (f32, f64, bf16 or f16).
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        fn build<T: Nf4Out + candle_core::WithDType>(
            q: &Nf4Tensor,
            device: &Device,
        ) -> candle_core::Result<Tensor> {
            let mut v = vec![T::from_f32(0.0); q.elem_count()];
            q.dequantize_into(&mut v);
            Tensor::from_vec(v, q.shape.as_slice(), device)
        }
        match dtype {
            DType::F32 => build::<f32>(self, device),
            DType::F64 => build::<f64>(self, device),
            DType::BF16 => build::<bf16>(self, device),
            DType::F16 => build::<f16>(self, device),
            other => candle_core::bail!("NF4 dequantizes to a float dtype, not {other:?}"),
        }
    }
}

impl NestedAbsmax {
    /// bitsandbytes' double quantization: `offset = mean(absmax)`, then `absmax − offset` in
    /// blocks of 256, each scaled by its max |·| and mapped to the exact nearest entry of the
    /// dynamic map (as its CUDA kernel; ties take the lower entry).
    pub fn quantize(absmax: &[f32]) -> Self {
        // The mean in f64: within an ulp of PyTorch's cascade sum (the fixture tolerance).
        let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
        let map = dynamic_map();
        let mids: Vec<f32> = map.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
        let mut codes = Vec::with_capacity(absmax.len());
        let mut scales = Vec::with_capacity(absmax.len().div_ceil(NESTED_BLOCK));
        for chunk in absmax.chunks(NESTED_BLOCK) {
            let scale = chunk.iter().fold(0f32, |m, &a| m.max((a - offset).abs()));
            let inv = if scale == 0.0 { 0.0 } else { 1.0 / scale };
            codes.extend(chunk.iter().map(|&a| {
                let s = (a - offset) * inv;
                mids.partition_point(|&m| m < s) as u8
            }));
            scales.push(scale);
        }
        Self {
            codes,
            scales,
            offset,
        }
    }

    /// `map[code] · scale + offset`, two f32 roundings as bitsandbytes.
    pub fn dequantize(&self) -> Vec<f32> {
        let map = dynamic_map();
        self.codes
            .iter()
            .enumerate()
            .map(|(b, &c)| map[c as usize] * self.scales[b / NESTED_BLOCK] + self.offset)
            .collect()
    }
}

/// How the seven linears of each block are stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Quantization {
    /// In the compute dtype.
    None,
    /// NF4 in blocks of 64; `double_quant` also quantizes the block scales (the paper's setting).
    Nf4 { double_quant: bool },
}

named_enum! {
/// How the block linears are kept (`model.quantize`, `--quantize`).
pub enum Storage {
    /// In the compute dtype.
    None = "none",
    /// 4-bit NormalFloat, as bitsandbytes.
    Nf4 = "nf4",
}
}

impl Quantization {
    pub fn new(storage: Storage, double_quant: bool) -> Self {
        match storage {
            Storage::None => Self::None,
            Storage::Nf4 => Self::Nf4 { double_quant },
        }
    }
}

/// `bytes` zeroed bytes for NF4 codes, backed by 2 MiB pages where Linux grants them
/// ([`super::huge_pages::advise`]: a 7B decoding step streams 3.6 GiB of codes); the caller
/// writes the codes.
pub(crate) fn code_buffer(bytes: usize) -> Vec<u8> {
    let mut buf = vec![0u8; bytes];
    super::huge_pages::advise(&mut buf);
    buf
}
