//! The run config: TOML with every knob, unknown keys rejected by name, `key=value` overrides.

use crate::adapters::AdapterConfig;
use crate::choice::named_enum;
use crate::data::batch::Order;
use crate::data::chat::ChatFormat;
use crate::device::{ComputeDtype, DeviceSpec};
use crate::model::nf4::{Quantization, Storage};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Seeds the adapter init, dropout and data order.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Where the run directory is written.
    pub output_dir: String,
    /// `auto` (a CUDA GPU when built with CUDA and one is present, else the CPU), `cpu`,
    /// `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: DeviceSpec,
    pub model: ModelConfig,
    #[serde(default)]
    pub adapter: AdapterConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    pub train: TrainConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A built-in preset (`tiny`), a local directory, a LLaMA GGUF file, or a Hugging Face Hub
    /// repo id.
    pub source: String,
    /// Hub revision (branch, tag or commit).
    #[serde(default = "default_revision")]
    pub revision: String,
    /// Another tokenizer than the model's own: a tokenizer.json, a directory holding one, a
    /// preset or a Hub repo id.
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// Compute dtype of the frozen base: `auto` (bf16 on a GPU, f32 on the CPU), `f32`, `bf16`,
    /// `f16`. Also accepted as
    /// `compute_dtype` (the name the 4-bit options go with).
    #[serde(default = "default_dtype", alias = "compute_dtype")]
    pub dtype: ComputeDtype,
    /// Storage of the seven linears of each block: `"none"` (the compute dtype) or `"nf4"`
    /// (4-bit NormalFloat, as bitsandbytes; quantized while loading).
    #[serde(default = "default_quantize")]
    pub quantize: Storage,
    /// With `quantize = "nf4"`: also quantize the block scales (the paper's setting).
    #[serde(default = "default_true")]
    pub double_quant: bool,
}

impl ModelConfig {
    /// The storage `quantize` and `double_quant` ask for.
    pub fn quantization(&self) -> Quantization {
        Quantization::new(self.quantize, self.double_quant)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `{"messages": [...]}` jsonl.
    pub train: String,
    /// Optional held-out jsonl, evaluated every `train.eval_every` steps and at the end.
    #[serde(default)]
    pub eval: Option<String>,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// `length_grouped` (HF's group_by_length, the paper's), `shuffle` (a seeded permutation
    /// each epoch) or `file` (strict file order, for parity checks against another trainer).
    #[serde(default = "default_order")]
    pub order: Order,
    /// Hold out this many `train` examples as the eval set (the paper: 1024); excludes `eval`.
    #[serde(default)]
    pub eval_size: usize,
    /// Seed of the held-out split (the paper: 42).
    #[serde(default = "default_eval_seed")]
    pub eval_seed: u64,
    /// Skip, count and report bad lines instead of stopping at the first one.
    #[serde(default)]
    pub skip_invalid: bool,
    /// Cache tokenized data (in `$PROLORA_CACHE`, else `~/.cache/prolora/tokenized`).
    #[serde(default = "default_true")]
    pub cache: bool,
    /// How conversations become text: `tulu` (open-instruct's, the paper's), `model` (the
    /// model's own chat template) or `none` (the texts alone, for a base model).
    #[serde(default = "default_chat_format")]
    pub chat_format: ChatFormat,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Global-norm clipping threshold; 0 turns clipping off.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    #[serde(default = "default_warmup_ratio")]
    pub warmup_ratio: f64,
}

named_enum! {
/// What a non-finite loss or gradient does (`train.on_nonfinite`).
pub enum OnNonFinite {
    /// Stop with the step number, keeping the last checkpoint.
    Stop = "stop",
    /// Skip the step and go on.
    Skip = "skip",
}
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per optimizer step.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Examples per forward/backward pass; gradients of `batch_size / micro_batch_size` passes
    /// are accumulated (default: the whole batch at once).
    #[serde(default)]
    pub micro_batch_size: Option<usize>,
    /// Recompute each decoder layer in backward instead of keeping its activations.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Write a checkpoint every this many steps (0: only at the end); by default every 5 % of
    /// the run, so a crash loses at most that.
    #[serde(default)]
    pub save_every: Option<usize>,
    /// Checkpoints kept on disk (older ones are removed after a newer one is complete).
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// On a non-finite loss or gradient: `stop` (keeping the last checkpoint) or `skip` the step.
    #[serde(default = "default_on_nonfinite")]
    pub on_nonfinite: OnNonFinite,
    /// Write a metrics line every this many steps.
    #[serde(default = "default_one")]
    pub log_every: usize,
    /// Evaluate on `data.eval` every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: usize,
    /// Refuse a run whose memory estimate exceeds what the machine (or GPU) has.
    #[serde(default = "default_true")]
    pub check_memory: bool,
}

fn default_seed() -> u64 {
    1
}
fn default_device() -> DeviceSpec {
    DeviceSpec::Auto
}
fn default_revision() -> String {
    "main".into()
}
fn default_dtype() -> ComputeDtype {
    ComputeDtype::Auto
}
fn default_quantize() -> Storage {
    Storage::None
}
fn default_true() -> bool {
    true
}
fn default_chat_format() -> ChatFormat {
    ChatFormat::Tulu
}
fn default_max_seq_len() -> usize {
    512
}
fn default_eval_seed() -> u64 {
    42
}
fn default_lr() -> f64 {
    2e-4
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_max_grad_norm() -> f64 {
    0.3
}
fn default_warmup_ratio() -> f64 {
    0.03
}
fn default_batch_size() -> usize {
    16
}
fn default_one() -> usize {
    1
}
fn default_order() -> Order {
    Order::LengthGrouped
}
fn default_keep_last() -> usize {
    2
}
fn default_on_nonfinite() -> OnNonFinite {
    OnNonFinite::Stop
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: default_lr(),
            weight_decay: 0.0,
            betas: default_betas(),
            eps: default_eps(),
            max_grad_norm: default_max_grad_norm(),
            warmup_ratio: default_warmup_ratio(),
        }
    }
}

impl OptimConfig {
    /// The ranges `torch.optim.AdamW` and `clip_grad_norm_` accept, and a finite schedule.
    fn validate(&self) -> Result<()> {
        let [beta1, beta2] = self.betas;
        for (key, value, ok, range) in [
            ("optim.lr", self.lr, self.lr >= 0.0, "≥ 0"),
            ("optim.eps", self.eps, self.eps >= 0.0, "≥ 0"),
            (
                "optim.weight_decay",
                self.weight_decay,
                self.weight_decay >= 0.0,
                "≥ 0",
            ),
            (
                "optim.betas[0]",
                beta1,
                (0.0..1.0).contains(&beta1),
                "in [0, 1)",
            ),
            (
                "optim.betas[1]",
                beta2,
                (0.0..1.0).contains(&beta2),
                "in [0, 1)",
            ),
            (
                "optim.max_grad_norm",
                self.max_grad_norm,
                self.max_grad_norm >= 0.0,
                "≥ 0 (0 turns clipping off)",
            ),
        ] {
            if !(ok && value.is_finite()) {
                bail!("{key} = {value} must be finite and {range}, as PyTorch requires");
            }
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            bail!("optim.warmup_ratio must be in [0, 1)");
        }
        Ok(())
    }
}

impl TrainConfig {
    /// The checkpoint period: `save_every`, by default a twentieth of the run.
    pub fn save_every(&self) -> usize {
        self.save_every.unwrap_or(self.steps.div_ceil(20))
    }

    pub fn micro_batch_size(&self) -> usize {
        self.micro_batch_size.unwrap_or(self.batch_size)
    }

    /// Micro-batches accumulated per optimizer step.
    pub fn grad_accum(&self) -> usize {
        self.batch_size / self.micro_batch_size().max(1)
    }
}

impl RunConfig {
    /// Reads `path` and applies `key=value` overrides (dotted keys, TOML values; a bare word is
    /// taken as a string).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let cfg: RunConfig = if overrides.is_empty() {
            // Straight from the text, so an error points at its line.
            toml::from_str(&text).map_err(|e| located(path, &text, &e))?
        } else {
            let mut table: toml::Table =
                toml::from_str(&text).map_err(|e| located(path, &text, &e))?;
            for o in overrides {
                apply_override(&mut table, o)?;
            }
            // Re-parse the merged table as text so the error can name the key it is about.
            let merged = toml::to_string(&table)?;
            toml::from_str(&merged).map_err(|e| {
                let key = e
                    .span()
                    .map(|s| key_at(&merged, s.start))
                    .unwrap_or_default();
                anyhow::anyhow!(
                    "{} (with --set overrides): {key}{}",
                    path.display(),
                    e.message()
                )
            })?
        };
        cfg.validate()?;
        Ok(cfg.with_absolute_paths())
    }

    /// Every local path made absolute (against the working directory, where relative paths are
    /// meant), so the run's config.toml resumes from anywhere. Presets and Hub ids stay.
    fn with_absolute_paths(mut self) -> Self {
        let absolute = |p: &mut String| {
            if let Ok(a) = std::path::absolute(Path::new(p.as_str())) {
                *p = a.display().to_string();
            }
        };
        absolute(&mut self.output_dir);
        absolute(&mut self.data.train);
        self.data.eval.as_mut().map(absolute);
        self.adapter.init_from.as_mut().map(absolute);
        let local = |p: &str| crate::model::preset::preset(p).is_none() && Path::new(p).exists();
        if local(&self.model.source) {
            absolute(&mut self.model.source);
        }
        if let Some(t) = self.model.tokenizer.as_mut().filter(|t| local(t)) {
            absolute(t);
        }
        self
    }

    pub fn validate(&self) -> Result<()> {
        self.adapter.validate()?;
        if self.output_dir.trim().is_empty() {
            bail!("output_dir is empty: name the run directory, e.g. output_dir = \"runs/my-run\"");
        }
        self.optim.validate()?;
        if self.train.steps == 0 {
            bail!("train.steps must be at least 1");
        }
        if self.train.batch_size == 0 {
            bail!("train.batch_size must be at least 1");
        }
        if self.train.keep_last == 0 {
            bail!("train.keep_last must be at least 1: the newest checkpoint is what --resume continues from");
        }
        if self.train.log_every == 0 {
            bail!("train.log_every must be at least 1 (metrics every this many steps)");
        }
        let micro = self.train.micro_batch_size();
        if micro == 0 || !self.train.batch_size.is_multiple_of(micro) {
            bail!(
                "train.micro_batch_size = {micro} must divide train.batch_size = {}",
                self.train.batch_size
            );
        }
        if self.data.eval_size > 0 && self.data.eval.is_some() {
            bail!("data.eval and data.eval_size are both set; keep one of them");
        }
        if self.data.max_seq_len < 2 {
            bail!("data.max_seq_len must be at least 2");
        }
        Ok(())
    }

    /// The resolved config as TOML, for the run directory.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// The first dotted key whose value differs from `other` (output_dir and device aside: a
    /// run may continue on another machine), if any.
    pub fn first_difference(&self, other: &RunConfig) -> Option<String> {
        fn walk(prefix: &str, a: &toml::Value, b: &toml::Value) -> Option<String> {
            match (a, b) {
                (toml::Value::Table(ta), toml::Value::Table(tb)) => {
                    let mut keys: Vec<&String> = ta.keys().chain(tb.keys()).collect();
                    keys.sort();
                    keys.dedup();
                    keys.into_iter().find_map(|k| {
                        let path = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        match (ta.get(k), tb.get(k)) {
                            (Some(x), Some(y)) => walk(&path, x, y),
                            _ => Some(path),
                        }
                    })
                }
                _ => (a != b).then(|| prefix.to_string()),
            }
        }
        let as_value = |c: &RunConfig| {
            let mut c = c.clone();
            c.output_dir.clear();
            c.device = DeviceSpec::Auto;
            toml::Value::try_from(c).ok()
        };
        walk("", &as_value(self)?, &as_value(other)?)
    }
}

/// Sets `a.b.c = value` in `table`; the key must name a known section path (typos are caught
/// by the struct's unknown-field check afterwards).
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .with_context(|| format!("--set {assignment:?}: expected key=value, e.g. optim.lr=1e-4"))?;
    let key = key.trim();
    let raw = raw.trim();
    // A TOML value if it parses as one (numbers, booleans, arrays, quoted strings), else a string.
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set {assignment:?}: empty key segment");
    }
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .with_context(|| format!("--set {key}: `{p}` is a value, not a section"))?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// The dotted key (`train.steps: `) of the line holding byte `offset` of a TOML text.
fn key_at(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let Some((key, _)) = line.split_once('=') else {
        return String::new();
    };
    let section = before[..line_start]
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix('[').and_then(|l| l.strip_suffix(']')))
        .map(|s| format!("{s}."))
        .unwrap_or_default();
    format!("{section}{}: ", key.trim())
}

/// `file:line:column: message` for a TOML error.
fn located(path: &Path, text: &str, e: &toml::de::Error) -> anyhow::Error {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            let key = key_at(text, span.start);
            anyhow::anyhow!("{}:{line}:{col}: {key}{}", path.display(), e.message())
        }
        None => anyhow::anyhow!("{}: {}", path.display(), e.message()),
    }
}
