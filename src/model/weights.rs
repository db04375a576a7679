//! Where the frozen base weights come from: safetensors files (single or sharded) or a seeded
//! random init for the built-in presets.

use super::bnb;
use super::frozen::FrozenLinear;
use super::nf4::{Absmax, NestedAbsmax, Nf4Tensor, BLOCK};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
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
    /// The block linear `name` (shape (out, in)) as a frozen layer computing in `dtype`, kept
    /// as stored where the source stores it quantized (a GGUF's ggml blocks); by default read
    /// in `dtype`.
    fn get_linear(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<FrozenLinear> {
        Ok(FrozenLinear::new(self.get(name, shape, dtype, device)?))
    }
    /// The tensor `name` (shape (out, in)) as a layer over its stored blocks, where the source
    /// keeps it in blocks that a decoding step's fused product reads in place (a GGUF's Q8_0
    /// embedding, the tied head: a quarter of the f32 bytes per token); by default `None`.
    fn get_decode_blocks(
        &self,
        _name: &str,
        _shape: &[usize],
        _device: &Device,
    ) -> Result<Option<FrozenLinear>> {
        Ok(None)
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

/// Refuses a tensor holding NaN or ±∞ (a damaged checkpoint, or one saved from a diverged
/// run). Sums of 1M-element slices in f32 are finite exactly when their elements are (f16 and
/// bf16 sums could overflow; a whole-tensor f32 copy would raise the loading peak).
pub fn check_finite(name: &str, t: &Tensor) -> Result<()> {
    const SLICE: usize = 1 << 20;
    let flat = t.flatten_all()?;
    let n = flat.elem_count();
    for start in (0..n).step_by(SLICE) {
        let part = flat.narrow(0, start, SLICE.min(n - start))?;
        let sum = part.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        if !sum.is_finite() {
            bail!(
                "tensor {name} holds NaN or infinite values: the checkpoint is damaged or comes \
                 from a diverged run"
            );
        }
    }
    Ok(())
}

/// Where one stored tensor lies.
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// Safetensors shards read tensor by tensor with positioned reads: only the tensor being
/// converted (or quantized) is in memory, never a mapped shard, so loading a 7B model peaks at
/// about the quantized model plus one full-precision linear.
pub struct SafetensorsWeights {
    files: Vec<(PathBuf, File)>,
    index: HashMap<String, Entry>,
}

fn st_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        _ => return None,
    })
}

/// Reads the header of one safetensors file into `index`.
fn index_file(
    path: &Path,
    file: &File,
    slot: usize,
    index: &mut HashMap<String, Entry>,
) -> Result<()> {
    let len = file.metadata()?.len();
    let mut n = [0u8; 8];
    file.read_exact_at(&mut n, 0)
        .with_context(|| format!("{}: too short for a safetensors file", path.display()))?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > 100 << 20 {
        bail!(
            "{}: not a safetensors file (header length {n}, file length {len})",
            path.display()
        );
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .with_context(|| format!("{}: safetensors header is not valid JSON", path.display()))?;
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype_name = info["dtype"].as_str().unwrap_or("?");
        let dtype = st_dtype(dtype_name).with_context(|| {
            format!(
                "{}: tensor {name} has unsupported dtype {dtype_name}",
                path.display()
            )
        })?;
        let shape: Vec<usize> = serde_json::from_value(info["shape"].clone())
            .with_context(|| format!("{}: tensor {name} has no valid shape", path.display()))?;
        let offsets: [u64; 2] =
            serde_json::from_value(info["data_offsets"].clone()).with_context(|| {
                format!(
                    "{}: tensor {name} has no valid data_offsets",
                    path.display()
                )
            })?;
        let (start, end) = (8 + n + offsets[0], 8 + n + offsets[1]);
        let expected = shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
        if offsets[1] < offsets[0] || end - start != expected {
            bail!(
                "{}: tensor {name} has {} bytes for shape {shape:?}",
                path.display(),
                end.saturating_sub(start)
            );
        }
        if end > len {
            bail!(
                "{}: truncated (tensor {name} ends at byte {end}, the file has {len}); download it again",
                path.display()
            );
        }
        index.insert(
            name,
            Entry {
                file: slot,
                dtype,
                shape,
                start,
                end,
            },
        );
    }
    Ok(())
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
        let mut opened = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (slot, path) in files.into_iter().enumerate() {
            let file =
                File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            index_file(&path, &file, slot, &mut index)?;
            opened.push((path, file));
        }
        Ok(Self {
            files: opened,
            index,
        })
    }

    /// Reads one stored tensor from its file.
    fn read(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        let Some(e) = self.index.get(name) else {
            return Ok(None);
        };
        let (path, file) = &self.files[e.file];
        let mut bytes = vec![0u8; (e.end - e.start) as usize];
        file.read_exact_at(&mut bytes, e.start)
            .with_context(|| format!("tensor {name}: cannot be read from {}", path.display()))?;
        Ok(Some(Tensor::from_raw_buffer(
            &bytes, e.dtype, &e.shape, device,
        )?))
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
        self.read(name, &Device::Cpu)
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
        let Some(t) = self.read(name, device)? else {
            bail!(
                "tensor {name} is missing from {}",
                self.files
                    .iter()
                    .map(|(f, _)| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        if t.dims() != shape {
            bail!(
                "tensor {name} has shape {:?} but config.json implies {shape:?}",
                t.dims()
            );
        }
        check_finite(name, &t)?;
        Ok(t.to_dtype(dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
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

/// Seeded random weights, as transformers' `_init_weights` (normal, std 0.02; norms 1), drawn
/// tensor after tensor in the order they are read.
pub struct RandomWeights {
    rng: RefCell<StdRng>,
    std: f64,
    /// Whether NF4 requests get codes drawn directly instead of the full-precision draw
    /// quantized: only for shapes too large to draw in full precision.
    direct_nf4: bool,
}

impl RandomWeights {
    /// Weights whose NF4 form is their full-precision draw quantized, so a model and its 4-bit
    /// copy are the same model.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: RefCell::new(StdRng::seed_from_u64(seed)),
            std: 0.02,
            direct_nf4: false,
        }
    }

    /// Weights whose NF4 form is drawn directly (see [`WeightSource::get_nf4`] below).
    pub fn drawn_in_nf4(seed: u64) -> Self {
        Self {
            direct_nf4: true,
            ..Self::new(seed)
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

    /// With `direct_nf4`, drawn directly in NF4, so a 7B-shaped model never exists in full
    /// precision: uniform codes (NF4's 16 bins are equiprobable for normal data) and block
    /// scales around the expected max |·| of 64 normals (≈ 2.4 std), so the weights have about
    /// the init's spread. Otherwise the full-precision draw, quantized.
    fn get_nf4(&self, name: &str, shape: &[usize], double_quant: bool) -> Result<Nf4Tensor> {
        if !self.direct_nf4 {
            return read_and_quantize(self, name, shape, double_quant);
        }
        let n: usize = shape.iter().product();
        if n % 2 != 0 {
            bail!("tensor {name}: random NF4 weights need an even element count, got {n}");
        }
        let mut rng = self.rng.borrow_mut();
        let mut packed = crate::model::nf4::code_buffer(n / 2);
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
