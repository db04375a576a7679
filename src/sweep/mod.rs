//! `prolora sweep`: a grid of runs of one config, run here or on a scheduler, where any point
//! can be killed and rerun at any moment with the same result.
//!
//! A sweep directory holds `sweep.json` (the resolved grid: each point's overrides and run
//! directory), `runs/<point>/` (ordinary run directories) and `points/<index>.json` (how the
//! last attempt at a point ended). Every point runs as one command, `prolora sweep task DIR
//! --index I`, which starts, resumes or skips it: what a requeued Slurm task reruns.

pub mod grid;
pub mod local;
pub mod slurm;
pub mod status;

use crate::atomic;
use crate::config::RunConfig;
use crate::data::dataset::file_sha256;
use crate::train::{self, Start};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use grid::Axis;

pub const SWEEP_FILE: &str = "sweep.json";

/// A `flock` held by the one `prolora sweep` running the directory's points.
pub const LOCK_FILE: &str = ".lock";

/// Makes sweep directory `dir` (created if needed) this process's until the lock drops, or
/// names the process that runs it: two sweeps would start the same points twice, and each
/// would report the other's running points failed.
pub fn own(dir: &Path) -> Result<crate::lock::Lock> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--out {}: cannot create it", dir.display()))?;
    match crate::lock::try_lock_removed_after(&dir.join(LOCK_FILE))? {
        Ok(lock) => Ok(lock),
        Err(holder) => bail!(
            "--out {}: another prolora sweep runs it ({holder}); wait for it to end or stop it",
            dir.display()
        ),
    }
}

/// One point of the grid.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Point {
    pub index: usize,
    pub name: String,
    /// `key=value` overrides of this point, in grid order.
    pub overrides: Vec<String>,
    pub run_dir: PathBuf,
}

/// What `sweep.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sweep {
    pub config: PathBuf,
    pub config_sha256: String,
    /// The working directory relative paths in the config are read against.
    pub workdir: PathBuf,
    /// `--set` overrides shared by every point.
    pub sets: Vec<String>,
    pub grid: Vec<Axis>,
    pub points: Vec<Point>,
    /// The Slurm array job last submitted for this sweep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_job: Option<String>,
    /// Benchmarks each point is evaluated on once it has trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluate: Option<Evaluation>,
}

/// `--evaluate`: what `prolora evaluate --run` runs on each finished point.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Evaluation {
    pub benchmarks: Vec<String>,
    pub data_dir: PathBuf,
    pub allow_code_execution: bool,
}

impl Evaluation {
    /// Refuses an unknown benchmark, a missing data directory, and HumanEval without consent.
    pub fn new(
        benchmarks: &str,
        data_dir: Option<PathBuf>,
        allow_code_execution: bool,
    ) -> Result<Self> {
        let benchmarks = crate::evaluate::parse_benchmarks(benchmarks, "--evaluate")?;
        let Some(data_dir) = data_dir else {
            bail!("--evaluate needs --eval-data-dir (open-instruct's evaluation data layout)");
        };
        if !data_dir.is_dir() {
            bail!("--eval-data-dir {}: not a directory", data_dir.display());
        }
        if benchmarks.iter().any(|b| b == "humaneval") && !allow_code_execution {
            bail!("--evaluate humaneval runs the model's code: add --allow-code-execution");
        }
        Ok(Evaluation {
            benchmarks,
            data_dir: std::path::absolute(data_dir)?,
            allow_code_execution,
        })
    }
}

impl Sweep {
    /// The sweep of `config` over `grid` in `dir`; every point's config is loaded, so an
    /// unknown key or a bad value is refused before anything runs.
    pub fn plan(config: &Path, sets: &[String], grid: Vec<Axis>, dir: &Path) -> Result<Self> {
        grid::check(&grid, sets)?;
        let dir = std::path::absolute(dir)?;
        let config = std::path::absolute(config)?;
        let config_sha256 =
            file_sha256(&config).with_context(|| format!("--config {}", config.display()))?;
        let points = grid::points(&grid, &dir.join("runs"));
        let sweep = Sweep {
            config,
            config_sha256,
            workdir: std::env::current_dir()?,
            sets: sets.to_vec(),
            grid,
            points,
            slurm_job: None,
            evaluate: None,
        };
        for point in &sweep.points {
            sweep
                .point_config(point)
                .with_context(|| format!("grid point {}", point.name))?;
        }
        Ok(sweep)
    }

    /// The config of `point`: the base config, the shared `--set`s, the point's values and its
    /// run directory.
    pub fn point_config(&self, point: &Point) -> Result<RunConfig> {
        let mut overrides = self.sets.clone();
        overrides.extend(point.overrides.iter().cloned());
        overrides.push(format!("output_dir={}", toml_string(&point.run_dir)));
        RunConfig::load(&self.config, &overrides)
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(SWEEP_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("{}: not a sweep directory (no {SWEEP_FILE}); start one with `prolora sweep --config … --grid … --out {}`", dir.display(), dir.display())
        })?;
        serde_json::from_str(&text).with_context(|| format!("{}: unreadable", path.display()))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        atomic::write(&dir.join(SWEEP_FILE), &serde_json::to_vec_pretty(self)?)
    }

    /// This sweep in `dir`: the one recorded there when it is the same grid (rerunning a
    /// sweep continues it, with this run's `--evaluate`), a new one when there is none, an
    /// error when it differs.
    pub fn open(self, dir: &Path) -> Result<Self> {
        if !dir.join(SWEEP_FILE).exists() {
            // The sweep's own lock file does not make the directory another's.
            let holds_other = dir.exists()
                && std::fs::read_dir(dir)
                    .with_context(|| format!("--out {}", dir.display()))?
                    .flatten()
                    .any(|e| e.file_name() != LOCK_FILE);
            if holds_other {
                bail!(
                    "--out {}: exists and is not a sweep directory; pick an empty or new directory",
                    dir.display()
                );
            }
            self.write(dir)?;
            return Ok(self);
        }
        let old = Sweep::read(dir)?;
        let same = old.config == self.config
            && old.sets == self.sets
            && old.grid == self.grid
            && old.points == self.points;
        if !same {
            bail!(
                "--out {}: holds another sweep ({}); rerun that sweep's command to continue it, or pick another --out",
                dir.display(),
                old.difference_from(&self)
            );
        }
        if old.config_sha256 != self.config_sha256 {
            bail!(
                "{} changed since this sweep started (sha256 differs): its finished points would not match the new ones; restore it, or start a new sweep with another --out",
                self.config.display()
            );
        }
        if old.evaluate != self.evaluate {
            let updated = Sweep {
                evaluate: self.evaluate,
                ..old
            };
            updated.write(dir)?;
            return Ok(updated);
        }
        Ok(old)
    }
}

impl Sweep {
    /// What a command asking for `new` changed of this sweep, in its flags' words.
    fn difference_from(&self, new: &Sweep) -> String {
        let grid = |g: &[Axis]| g.iter().map(|a| format!("--grid {a}")).collect::<Vec<_>>();
        let mut changed = Vec::new();
        if self.config != new.config {
            changed.push(format!(
                "--config {} (it was {})",
                new.config.display(),
                self.config.display()
            ));
        }
        let only_in = |a: &[String], b: &[String]| -> Vec<String> {
            a.iter()
                .filter(|s| !b.contains(s))
                .map(|s| format!("--set {s}"))
                .collect()
        };
        let (added, dropped) = (
            only_in(&new.sets, &self.sets),
            only_in(&self.sets, &new.sets),
        );
        match (added.join(" "), dropped.join(" ")) {
            (added, dropped) if added.is_empty() && dropped.is_empty() => {}
            (added, dropped) if dropped.is_empty() => changed.push(format!("{added} (new)")),
            (added, dropped) if added.is_empty() => changed.push(format!("lacking {dropped}")),
            (added, dropped) => changed.push(format!("{added} (it had {dropped})")),
        }
        if self.grid != new.grid {
            changed.push(format!(
                "{} (it had {})",
                grid(&new.grid).join(" "),
                grid(&self.grid).join(" ")
            ));
        }
        if changed.is_empty() {
            "its points differ from this command's".into()
        } else {
            format!("this command differs in {}", changed.join("; "))
        }
    }
}

/// `path` as a TOML string value, for an override.
fn toml_string(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

/// Runs point `index` of the sweep in `dir` to its end: starts it, resumes it from its newest
/// checkpoint, or does nothing when it is finished. Records how the attempt ended.
pub fn run_task(dir: &Path, index: usize, show_progress: bool) -> Result<()> {
    let sweep = Sweep::read(dir)?;
    let Some(point) = sweep.points.get(index) else {
        bail!(
            "{}: no point {index} (the grid has {})",
            dir.display(),
            sweep.points.len()
        );
    };
    if file_sha256(&sweep.config)? != sweep.config_sha256 {
        bail!(
            "{} changed since this sweep started (sha256 differs); restore it to run point {}",
            sweep.config.display(),
            point.name
        );
    }
    std::env::set_current_dir(&sweep.workdir)
        .with_context(|| format!("the sweep's working directory {}", sweep.workdir.display()))?;
    let result = sweep.point_config(point).and_then(|cfg| {
        check_saved_config(&cfg, &point.run_dir)?;
        train::train(&cfg, Start::Resume, show_progress)
    });
    status::record(dir, point, &result)?;
    let summary = result?;
    if summary.already_finished {
        crate::to_stderr!("{}: finished before; nothing to train", point.name);
    } else {
        crate::to_stderr!("{}: done ({} steps)", point.name, summary.steps);
    }
    match &sweep.evaluate {
        Some(evaluation) => evaluate_point(&sweep.point_config(point)?, point, evaluation),
        None => Ok(()),
    }
}

/// `prolora evaluate --run --update` on a trained point: the benchmarks it has no results for,
/// or results another evaluation made (other data, options, model, adapter), are evaluated;
/// those of this same evaluation are kept (so a rerun after an interruption only does what is
/// left).
fn evaluate_point(cfg: &RunConfig, point: &Point, evaluation: &Evaluation) -> Result<()> {
    let m = &cfg.model;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    local::dies_with_this_process(&mut cmd);
    cmd.arg("evaluate")
        .args(["--model", &m.source, "--revision", &m.revision])
        .args(["--dtype", m.dtype.name(), "--quantize", m.quantize.name()])
        .args([
            "--double-quant",
            if m.double_quant { "true" } else { "false" },
        ])
        .arg("--run")
        .arg(&point.run_dir)
        .arg("--data-dir")
        .arg(&evaluation.data_dir)
        .args(["--benchmark", &evaluation.benchmarks.join(",")])
        .arg("--update")
        .args(["--chat-format", cfg.data.chat_format.name()]);
    if let Some(t) = &m.tokenizer {
        cmd.args(["--tokenizer", t]);
    }
    if evaluation.allow_code_execution {
        cmd.arg("--allow-code-execution");
    }
    let status = cmd.status().context("cannot start prolora evaluate")?;
    if !status.success() {
        bail!("{}: prolora evaluate failed ({status})", point.name);
    }
    Ok(())
}

/// A resumed point continues with the settings it started with.
fn check_saved_config(cfg: &RunConfig, run_dir: &Path) -> Result<()> {
    let saved = run_dir.join(crate::train::run_dir::CONFIG_FILE);
    if !saved.exists() {
        return Ok(());
    }
    let previous = RunConfig::load(&saved, &[])?;
    if let Some(key) = cfg.first_difference(&previous) {
        bail!(
            "{}: its config.toml differs from the sweep's at `{key}`; restore it, or delete the run directory to start the point over",
            run_dir.display()
        );
    }
    Ok(())
}
