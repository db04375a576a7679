//! What every model command takes: the base model, the adapter, the tokenizer, dtype, storage and device.

use super::choices;
use crate::adapters::peft;
use crate::data::chat::{ChatEncoder, ChatFormat};
use crate::device::{ComputeDtype, DeviceSpec};
use crate::model::nf4::{Quantization, Storage};
use crate::source::{ModelSource, Origin};
use anyhow::Result;
use clap::Args;
use std::path::{Path, PathBuf};

/// Where a model's files come from.
#[derive(Args)]
pub struct ModelSpec {
    /// A preset (tiny, llama2-7b, …), a local transformers directory, a LLaMA GGUF file, or a
    /// Hub repo id (org/name).
    #[arg(long)]
    pub model: String,
    /// Hub revision: branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
}

/// The base model a command runs: where it comes from, its tokenizer and chat format, and how
/// it is held and computed.
#[derive(Args)]
pub struct BaseArgs {
    #[command(flatten)]
    pub spec: ModelSpec,
    /// Another tokenizer than the model's: a tokenizer.json, a GGUF file, a directory holding a
    /// tokenizer.json, a preset or a Hub repo id.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// How conversations and prompts become text: tulu (open-instruct's, what prolora trains
    /// in by default), model (the model's own chat template) or none (the plain text, for a
    /// base model).
    #[arg(long, default_value = "tulu", value_parser = choices::<ChatFormat>(ChatFormat::NAMES))]
    pub chat_format: ChatFormat,
    /// Compute dtype (auto: bf16 on a GPU, f32 on the CPU).
    #[arg(long, default_value = "auto", value_parser = choices::<ComputeDtype>(ComputeDtype::NAMES))]
    pub dtype: ComputeDtype,
    /// Storage of the block linears (none: as stored — a GGUF's quantized ones stay in their
    /// blocks; nf4: 4-bit, as bitsandbytes; quantized while loading).
    #[arg(long, default_value = "none", value_parser = choices::<Storage>(Storage::NAMES))]
    pub quantize: Storage,
    /// With --quantize nf4: also quantize the block scales (double quantization).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub double_quant: bool,
    /// Compute device: auto (CUDA when built with it and a GPU is present), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Decode a GGUF's Q4_0/Q4_1 linears as llama.cpp does, the activations rounded to 8 bits
    /// for integer dot products: faster on the CPU, but the logits move (no longer those of
    /// transformers' f32 computation) and near ties go either way.
    #[arg(long)]
    pub int8_activations: bool,
}

impl BaseArgs {
    /// Settings of the whole process that these arguments make.
    pub fn apply(&self) {
        crate::kernels::quant_gemv::use_int8_activations(self.int8_activations);
    }
}

/// The base model a command runs, and the adapter on it.
#[derive(Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pub base: BaseArgs,
    /// An adapter directory (adapter_config.json + adapter_model.safetensors), any method.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

/// The base model with the adapter (if any) attached, and its chat encoder.
pub(super) fn load_model(args: &ModelArgs) -> Result<(crate::model::Llama, ChatEncoder)> {
    load_model_from(
        &ModelSource::resolve(&args.base.spec.model, &args.base.spec.revision)?,
        args,
        &crate::device::open(args.base.device)?,
    )
}

/// The same from the already resolved `source`, on the already opened `device`.
pub(super) fn load_model_from(
    source: &ModelSource,
    args: &ModelArgs,
    device: &candle_core::Device,
) -> Result<(crate::model::Llama, ChatEncoder)> {
    let encoder = ChatEncoder::new(
        source.tokenizer(args.base.tokenizer.as_deref())?,
        args.base.chat_format,
    )?;
    encoder.check_fits(source.config.vocab_size)?;
    args.base.apply();
    let quant = Quantization::new(args.base.quantize, args.base.double_quant);
    let mut model = source.load_quantized(args.base.dtype.on(device), quant, device)?;
    if let Some(dir) = &args.adapter {
        peft::load_into(dir, &mut model)?;
    }
    Ok((model, encoder))
}

/// What a model command reads from disk: the model's directory, the adapter, a tokenizer file.
pub(super) fn model_inputs<'a>(source: &'a ModelSource, args: &'a ModelArgs) -> Vec<&'a Path> {
    let mut inputs = local_dirs(source);
    inputs.extend(args.adapter.as_deref());
    inputs.extend(
        args.base
            .tokenizer
            .as_deref()
            .map(Path::new)
            .filter(|t| t.exists()),
    );
    inputs
}

/// The local directories a model is read from (none for a preset).
pub(super) fn local_dirs(source: &ModelSource) -> Vec<&Path> {
    match &source.origin {
        Origin::Dir(dir) | Origin::Gguf(dir) => vec![dir.as_path()],
        Origin::Preset(_) => Vec::new(),
    }
}
