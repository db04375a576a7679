//! Where the frozen base weights come from: safetensors files (single or sharded) or a seeded
//! random init for the built-in presets.

use super::bnb;
use super::nf4::{Absmax, NestedAbsmax, Nf4Tensor, BLOCK};
use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::cell::RefCell;
use std::path::{Path, PathBuf};

/// A provider of named base tensors.
pub trait WeightSource {
    /// The tensor `name` with exactly `shape`, converted to `dtype` on `device`.
    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;
    /// Whether the checkpoint has this tensor (e.g. `lm_head.weight` of a tied model).
    fn contains(&self, name: &str) -> bool;
    /// The tensor `name` in NF4. By default it is read in f32 and quantized at once, so only one
    /// full-precision linear exists at a time.
    fn get_nf4(&self, name: &str, shape: &[usize], double_quant: bool) -> Result<Nf4Tensor> {
        read_and_quantize(self, name, shape, double_quant)
    }
}

fn read_and_quantize(
    weights: &(impl WeightSource + ?Sized),
    name: &str,
    shape: &[usize],
    double_quant: bool,
) -> Result<Nf4Tensor> {
    let values: Vec<f32> = weights
        .get(name, shape, DType::F32, &Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    Nf4Tensor::quantize(name, &values, shape, double_quant)
}

/// Memory-mapped safetensors: each tensor is read (and converted) only when asked for, so
/// loading never holds a second full-precision copy of a shard.
pub struct SafetensorsWeights {
    files: Vec<PathBuf>,
    tensors: MmapedSafetensors,
}

impl SafetensorsWeights {
    /// The weights of a model directory: `model.safetensors`, or the shards that
    /// `model.safetensors.index.json` names.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files = if index.exists() {
            shard_files(&index)?
        } else if single.exists() {
            vec![single]
        } else {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json (only safetensors \
                 weights are supported; convert .bin checkpoints with transformers' save_pretrained)",
                dir.display()
            );
        };
        for f in &files {
            if !f.exists() {
                bail!("{}: weight shard is missing", f.display());
            }
        }
        // SAFETY: the files are only read; as with every mmap, they must not be truncated
        // while we run.
        let tensors = unsafe { MmapedSafetensors::multi(&files) }
            .with_context(|| format!("cannot read safetensors in {}", dir.display()))?;
        Ok(Self { files, tensors })
    }
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: no \"weight_map\" object", index.display()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for v in map.values() {
        let name = v.as_str().with_context(|| {
            format!("{}: weight_map values must be file names", index.display())
        })?;
        let path = dir.join(name);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    Ok(files)
}

impl SafetensorsWeights {
    /// A stored tensor, or None when the checkpoint has no such key.
    fn load_opt(&self, name: &str) -> Result<Option<Tensor>> {
        if !self.contains(name) {
            return Ok(None);
        }
        Ok(Some(self.tensors.load(name, &Device::Cpu).with_context(
            || format!("tensor {name}: cannot be read (corrupt checkpoint?)"),
        )?))
    }

    /// `name` as stored by bitsandbytes in 4 bits, if it is.
    fn prequantized(&self, name: &str, shape: &[usize]) -> Result<Option<Nf4Tensor>> {
        if !self.contains(&bnb::quant_state_key(name)) {
            return Ok(None);
        }
        Ok(Some(bnb::read(name, shape, &|k| self.load_opt(k))?))
    }
}

impl WeightSource for SafetensorsWeights {
    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        // A 4-bit checkpoint loaded without quantization: its dequantized weights.
        if let Some(q) = self.prequantized(name, shape)? {
            return Ok(q.to_tensor(dtype, device)?);
        }
        let t = self.tensors.load(name, device).with_context(|| {
            format!(
                "tensor {name} is missing from {}",
                self.files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        if t.dims() != shape {
            bail!(
                "tensor {name} has shape {:?} but config.json implies {shape:?}",
                t.dims()
            );
        }
        Ok(t.to_dtype(dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.get(name).is_ok()
    }

    /// Pre-quantized bitsandbytes weights are taken as stored (their own double-quant setting);
    /// the rest is quantized as it is read.
    fn get_nf4(&self, name: &str, shape: &[usize], double_quant: bool) -> Result<Nf4Tensor> {
        if let Some(q) = self.prequantized(name, shape)? {
            return Ok(q);
        }
        read_and_quantize(self, name, shape, double_quant)
    }
}

/// Seeded random weights, as transformers' `_init_weights` (normal, std 0.02; norms 1).
pub struct RandomWeights {
    rng: RefCell<StdRng>,
    std: f64,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: RefCell::new(StdRng::seed_from_u64(seed)),
            std: 0.02,
        }
    }
}

impl WeightSource for RandomWeights {
    fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, DType::F32, device)?
        } else {
            let normal = Normal::new(0.0f32, self.std as f32)?;
            let mut rng = self.rng.borrow_mut();
            let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut *rng)).collect();
            Tensor::from_vec(v, shape, device)?
        };
        Ok(t.to_dtype(dtype)?)
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }

    /// Drawn directly in NF4, so a 7B-shaped model never exists in full precision: uniform
    /// codes (NF4's 16 bins are equiprobable for normal data) and block scales around the
    /// expected max |·| of 64 normals (≈ 2.4 std), so the weights have about the init's spread.
    fn get_nf4(&self, name: &str, shape: &[usize], double_quant: bool) -> Result<Nf4Tensor> {
        let n: usize = shape.iter().product();
        if n % 2 != 0 {
            bail!("tensor {name}: random NF4 weights need an even element count, got {n}");
        }
        let mut rng = self.rng.borrow_mut();
        let mut packed = vec![0u8; n / 2];
        rng.fill_bytes(&mut packed);
        let std = self.std as f32;
        let absmax: Vec<f32> = (0..n.div_ceil(BLOCK))
            .map(|_| std * rng.random_range(2.0f32..2.8))
            .collect();
        let absmax = if double_quant {
            Absmax::Double(NestedAbsmax::quantize(&absmax))
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Nf4Tensor {
            shape: shape.to_vec(),
            packed,
            absmax,
        })
    }
}
