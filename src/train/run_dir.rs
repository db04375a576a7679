//! The run directory: every file a run writes, by name, and how each is written.
//!
//! | file | written |
//! |---|---|
//! | `config.toml` | at the start: the resolved config, overrides included |
//! | `run.json` | at the start: tool version, command line, device, trainable count |
//! | `data_report.json` | at the start of a fresh run: what loading kept, dropped, skipped |
//! | `metrics.jsonl` | one JSON line per logged step and per evaluation (appended) |
//! | `checkpoints/step-N/` | every `train.save_every` steps and at the end, whole or not at all |
//! | `adapter_model.safetensors`, `adapter_config.json` | at the end: the adapter in PEFT's layout |
//! | `.lock` | a `flock`: exclusive for the one `train` in it, shared by `evaluate --run`s |
//! | `eval/` | `prolora evaluate --run`'s results, one file per benchmark; removed by `--overwrite` |

use super::checkpoint::{self, TrainerState};
use super::optim::AdamW;
use crate::adapters::{peft, AdapterSet};
use crate::atomic;
use crate::config::RunConfig;
use crate::data::dataset::DataReport;
use crate::lock::{self, Lock, Mode};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.toml";
pub const RUN_FILE: &str = "run.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const DATA_REPORT_FILE: &str = "data_report.json";
pub const LOCK_FILE: &str = ".lock";

/// How `train` treats an existing run directory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Start {
    /// A new run; an existing finished or checkpointed run in the directory is an error.
    Fresh,
    /// A new run that replaces whatever the directory holds.
    Overwrite,
    /// Continue from the newest checkpoint in the directory.
    Resume,
}

/// A run directory, owned by this process, checked against how the run starts.
pub struct RunDir {
    path: PathBuf,
    /// The checkpoint a resumed run continues from.
    resume_from: Option<PathBuf>,
    /// Holds the directory's lock until the run ends (the kernel drops it if the process dies).
    _lock: Lock,
}

impl RunDir {
    /// Checks `path` against `start`: a fresh run refuses a directory that holds a run, an
    /// overwrite clears the old run's checkpoints and adapter, a resume finds the newest
    /// checkpoint. Nothing is created yet.
    pub fn open(path: &Path, start: Start) -> Result<Self> {
        let lock = lock(path)?;
        let checkpoints = checkpoint::list(path)?;
        let finished = path.join(peft::WEIGHTS_FILE).exists();
        let resume_from = match start {
            // No checkpoint yet (killed before the first): start at step 0, so a requeued job
            // can always run the same command.
            Start::Resume => match newest_intact(&checkpoints) {
                Some(dir) => Some(dir),
                None if finished => bail!(
                    "--resume: {} holds a finished run but no checkpoint; pass --overwrite to \
                     train it again",
                    path.display()
                ),
                None => {
                    crate::to_stderr!(
                        "--resume: {} has no {}checkpoint; starting at step 0",
                        path.display(),
                        if checkpoints.is_empty() {
                            ""
                        } else {
                            "intact "
                        }
                    );
                    None
                }
            },
            Start::Fresh if finished || !checkpoints.is_empty() => bail!(
                "{} already holds a run: pass --resume to continue it, --overwrite to replace it, \
                 or choose another output_dir (--set output_dir=…)",
                path.display()
            ),
            Start::Overwrite => {
                // The old adapter's scores (eval/) would otherwise pass for the new run's.
                for stale in [
                    path.join("checkpoints"),
                    path.join(peft::WEIGHTS_FILE),
                    path.join("eval"),
                ] {
                    if stale.is_dir() {
                        std::fs::remove_dir_all(&stale)
                            .with_context(|| format!("cannot remove {}", stale.display()))?;
                    } else if stale.exists() {
                        std::fs::remove_file(&stale)
                            .with_context(|| format!("cannot remove {}", stale.display()))?;
                    }
                }
                None
            }
            Start::Fresh => None,
        };
        Ok(Self {
            path: path.to_path_buf(),
            resume_from,
            _lock: lock,
        })
    }

    /// Whether the run already ended: its final adapter is written and its newest checkpoint
    /// is of step `steps` or later.
    pub fn is_finished(&self, steps: usize) -> Result<bool> {
        let newest = checkpoint::list(&self.path)?.last().map(|(s, _)| *s);
        Ok(self.path.join(peft::WEIGHTS_FILE).exists() && newest.is_some_and(|s| s >= steps))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The checkpoint a resumed run continues from (None for a new run).
    pub fn resume_from(&self) -> Option<&Path> {
        self.resume_from.as_deref()
    }

    /// Creates the directory and writes the resolved config and the run's description, with the
    /// fingerprints a resume checks: the config's and the data files' sha256.
    pub fn write_header(&self, cfg: &RunConfig, run_info: &Value, data: &Value) -> Result<()> {
        std::fs::create_dir_all(&self.path)
            .with_context(|| format!("cannot create run directory {}", self.path.display()))?;
        let config = cfg.to_toml()?;
        atomic::write(&self.path.join(CONFIG_FILE), config.as_bytes())?;
        let mut info = run_info.clone();
        info["config_sha256"] = Value::String(sha256_hex(config.as_bytes()));
        info["data_sha256"] = data.clone();
        atomic::write(
            &self.path.join(RUN_FILE),
            serde_json::to_string_pretty(&info)?.as_bytes(),
        )
    }

    /// For a resume: the run's config.toml is as the run wrote it, and every data file as it
    /// was read (`data`: file → sha256). Runs from before the fingerprints pass.
    pub fn check_unchanged(&self, data: &Value) -> Result<()> {
        let Ok(text) = std::fs::read_to_string(self.path.join(RUN_FILE)) else {
            return Ok(());
        };
        let info: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let config = self.path.join(CONFIG_FILE);
        if let (Some(want), Ok(bytes)) = (info["config_sha256"].as_str(), std::fs::read(&config)) {
            if sha256_hex(&bytes) != want {
                bail!(
                    "{} was edited after the run wrote it: restore it to resume, or start a new \
                     run (--overwrite, or another output_dir)",
                    config.display()
                );
            }
        }
        if let Some(before) = info["data_sha256"].as_object() {
            for (file, want) in before {
                if data.get(file) != Some(want) {
                    bail!(
                        "{file} changed since the run read it (its sha256 differs): a resumed run \
                         would not continue the same data order; restore it, or start a new run"
                    );
                }
            }
        }
        Ok(())
    }

    pub fn write_data_report(&self, reports: &[DataReport]) -> Result<()> {
        atomic::write(
            &self.path.join(DATA_REPORT_FILE),
            serde_json::to_string_pretty(reports)?.as_bytes(),
        )
    }

    pub fn data_report_path(&self) -> PathBuf {
        self.path.join(DATA_REPORT_FILE)
    }

    /// The metrics log: emptied for a new run; for a resumed one, cut back to the lines of
    /// steps up to `resumed_at` (what came after is rewritten).
    pub fn metrics(&self, resumed_at: Option<usize>) -> Result<Metrics> {
        let path = self.path.join(METRICS_FILE);
        let kept = match (resumed_at, std::fs::read_to_string(&path)) {
            (Some(step), Ok(text)) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s as usize <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect(),
            _ => String::new(),
        };
        atomic::write(&path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Metrics { file, path })
    }

    /// Writes the checkpoint of `state.step`, keeping the newest `keep_last`.
    pub fn save_checkpoint(
        &self,
        adapters: &AdapterSet,
        base_model: &str,
        optimizer: &AdamW,
        state: &TrainerState,
        keep_last: usize,
    ) -> Result<()> {
        checkpoint::save(
            &self.path, adapters, base_model, optimizer, state, keep_last,
        )
        .map(|_| ())
    }

    /// Which checkpoint survives a stop, for the error that stops the run.
    pub fn kept_checkpoint(&self) -> Result<String> {
        Ok(checkpoint::list(&self.path)?
            .last()
            .map(|(s, _)| format!("the checkpoint of step {s} is kept"))
            .unwrap_or_else(|| "no checkpoint was written yet".into()))
    }

    /// The final adapter, in PEFT's layout at the top of the directory.
    pub fn save_adapter(&self, adapters: &AdapterSet, base_model: &str) -> Result<()> {
        peft::save(&self.path, adapters, base_model)
    }
}

/// The newest checkpoint that matches its manifest; each damaged newer one is named and
/// skipped.
fn newest_intact(checkpoints: &[(usize, PathBuf)]) -> Option<PathBuf> {
    for (step, dir) in checkpoints.iter().rev() {
        match checkpoint::verify(dir) {
            Ok(()) => return Some(dir.clone()),
            Err(e) => crate::to_stderr!("skipping the checkpoint of step {step}: {e:#}"),
        }
    }
    None
}

/// Takes the exclusive lock of run directory `path` (created if needed), or says who holds it.
fn lock(path: &Path) -> Result<Lock> {
    std::fs::create_dir_all(path)
        .with_context(|| format!("cannot create run directory {}", path.display()))?;
    let lock_path = path.join(LOCK_FILE);
    match lock::try_lock(&lock_path, Mode::Exclusive)? {
        Ok(held) => Ok(held),
        // Only evaluations share it: free for another shared holder means no run is training.
        Err(holder) if lock::is_free(&lock_path, Mode::Shared) => bail!(
            "{} is being evaluated by prolora evaluate ({holder}); wait for the evaluation to end \
             or choose another output_dir",
            path.display()
        ),
        Err(holder) => bail!(
            "{} is in use by another prolora train ({holder}); wait for it to end or choose \
             another output_dir",
            path.display()
        ),
    }
}

/// A shared hold on the run directory `path` for an evaluation of its adapter: any number of
/// evaluations at once, none while a `train` runs in it (which could replace the adapter
/// half-way). Refused, naming the training process, while one does.
pub fn lock_for_evaluation(path: &Path) -> Result<Lock> {
    match lock::try_lock(&path.join(LOCK_FILE), Mode::Shared)? {
        Ok(held) => Ok(held),
        Err(holder) => bail!(
            "--run {} is being trained ({holder}): evaluate it once the run has ended",
            path.display()
        ),
    }
}

/// Who trains in `path` now ("pid P, started T"), or None when no process does.
pub fn owner(path: &Path) -> Option<String> {
    let lock_path = path.join(LOCK_FILE);
    match lock::is_free(&lock_path, Mode::Shared) {
        true => None,
        false => Some(lock::holder(&lock_path)),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(bytes))
}

/// `metrics.jsonl`, one JSON object a line.
pub struct Metrics {
    file: File,
    path: PathBuf,
}

impl Metrics {
    pub fn log(&mut self, line: Value) -> Result<()> {
        writeln!(self.file, "{line}")
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}
