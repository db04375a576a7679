//! `prolora merge`: W0 + ΔW as a transformers checkpoint.

use super::model::ModelSpec;
use super::report_written;
use crate::atomic;
use crate::model::nf4::Quantization;
use crate::source::{ModelSource, Origin};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args)]
pub struct MergeArgs {
    /// A local transformers directory or a Hub repo id.
    #[command(flatten)]
    pub model: ModelSpec,
    /// The adapter directory (any method).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The output directory (a transformers checkpoint).
    #[arg(long)]
    pub out: PathBuf,
    /// Print one JSON object (what was written) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Replace an existing output (built beside it, swapped in at the end).
    #[arg(long)]
    pub overwrite: bool,
}

/// The largest preset `merge` writes out whole (tiny is 32 MiB).
pub(super) const MAX_PRESET_MERGE_BYTES: f64 = 1024.0 * 1024.0 * 1024.0;

pub(super) fn run(args: MergeArgs) -> Result<()> {
    let source = ModelSource::resolve(&args.model.model, &args.model.revision)?;
    match &source.origin {
        Origin::Dir(dir) => {
            atomic::check_output(&args.out, "--out", &[dir, &args.adapter], args.overwrite)?;
            crate::export::merge(dir, &source.config, &args.adapter, &args.out)?;
        }
        Origin::Gguf(path) => bail!(
            "--model {}: merge writes a safetensors checkpoint from a safetensors base; for \
             llama.cpp, export the adapter itself (prolora export --format gguf-lora) and load \
             it with the GGUF, or merge into the checkpoint the GGUF was converted from",
            path.display()
        ),
        Origin::Preset(name) => {
            // A small preset is written out whole first, so merge can be tried offline; a
            // large one's random weights are not worth gigabytes of disk.
            let bytes = crate::train::memory::estimate(
                &source.config,
                candle_core::DType::F32,
                Quantization::None,
                None,
                0,
                None,
                false,
            )
            .total();
            if bytes > MAX_PRESET_MERGE_BYTES {
                bail!(
                    "--model {name}: a preset of random weights ({:.1} GiB in f32) is not worth \
                     merging; pass a model directory or Hub id (tiny merges, for a try)",
                    bytes / f64::from(1u32 << 30)
                );
            }
            atomic::check_output(&args.out, "--out", &[&args.adapter], args.overwrite)?;
            let base = std::env::temp_dir().join(format!(
                "prolora-merge-base-{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            std::fs::create_dir(&base)
                .with_context(|| format!("cannot create {}", base.display()))?;
            let merged = crate::quantize::write_preset(&source, &base).and_then(|_| {
                crate::export::merge(&base, &source.config, &args.adapter, &args.out)
            });
            let removed = std::fs::remove_dir_all(&base)
                .with_context(|| format!("cannot remove {}", base.display()));
            merged?;
            removed?;
        }
    }
    report_written(
        args.json,
        format!("merged model written to {}", args.out.display()),
        json!({"out": args.out}),
    );
    Ok(())
}
