//! `prolora export`: an adapter as a plain PEFT LoRA or a llama.cpp GGUF LoRA.

use super::model::local_dirs;
use super::{choices, report_written};
use crate::adapters::peft;
use crate::atomic;
use crate::choice::named_enum;
use crate::source::ModelSource;
use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use std::path::{Path, PathBuf};

named_enum! {
/// What `prolora export` writes.
pub enum ExportFormat {
    /// A plain PEFT LoRA of the equivalent rank.
    PeftLora = "peft-lora",
    /// llama.cpp's GGUF LoRA (`llama-server --lora`, ollama's `ADAPTER`) of the same rank.
    GgufLora = "gguf-lora",
}
}

#[derive(Args)]
pub struct ExportArgs {
    /// The adapter directory (any method).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output format.
    #[arg(long, default_value = "peft-lora", value_parser = choices::<ExportFormat>(ExportFormat::NAMES))]
    pub format: ExportFormat,
    /// Where to write the adapter: a directory (peft-lora) or a .gguf file (gguf-lora).
    #[arg(long)]
    pub out: PathBuf,
    /// The base model (for its shapes); default: the adapter's base_model_name_or_path.
    #[arg(long)]
    pub model: Option<String>,
    /// Hub revision of --model: branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Print one JSON object (what was written) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Replace an existing output (built beside it, swapped in at the end).
    #[arg(long)]
    pub overwrite: bool,
}

pub(super) fn run(args: ExportArgs) -> Result<()> {
    let model = base_of(&args.model, &args.adapter)?;
    let source = ModelSource::resolve(&model, &args.revision)?;
    let mut inputs = local_dirs(&source);
    inputs.push(&args.adapter);
    atomic::check_output(&args.out, "--out", &inputs, args.overwrite)?;
    match args.format {
        ExportFormat::PeftLora => {
            crate::export::export_peft_lora(&args.adapter, &source.config, &model, &args.out)?
        }
        ExportFormat::GgufLora => {
            crate::export::export_gguf_lora(&args.adapter, &source.config, &args.out)?
        }
    }
    report_written(
        args.json,
        format!("{} adapter written to {}", args.format, args.out.display()),
        json!({"out": args.out, "format": args.format}),
    );
    Ok(())
}

/// The base model an adapter was trained on: `--model`, else its recorded base.
pub(super) fn base_of(model: &Option<String>, adapter: &Path) -> Result<String> {
    match model.clone().or_else(|| peft::base_model_of(adapter)) {
        Some(m) => Ok(m),
        None => bail!(
            "{}: no base_model_name_or_path in adapter_config.json; pass --model",
            adapter.display()
        ),
    }
}
