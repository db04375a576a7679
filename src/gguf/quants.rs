//! Dequantization of ggml blocks to f32, bit for bit as llama.cpp's Python package
//! (`gguf.quants.dequantize`) computes it: the same f32 products and sums in the same order
//! (no fused multiply-adds); Q4_0, Q4_1 and Q8_0 by the vectorised kernels of
//! `kernels::tile_dequant`, which keep those bits.

use super::ggml_type::GgmlType;
use crate::kernels::quant_gemv::{GgmlBlocks, QuantMatrix};
use crate::kernels::tile_dequant;
use anyhow::{bail, Result};
use half::f16;
use rayon::prelude::*;

/// The types [`dequantize`] reads.
pub const SUPPORTED: [GgmlType; 9] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Whether [`dequantize`] reads `ty`.
pub fn supported(ty: GgmlType) -> bool {
    SUPPORTED.contains(&ty)
}

/// Blocks handed to one rayon task.
const BLOCKS_PER_TASK: usize = 64;

/// Dequantizes `bytes`, whole blocks of `ty`, into `out` (`block_size` values per block).
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let (block, size) = (ty.block_size(), ty.type_size());
    if !bytes.len().is_multiple_of(size) || bytes.len() / size * block != out.len() {
        bail!(
            "{ty}: {} bytes do not hold the {} values asked for",
            bytes.len(),
            out.len()
        );
    }
    let one = dequantizer(ty)?;
    bytes
        .par_chunks(size * BLOCKS_PER_TASK)
        .zip(out.par_chunks_mut(block * BLOCKS_PER_TASK))
        .for_each(|(b, o)| one.blocks_into(size, block, b, o));
    Ok(())
}

/// Dequantizes one block of a type into its `block_size` values.
type BlockFn = fn(&[u8], &mut [f32]);

/// How a type's blocks are dequantized: the vectorised kernels where there are some (the
/// types a 4-bit GGUF's linears hold), else block by block.
#[derive(Clone, Copy, Debug)]
enum Dequantizer {
    Vector(GgmlBlocks),
    Blockwise(BlockFn),
}

impl Dequantizer {
    /// Whole blocks of `size` bytes, `block` values each.
    fn blocks_into(self, size: usize, block: usize, bytes: &[u8], out: &mut [f32]) {
        match self {
            Self::Vector(kind) => tile_dequant::ggml_into(kind, bytes, out),
            Self::Blockwise(one) => {
                for (b, o) in bytes.chunks_exact(size).zip(out.chunks_exact_mut(block)) {
                    one(b, o);
                }
            }
        }
    }
}

fn dequantizer(ty: GgmlType) -> Result<Dequantizer> {
    use Dequantizer::{Blockwise, Vector};
    Ok(match ty {
        GgmlType::F32 => Blockwise(f32_block),
        GgmlType::F16 => Blockwise(f16_block),
        GgmlType::BF16 => Blockwise(bf16_block),
        GgmlType::Q8_0 => Vector(GgmlBlocks::Q8_0),
        GgmlType::Q4_0 => Vector(GgmlBlocks::Q4_0),
        GgmlType::Q4_1 => Vector(GgmlBlocks::Q4_1),
        GgmlType::Q4_K => Blockwise(q4_k),
        GgmlType::Q5_K => Blockwise(q5_k),
        GgmlType::Q6_K => Blockwise(q6_k),
        other => bail!(
            "tensors of type {other} cannot be read (supported: {})",
            SUPPORTED.map(|t| t.name()).join(", ")
        ),
    })
}

/// A matrix (rows, cols) kept in ggml blocks, each row whole blocks, that dequantizes any
/// part of a row: what a frozen linear holds to dequantize tile by tile.
#[derive(Debug)]
pub struct BlockMatrix {
    ggml_type: GgmlType,
    rows: usize,
    cols: usize,
    bytes: Vec<u8>,
    dequantizer: Dequantizer,
}

impl BlockMatrix {
    /// `bytes` of `rows` rows of `cols` values of `ty`.
    pub fn new(ggml_type: GgmlType, rows: usize, cols: usize, bytes: Vec<u8>) -> Result<Self> {
        let dequantizer = dequantizer(ggml_type)?;
        let row_bytes = ggml_type.bytes_for(cols as u64);
        if row_bytes.is_none_or(|b| b as usize * rows != bytes.len()) {
            bail!(
                "{ggml_type}: {} bytes are not {rows} rows of {cols} values",
                bytes.len()
            );
        }
        Ok(Self {
            ggml_type,
            rows,
            cols,
            bytes,
            dequantizer,
        })
    }

    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// (rows, cols)
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held: what the matrix costs in memory.
    pub fn storage_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Values per block: column ranges given to [`Self::row_part_into`] start and end on
    /// multiples of it (or at the row's end).
    pub fn block_size(&self) -> usize {
        self.ggml_type.block_size()
    }

    /// Values `cols` of row `row` into `out` (`cols.len()` values).
    pub fn row_part_into(&self, row: usize, cols: std::ops::Range<usize>, out: &mut [f32]) {
        let (block, size) = (self.block_size(), self.ggml_type.type_size());
        assert!(
            cols.start.is_multiple_of(block) && cols.end.is_multiple_of(block),
            "block-aligned columns"
        );
        let row_start = row * (self.cols / block) * size;
        let bytes =
            &self.bytes[row_start + cols.start / block * size..][..cols.len() / block * size];
        self.dequantizer.blocks_into(size, block, bytes, out);
    }

    /// The stored blocks, row after row.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The matrix as the fused few-row product reads it, for the types it reads.
    pub fn fused(&self) -> Option<QuantMatrix<'_>> {
        let kind = match self.ggml_type {
            GgmlType::Q4_0 => GgmlBlocks::Q4_0,
            GgmlType::Q4_1 => GgmlBlocks::Q4_1,
            GgmlType::Q8_0 => GgmlBlocks::Q8_0,
            _ => return None,
        };
        Some(QuantMatrix::Ggml {
            kind,
            bytes: &self.bytes,
            rows: self.rows,
            cols: self.cols,
        })
    }

    /// The whole matrix in f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols.max(1))
            .enumerate()
            .for_each(|(r, o)| self.row_part_into(r, 0..self.cols, o));
        out
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

fn f32_block(b: &[u8], out: &mut [f32]) {
    out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

fn f16_block(b: &[u8], out: &mut [f32]) {
    out[0] = half_at(b, 0);
}

fn bf16_block(b: &[u8], out: &mut [f32]) {
    out[0] = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
}

/// The eight 6-bit scales and mins of a Q4_K/Q5_K super-block, packed in 12 bytes.
fn k_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
    (sc, mn)
}

/// d, dmin (f16), 12 bytes of scales/mins, 128 bytes of nibbles: sub-block j (32 values) is
/// the low (j even) or high nibbles of bytes 32·(j/2)…, `d·sc_j · q − dmin·m_j`.
fn q4_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let (sc, mn) = k_scales(&b[4..16]);
    let qs = &b[16..144];
    for j in 0..8 {
        let (scale, min) = (d * f32::from(sc[j]), dmin * f32::from(mn[j]));
        let shift = 4 * (j % 2);
        for l in 0..32 {
            let q = (qs[32 * (j / 2) + l] >> shift) & 0x0F;
            out[32 * j + l] = scale * f32::from(q) - min;
        }
    }
}

/// Q4_K with a fifth bit: bit j of the 32 bytes `qh` is sub-block j's high bit.
fn q5_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let (sc, mn) = k_scales(&b[4..16]);
    let qh = &b[16..48];
    let qs = &b[48..176];
    for j in 0..8 {
        let (scale, min) = (d * f32::from(sc[j]), dmin * f32::from(mn[j]));
        let shift = 4 * (j % 2);
        for l in 0..32 {
            let low = (qs[32 * (j / 2) + l] >> shift) & 0x0F;
            let high = (qh[l] >> j) & 1;
            out[32 * j + l] = scale * f32::from(low | (high << 4)) - min;
        }
    }
}

/// 128 bytes of low nibbles, 64 of 2-bit highs, 16 i8 scales (one per 16 values), d (f16):
/// group g (32 values) of half h = g/4 takes nibble (g/2)%2 of `ql[64h + 32(g%2) + l]` and
/// bits 2(g%4) of `qh[32h + l]`; value `(d · scale) · (q − 32)`.
fn q6_k(b: &[u8], out: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half_at(b, 208);
    for g in 0..8 {
        let h = g / 4;
        for l in 0..32 {
            let low = (ql[64 * h + 32 * (g % 2) + l] >> (4 * ((g / 2) % 2))) & 0x0F;
            let high = (qh[32 * h + l] >> (2 * (g % 4))) & 0x03;
            let q = (low | (high << 4)) as i8 - 32;
            let e = 32 * g + l;
            out[e] = d * f32::from(scales[e / 16] as i8) * f32::from(q);
        }
    }
}
