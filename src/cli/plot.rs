//! `prolora plot`: loss curves of runs, as an SVG.

use crate::atomic;
use crate::train::run_dir::{CONFIG_FILE, METRICS_FILE};
use anyhow::Result;
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct PlotArgs {
    /// Run directories (each with metrics.jsonl and config.toml), or directories holding runs
    /// (a sweep), searched as `collect` searches.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// The SVG file to write.
    #[arg(long, short, default_value = "loss.svg")]
    pub out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub overwrite: bool,
}

/// Writes the SVG; the output is checked before the runs are searched (an existing --out is
/// the first thing to hear about) and again against the files of the runs found in a folder.
pub(super) fn run(a: PlotArgs) -> Result<()> {
    let check = |dirs: &mut dyn Iterator<Item = &Path>| {
        let read: Vec<PathBuf> = dirs
            .flat_map(|r| [r.join(CONFIG_FILE), r.join(METRICS_FILE)])
            .collect();
        let inputs: Vec<&Path> = read.iter().map(PathBuf::as_path).collect();
        atomic::check_output(&a.out, "--out", &inputs, a.overwrite)
    };
    check(&mut a.runs.iter().map(PathBuf::as_path))?;
    let runs = crate::plot::runs_named(&a.runs)?;
    check(&mut runs.iter().map(|r| r.dir.as_path()))?;
    crate::plot::plot(&runs, &a.out)?;
    crate::to_stderr!("wrote {}", a.out.display());
    Ok(())
}
