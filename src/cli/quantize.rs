//! `prolora quantize`: a model with NF4 block linears in bitsandbytes' layout.

use super::model::{local_dirs, ModelSpec};
use super::report_written;
use crate::atomic;
use crate::source::ModelSource;
use anyhow::Result;
use clap::Args;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args)]
pub struct QuantizeArgs {
    #[command(flatten)]
    pub model: ModelSpec,
    /// The output directory (model.safetensors, config.json, tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
    /// Also quantize the block scales (double quantization).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub double_quant: bool,
    /// Print one JSON object (what was written) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Replace an existing output (built beside it, swapped in at the end).
    #[arg(long)]
    pub overwrite: bool,
}

pub(super) fn run(args: QuantizeArgs) -> Result<()> {
    let source = ModelSource::resolve(&args.model.model, &args.model.revision)?;
    atomic::check_output(&args.out, "--out", &local_dirs(&source), args.overwrite)?;
    let s = crate::quantize::quantize_model(&source, &args.out, args.double_quant)?;
    report_written(
        args.json,
        format!(
            "wrote {} tensors ({:.1} MiB) to {}",
            s.tensors,
            s.bytes as f64 / (1 << 20) as f64,
            args.out.display()
        ),
        json!({"out": args.out, "tensors": s.tensors, "bytes": s.bytes}),
    );
    Ok(())
}
