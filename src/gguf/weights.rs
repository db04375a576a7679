//! A GGUF file as the source of a LLaMA model's weights: transformers' tensor names mapped to
//! llama.cpp's, llama.cpp's row permutation of the query and key projections undone, blocks
//! dequantized to f32 as gguf-py does.

use super::ggml_type::GgmlType;
use super::quants::{self, BlockMatrix};
use super::read::{GgufFile, TensorInfo};
use crate::model::frozen::FrozenLinear;
use crate::model::weights::{check_finite, WeightSource};
use crate::model::LlamaConfig;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// The weights of a GGUF model file.
pub struct GgufWeights {
    file: GgufFile,
    heads: usize,
    kv_heads: usize,
}

impl GgufWeights {
    /// Opens `path`, whose model has the shapes of `cfg`.
    pub fn open(path: &Path, cfg: &LlamaConfig) -> Result<Self> {
        Ok(Self {
            file: GgufFile::open(path)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
        })
    }

    /// The stored tensor behind transformers' name `name`, and the heads its rows are
    /// permuted by (the query and key projections).
    fn stored(&self, name: &str) -> Result<(&TensorInfo, Option<usize>)> {
        let Some(gguf_name) = gguf_name(name) else {
            bail!(
                "{}: no GGUF tensor corresponds to {name}",
                self.file.path().display()
            );
        };
        let t = self.file.require_tensor(&gguf_name)?;
        let heads = if gguf_name.ends_with(".attn_q.weight") {
            Some(self.heads)
        } else if gguf_name.ends_with(".attn_k.weight") {
            Some(self.kv_heads)
        } else {
            None
        };
        Ok((t, heads))
    }

    /// The stored bytes of `name` in transformers' row order, checked to have `shape`.
    fn rows(&self, name: &str, shape: &[usize]) -> Result<(&TensorInfo, Vec<u8>)> {
        let (t, heads) = self.stored(name)?;
        if t.shape() != shape {
            bail!(
                "{}: tensor {} has shape {:?}, the model's metadata implies {shape:?}",
                self.file.path().display(),
                t.name,
                t.shape()
            );
        }
        if !quants::supported(t.ggml_type) {
            bail!(
                "{}: tensor {} is {}; supported types: {}",
                self.file.path().display(),
                t.name,
                t.ggml_type,
                quants::SUPPORTED.map(|t| t.name()).join(", ")
            );
        }
        let bytes = self.file.read_bytes(t)?;
        Ok(match heads {
            Some(h) => (t, unpermute_rows(&bytes, shape[0], h)),
            None => (t, bytes),
        })
    }
}

/// llama.cpp's name for transformers' `name` (`model.layers.3.self_attn.q_proj.weight` →
/// `blk.3.attn_q.weight`).
pub fn gguf_name(name: &str) -> Option<String> {
    Some(match name {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let rest = name.strip_prefix("model.layers.")?;
            let (layer, module) = rest.split_once('.')?;
            layer.parse::<usize>().ok()?;
            let ours = match module {
                "input_layernorm.weight" => "attn_norm",
                "post_attention_layernorm.weight" => "ffn_norm",
                "self_attn.q_proj.weight" => "attn_q",
                "self_attn.k_proj.weight" => "attn_k",
                "self_attn.v_proj.weight" => "attn_v",
                "self_attn.o_proj.weight" => "attn_output",
                "mlp.gate_proj.weight" => "ffn_gate",
                "mlp.up_proj.weight" => "ffn_up",
                "mlp.down_proj.weight" => "ffn_down",
                _ => return None,
            };
            format!("blk.{layer}.{ours}.weight")
        }
    })
}

/// Bytes the block linears of `file` take once loaded on the CPU: quantized ones stay in their
/// blocks, float ones become `dtype_bytes` per weight (for the memory estimate).
pub fn block_linear_bytes(file: &GgufFile, dtype_bytes: usize) -> u64 {
    const LINEARS: [&str; 7] = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    file.tensors()
        .iter()
        .filter(|t| {
            t.name.strip_prefix("blk.").is_some_and(|rest| {
                rest.split_once('.')
                    .is_some_and(|(_, m)| LINEARS.iter().any(|l| m == format!("{l}.weight")))
            })
        })
        .map(|t| match t.ggml_type {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => t.elements() * dtype_bytes as u64,
            _ => t.byte_len(),
        })
        .sum()
}

/// Undoes llama.cpp's `LlamaModel.permute` of a query or key projection: within each of
/// `heads` heads of `d` rows, GGUF row `2i + j` is transformers' row `j·d/2 + i` (llama.cpp
/// interleaves the two rotary halves). Rows are whole blocks, so this works on quantized
/// bytes as on floats.
pub fn unpermute_rows(bytes: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    move_rows(bytes, rows, heads, |from_gguf, to_hf| (from_gguf, to_hf))
}

/// llama.cpp's `LlamaModel.permute` itself (transformers' row order to GGUF's), e.g. for the
/// rows of a LoRA B of `q_proj`/`k_proj` written to a GGUF adapter.
pub fn permute_rows(bytes: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    move_rows(bytes, rows, heads, |gguf, hf| (hf, gguf))
}

/// Copies row `from` to row `to` for each pair `pick(gguf_row, hf_row)` of the permutation.
fn move_rows(
    bytes: &[u8],
    rows: usize,
    heads: usize,
    pick: impl Fn(usize, usize) -> (usize, usize),
) -> Vec<u8> {
    let row_bytes = bytes.len() / rows;
    let half = rows / heads / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf = h * 2 * half + 2 * i + j;
                let hf = h * 2 * half + j * half + i;
                let (from, to) = pick(gguf, hf);
                out[to * row_bytes..(to + 1) * row_bytes]
                    .copy_from_slice(&bytes[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
    out
}

impl WeightSource for GgufWeights {
    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let (t, bytes) = self.rows(name, shape)?;
        let mut values = vec![0f32; t.elements() as usize];
        quants::dequantize(t.ggml_type, &bytes, &mut values)?;
        let tensor = Tensor::from_vec(values, shape, device)?;
        check_finite(&t.name, &tensor)?;
        Ok(tensor.to_dtype(dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|n| self.file.tensor(&n).is_some())
    }

    /// A quantized linear stays in its blocks (dequantized tile by tile in each product); a
    /// float one is read in `dtype`.
    fn get_linear(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<FrozenLinear> {
        let (t, _) = self.stored(name)?;
        if matches!(t.ggml_type, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            return Ok(FrozenLinear::new(self.get(name, shape, dtype, device)?));
        }
        let (t, bytes) = self.rows(name, shape)?;
        let blocks = BlockMatrix::new(t.ggml_type, shape[0], shape[1], bytes)?;
        if blocks.to_f32().iter().any(|v| !v.is_finite()) {
            bail!(
                "{}: tensor {} holds NaN or infinite values: the file is damaged",
                self.file.path().display(),
                t.name
            );
        }
        Ok(FrozenLinear::blocks(blocks, dtype, device)?)
    }

    /// On the CPU, a tensor in Q4_0, Q4_1 or Q8_0 (the types the fused product reads).
    fn get_decode_blocks(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Option<FrozenLinear>> {
        let (t, _) = self.stored(name)?;
        if !device.is_cpu()
            || !matches!(
                t.ggml_type,
                GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0
            )
        {
            return Ok(None);
        }
        let (t, bytes) = self.rows(name, shape)?;
        let blocks = BlockMatrix::new(t.ggml_type, shape[0], shape[1], bytes)?;
        Ok(Some(FrozenLinear::blocks(blocks, DType::F32, device)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's permute, as numpy writes it: `w.reshape(heads, 2, d/2, -1).swapaxes(1, 2)`
    /// sends transformers' row (h, j, i) to GGUF row (h, i, j).
    #[test]
    fn permute_is_llama_cpp_s_and_unpermute_undoes_it() {
        let (heads, d) = (3, 8);
        let rows = heads * d;
        let hf: Vec<u8> = (0..rows as u8).flat_map(|r| [r, 100 + r]).collect();
        let gguf = permute_rows(&hf, rows, heads);
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..d / 2 {
                    let (from, to) = (h * d + j * d / 2 + i, h * d + 2 * i + j);
                    assert_eq!(gguf[2 * to..2 * to + 2], hf[2 * from..2 * from + 2]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, rows, heads), hf);
    }
}
