//! `prolora train`: an adapter from a TOML config.

use super::{choices, report_written};
use crate::config::RunConfig;
use crate::device::{ComputeDtype, DeviceSpec};
use crate::train::run_dir::CONFIG_FILE;
use crate::train::Start;
use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainArgs {
    /// The run config (see configs/).
    #[arg(long, short, required_unless_present = "resume")]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. --set optim.lr=1e-4 --set seed=2 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// No progress: neither the bar on a terminal nor the progress lines in a log.
    #[arg(long)]
    pub quiet: bool,
    /// Continue the run in this directory from its newest checkpoint (the config defaults to
    /// the run's own config.toml).
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "overwrite")]
    pub resume: Option<PathBuf>,
    /// Replace a finished or checkpointed run in output_dir instead of refusing (its
    /// checkpoints, adapter and eval/ results go).
    #[arg(long)]
    pub overwrite: bool,
    /// Compute device: auto, cpu, cuda or cuda:N (overrides the config's `device`).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Compute dtype of the base (overrides the config's `model.dtype`; auto: bf16 on a GPU,
    /// f32 on the CPU).
    #[arg(long, value_parser = choices::<ComputeDtype>(ComputeDtype::NAMES))]
    pub dtype: Option<ComputeDtype>,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn run(mut args: TrainArgs) -> Result<()> {
    // As `--set model.dtype=…`: recorded in the run's config.toml, and held to it on --resume.
    if let Some(dtype) = args.dtype {
        args.overrides
            .push(format!("model.dtype=\"{}\"", dtype.name()));
    }
    let (mut cfg, start) = match &args.resume {
        Some(run_dir) => {
            let saved = run_dir.join(CONFIG_FILE);
            let path = match (&args.config, saved.exists()) {
                (Some(path), _) => path.clone(),
                (None, true) => saved.clone(),
                (None, false) => bail!(
                    "--resume {}: no config.toml there (the run never started); pass --config \
                     with the run's config",
                    run_dir.display()
                ),
            };
            let mut cfg = RunConfig::load(&path, &args.overrides)?;
            cfg.output_dir = std::path::absolute(run_dir)
                .unwrap_or_else(|_| run_dir.clone())
                .display()
                .to_string();
            if saved.exists() {
                let previous = RunConfig::load(&saved, &[])?;
                if let Some(key) = cfg.first_difference(&previous) {
                    bail!(
                        "--resume {}: the config differs from the run's config.toml at `{key}`; resume with the same settings",
                        run_dir.display()
                    );
                }
            }
            (cfg, Start::Resume)
        }
        None => {
            let path = args
                .config
                .as_ref()
                .expect("clap requires --config without --resume");
            let start = if args.overwrite {
                Start::Overwrite
            } else {
                Start::Fresh
            };
            (RunConfig::load(path, &args.overrides)?, start)
        }
    };
    if let Some(device) = args.device {
        cfg.device = device;
    }
    let s = crate::train::train(&cfg, start, !args.quiet)?;
    if s.already_finished {
        report_written(
            args.json,
            format!(
                "{} already finished ({} steps); nothing to do",
                s.run_dir.display(),
                s.steps
            ),
            json!({"run_dir": s.run_dir, "steps": s.steps, "already_finished": true}),
        );
        return Ok(());
    }
    report_written(
        args.json,
        format!(
            "done: {} steps, loss {:.4} → {:.4}{}; adapter in {}",
            s.steps,
            s.first_loss,
            s.last_loss,
            s.final_eval_loss
                .map(|l| format!(", eval loss {l:.4}"))
                .unwrap_or_default(),
            s.run_dir.display()
        ),
        json!({"run_dir": s.run_dir, "steps": s.steps, "first_loss": s.first_loss,
               "last_loss": s.last_loss, "eval_loss": s.final_eval_loss}),
    );
    Ok(())
}
