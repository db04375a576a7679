//! Where a model comes from: a built-in preset, a local directory, a GGUF file, or a Hub repo
//! id (resolved to its directory in the standard Hugging Face cache).

use crate::gguf;
use crate::gguf::weights::GgufWeights;
use crate::hub;
use crate::model::nf4::Quantization;
use crate::model::preset::{self, LLAMA2_TOKENIZER_JSON};
use crate::model::weights::{RandomWeights, SafetensorsWeights, WeightSource};
use crate::model::{Llama, LlamaConfig};
use crate::tokenizer::ModelTokenizer;
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// Base weights of a preset are fixed, like a downloaded checkpoint: the run seed only touches
/// the adapters and the data order.
const PRESET_WEIGHT_SEED: u64 = 0;

pub enum Origin {
    Preset(String),
    Dir(PathBuf),
    /// A llama.cpp model file: config, weights and tokenizer all inside.
    Gguf(PathBuf),
}

/// A model whose config is known and whose weights can be loaded.
pub struct ModelSource {
    pub origin: Origin,
    pub config: LlamaConfig,
    /// The Hub id the directory was downloaded for: what adapters record as their base.
    pub repo_id: Option<String>,
}

impl ModelSource {
    /// Resolves `spec`: a preset name, an existing directory, a GGUF file, or `org/name` on
    /// the Hub.
    pub fn resolve(spec: &str, revision: &str) -> Result<Self> {
        if let Some(config) = preset::preset(spec) {
            return Ok(Self {
                origin: Origin::Preset(spec.to_string()),
                config,
                repo_id: None,
            });
        }
        let path = Path::new(spec);
        if names_gguf(spec) && !path.exists() {
            bail!("model {spec}: no such GGUF file");
        }
        if gguf::is_gguf(path) {
            let config = gguf::config::llama_config(&gguf::GgufFile::open(path)?)?;
            return Ok(Self {
                origin: Origin::Gguf(path.to_path_buf()),
                config,
                repo_id: None,
            });
        }
        let mut repo_id = None;
        let dir = if path.is_dir() {
            path.to_path_buf()
        } else if path.exists() {
            bail!("model {spec}: is a file but not a GGUF one; pass a .gguf file or the directory that holds config.json and the safetensors weights");
        } else if hub::looks_like_repo_id(spec) {
            repo_id = Some(spec.to_string());
            hub::fetch_model(spec, revision, &hub::HubOptions::from_env()?)?
        } else {
            bail!(
                "model {spec}: no such directory, not a preset ({}) and not a Hub repo id (org/name)",
                preset::PRESETS.join(", ")
            );
        };
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            bail!(
                "{}: no config.json (is this a transformers model directory?)",
                dir.display()
            );
        }
        Ok(Self {
            config: LlamaConfig::from_file(&config_path)?,
            origin: Origin::Dir(dir),
            repo_id,
        })
    }

    /// Only the shapes of `spec` (a preset, a directory, or a Hub id — for which only
    /// config.json is fetched), and a name for reports.
    pub fn resolve_shapes(spec: &str, revision: &str) -> Result<(String, LlamaConfig)> {
        if preset::preset(spec).is_some()
            || Path::new(spec).exists()
            || names_gguf(spec)
            || !hub::looks_like_repo_id(spec)
        {
            let source = Self::resolve(spec, revision)?;
            return Ok((source.name(), source.config));
        }
        let config = hub::fetch_config(spec, revision, &hub::HubOptions::from_env()?)?;
        Ok((spec.to_string(), LlamaConfig::from_file(&config)?))
    }

    /// Loads the frozen base model in `dtype`.
    pub fn load(&self, dtype: DType, device: &Device) -> Result<Llama> {
        self.load_quantized(dtype, Quantization::None, device)
    }

    /// Loads the frozen base model with its block linears stored as `quant` says; `dtype` is
    /// the compute dtype.
    pub fn load_quantized(
        &self,
        dtype: DType,
        quant: Quantization,
        device: &Device,
    ) -> Result<Llama> {
        if let Origin::Preset(name) = &self.origin {
            if !preset::has_weights(name, quant) {
                bail!(
                    "preset {name} has random weights in 4 bits only (a full-precision copy \
                     would not fit): add --quantize nf4 (model.quantize = \"nf4\"), or use a \
                     checkpoint directory or Hub id"
                );
            }
        }
        Llama::load_quantized(&self.config, &*self.weights()?, dtype, quant, device)
    }

    /// Where the base weights come from: the checkpoint, or a preset's seeded random init.
    pub fn weights(&self) -> Result<Box<dyn WeightSource>> {
        Ok(match &self.origin {
            Origin::Preset(name) if preset::has_weights(name, Quantization::None) => {
                Box::new(RandomWeights::new(PRESET_WEIGHT_SEED))
            }
            Origin::Preset(_) => Box::new(RandomWeights::drawn_in_nf4(PRESET_WEIGHT_SEED)),
            Origin::Dir(dir) => Box::new(SafetensorsWeights::from_dir(dir)?),
            Origin::Gguf(path) => Box::new(GgufWeights::open(path, &self.config)?),
        })
    }

    /// The model's tokenizer and its special tokens, or the one `spec` names (see
    /// [`tokenizer`]) when given.
    pub fn tokenizer(&self, spec: Option<&str>) -> Result<ModelTokenizer> {
        if let Some(spec) = spec {
            return tokenizer(spec, "main");
        }
        match &self.origin {
            Origin::Preset(name) => ModelTokenizer::from_builtin(
                LLAMA2_TOKENIZER_JSON,
                self.config.bos_token_id,
                self.config.eos_token_id,
                &format!("the {name} preset's tokenizer"),
            ),
            Origin::Dir(dir) => ModelTokenizer::from_dir(dir),
            Origin::Gguf(path) => ModelTokenizer::from_gguf(path),
        }
    }

    /// A short name for logs and adapter_config.json: the Hub id for a downloaded model,
    /// so an adapter names a base any machine can fetch.
    pub fn name(&self) -> String {
        if let Some(id) = &self.repo_id {
            return id.clone();
        }
        match &self.origin {
            Origin::Preset(n) => n.clone(),
            Origin::Dir(d) | Origin::Gguf(d) => d.display().to_string(),
        }
    }
}

/// Whether `spec` is named like a GGUF file (so never taken for a Hub id).
fn names_gguf(spec: &str) -> bool {
    Path::new(spec)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// What `--tokenizer` (and `model.tokenizer`) names: a tokenizer.json (with the files beside
/// it), a GGUF file, a directory holding a tokenizer.json, or a model (a preset or a Hub repo
/// id) whose tokenizer to use.
pub fn tokenizer(spec: &str, revision: &str) -> Result<ModelTokenizer> {
    let path = Path::new(spec);
    if gguf::is_gguf(path) {
        return ModelTokenizer::from_gguf(path);
    }
    if path.is_file() {
        return ModelTokenizer::from_file(path);
    }
    if path.join("tokenizer.json").is_file() {
        return ModelTokenizer::from_dir(path);
    }
    ModelSource::resolve(spec, revision)?.tokenizer(None)
}

/// `f32`, `bf16`, `f16` or `f64`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        "f64" | "float64" => DType::F64,
        other => bail!("unknown dtype {other:?} (use auto, f32, bf16, f16 or f64)"),
    })
}
