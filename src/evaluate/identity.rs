//! What an evaluation's results depend on: the model (its source and the sha256 of its files),
//! the adapter (its directory and the sha256 of its files), how the model is loaded (quantize,
//! double quant, dtype) and every evaluation option. A journal and a results file record it, so
//! completions or scores are never taken for another model's, adapter's or setting's.

use super::Options;
use crate::adapters::peft;
use crate::content_hash;
use crate::source::{ModelSource, Origin};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// `--model`: a preset's name, a Hub id, or a directory (resolved to an absolute path).
    pub model: String,
    /// The Hub commit a Hub model was loaded at.
    pub model_revision: Option<String>,
    /// sha256 of the `sha256sum` lines of the model directory's config.json and *.safetensors
    /// (sorted by name); none for a preset, whose weights the code makes.
    pub model_sha256: Option<String>,
    /// `--tokenizer`, when another than the model's.
    pub tokenizer: Option<String>,
    /// The adapter directory (absolute), its adapter_model.safetensors' sha256 and its
    /// adapter_config.json's (the scaling lives there).
    pub adapter: Option<PathBuf>,
    pub adapter_sha256: Option<String>,
    pub adapter_config_sha256: Option<String>,
    pub quantize: String,
    pub double_quant: bool,
    /// The compute dtype used (`auto` resolved on the device).
    pub dtype: String,
    /// Every field of [`Options`] (the data directory absolute) but the batch size: a batch
    /// gives each prompt the tokens it would get alone, and a rerun after running out of memory
    /// must be able to lower it.
    pub options: Value,
}

/// How the model is loaded, as the command line gives it.
pub struct Loading<'a> {
    pub source: &'a ModelSource,
    pub tokenizer: Option<&'a str>,
    pub adapter: Option<&'a Path>,
    pub quantize: &'a str,
    pub double_quant: bool,
    pub dtype: candle_core::DType,
}

impl Identity {
    /// Hashes the model's and the adapter's files (remembered across runs, see
    /// [`content_hash`]).
    pub fn new(loading: &Loading, options: &Options) -> Result<Self> {
        let (model, model_sha256) = match &loading.source.origin {
            Origin::Preset(name) => (name.clone(), None),
            Origin::Dir(dir) => {
                let shown = match &loading.source.repo_id {
                    Some(id) => id.clone(),
                    None => absolute(dir).display().to_string(),
                };
                (shown, Some(model_sha256(dir)?))
            }
            Origin::Gguf(path) => (
                absolute(path).display().to_string(),
                Some(content_hash::sha256(path)?),
            ),
        };
        let model_revision = match (&loading.source.repo_id, &loading.source.origin) {
            // A Hub model is loaded from its snapshot directory, named by the commit.
            (Some(_), Origin::Dir(dir)) => {
                dir.file_name().map(|c| c.to_string_lossy().into_owned())
            }
            _ => None,
        };
        let adapter_file = |name: &str| -> Result<Option<String>> {
            loading
                .adapter
                .map(|dir| content_hash::sha256(&dir.join(name)))
                .transpose()
        };
        let mut options = serde_json::to_value(options)?;
        if let Value::Object(o) = &mut options {
            o.remove("batch_size");
            if let Some(dir) = o.get("data_dir").and_then(Value::as_str) {
                let dir = absolute(Path::new(dir));
                o.insert("data_dir".into(), Value::String(dir.display().to_string()));
            }
        }
        Ok(Identity {
            model,
            model_revision,
            model_sha256,
            tokenizer: loading.tokenizer.map(String::from),
            adapter: loading.adapter.map(absolute),
            adapter_sha256: adapter_file(peft::WEIGHTS_FILE)?,
            adapter_config_sha256: adapter_file(peft::CONFIG_FILE)?,
            quantize: loading.quantize.to_string(),
            double_quant: loading.double_quant,
            dtype: loading.dtype.as_str().to_string(),
            options,
        })
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("an identity serializes")
    }

    /// The first field where `recorded` (another run's identity) differs from this one, as
    /// `field: recorded value → this value`; None when they are the same.
    pub fn difference(&self, recorded: &Value) -> Option<String> {
        first_difference(&self.to_value(), recorded, "")
    }

    /// Records this identity in a benchmark's results: whole under `identity` (what a later
    /// run compares), and each field but the options (already there) under `settings`.
    pub fn record(&self, result: &mut Value) {
        let identity = self.to_value();
        if let (Value::Object(fields), Value::Object(settings)) =
            (&identity, &mut result["settings"])
        {
            for (k, v) in fields.iter().filter(|(k, _)| *k != "options") {
                settings.insert(k.clone(), v.clone());
            }
        }
        result["identity"] = identity;
    }

    /// Whether the results file `path` holds results of this same evaluation.
    pub fn is_recorded_in(&self, path: &Path) -> bool {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .is_some_and(|v| self.difference(&v["identity"]).is_none())
    }
}

fn first_difference(now: &Value, then: &Value, at: &str) -> Option<String> {
    match (now, then) {
        (Value::Object(n), Value::Object(t)) => n.keys().chain(t.keys()).find_map(|k| {
            let key = if at.is_empty() {
                k.clone()
            } else {
                format!("{at}.{k}")
            };
            let null = Value::Null;
            first_difference(n.get(k).unwrap_or(&null), t.get(k).unwrap_or(&null), &key)
        }),
        _ if now == then => None,
        _ if at.is_empty() => Some("no identity recorded (made by an older prolora)".into()),
        _ => Some(format!("{at}: {then} → {now}")),
    }
}

/// sha256 of `sha256sum`'s lines for config.json and every *.safetensors in `dir`, sorted by
/// name: `cd DIR && sha256sum $(ls config.json *.safetensors | sort) | sha256sum` gives it.
fn model_sha256(dir: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n == "config.json" || n.ends_with(".safetensors"))
        .collect();
    names.sort();
    let mut lines = String::new();
    for name in &names {
        lines.push_str(&format!(
            "{}  {name}\n",
            content_hash::sha256(&dir.join(name))?
        ));
    }
    Ok(format!("{:x}", Sha256::digest(lines.as_bytes())))
}

/// `path` absolute with links resolved (as given when it cannot be).
fn absolute(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}
