//! Checkpoints: everything a run needs to continue bit-identically — adapter, optimizer
//! moments, step, data position. Built whole in a temporary directory and renamed into place
//! ([`atomic::write_dir`]), so a crash or a full disk never leaves a half checkpoint that loads.

use super::optim::AdamW;
use crate::adapters::{peft, AdapterSet};
use crate::atomic;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer_state.json";
/// Size and sha256 of every other file, written last: a checkpoint whose files do not match it
/// is damaged (a disk error, a copy cut short) and is not resumed from.
const MANIFEST_FILE: &str = "manifest.json";
const CHECKED_FILES: [&str; 4] = [
    peft::WEIGHTS_FILE,
    peft::CONFIG_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
];

/// Where the loop stands. Dropout masks and the data order are functions of the seed and these
/// counters, so no generator state needs saving.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Examples drawn from the sampler so far.
    pub samples_consumed: u64,
    /// Updates the optimizer has applied (a skipped non-finite step counts in `step` only).
    pub optimizer_updates: u64,
}

fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn step_dir_name(step: usize) -> String {
    format!("step-{step:07}")
}

/// Completed checkpoints of a run, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let dir = checkpoints_dir(run_dir);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if entry.path().join(STATE_FILE).exists() {
                found.push((step, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// `{"bytes": N, "sha256": "…"}` of a file.
fn fingerprint(path: &Path) -> Result<serde_json::Value> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let hash: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(serde_json::json!({"bytes": bytes.len(), "sha256": hash}))
}

/// Checks checkpoint `dir` against its manifest, naming the first file that differs. A
/// checkpoint from before manifests (none there) is taken as it is.
pub fn verify(dir: &Path) -> Result<()> {
    let path = dir.join(MANIFEST_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let manifest: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    for f in CHECKED_FILES {
        let file = dir.join(f);
        if !file.exists() {
            bail!("{} is missing", file.display());
        }
        if fingerprint(&file)? != manifest[f] {
            bail!("{} does not match its manifest (damaged)", file.display());
        }
    }
    Ok(())
}

/// Writes the checkpoint of `state.step` and keeps only the newest `keep_last`.
pub fn save(
    run_dir: &Path,
    adapters: &AdapterSet,
    base_model: &str,
    optimizer: &AdamW,
    state: &TrainerState,
    keep_last: usize,
) -> Result<PathBuf> {
    let parent = checkpoints_dir(run_dir);
    let target = parent.join(step_dir_name(state.step));
    let written = atomic::write_dir(&target, |dir| {
        peft::save(dir, adapters, base_model)?;
        atomic::write_safetensors(&dir.join(OPTIMIZER_FILE), &optimizer.state_tensors()?, None)?;
        atomic::write(
            &dir.join(STATE_FILE),
            serde_json::to_string_pretty(state)?.as_bytes(),
        )?;
        let mut manifest = serde_json::Map::new();
        for f in CHECKED_FILES {
            manifest.insert(f.into(), fingerprint(&dir.join(f))?);
        }
        atomic::write(
            &dir.join(MANIFEST_FILE),
            serde_json::to_string_pretty(&manifest)?.as_bytes(),
        )
    });
    if let Err(e) = written {
        bail!(
            "cannot write the checkpoint of step {} in {}: {e:#} (earlier checkpoints are kept)",
            state.step,
            parent.display()
        );
    }
    let all = list(run_dir)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep_last.max(1))) {
        std::fs::remove_dir_all(old)
            .with_context(|| format!("cannot remove old checkpoint {}", old.display()))?;
    }
    Ok(target)
}

/// Restores adapter values and optimizer state from checkpoint `dir` into already built adapters.
pub fn load(dir: &Path, adapters: &AdapterSet, optimizer: &mut AdamW) -> Result<TrainerState> {
    let state_path = dir.join(STATE_FILE);
    let state: TrainerState = serde_json::from_str(
        &std::fs::read_to_string(&state_path)
            .with_context(|| format!("cannot read {}", state_path.display()))?,
    )
    .with_context(|| format!("{}: not a trainer state", state_path.display()))?;
    peft::restore_values(&dir.join(peft::WEIGHTS_FILE), adapters)?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let opt = candle_core::safetensors::load(&opt_path, &candle_core::Device::Cpu)
        .with_context(|| format!("cannot read {}", opt_path.display()))?;
    optimizer
        .load_state(&opt, state.optimizer_updates)
        .with_context(|| format!("{}", opt_path.display()))?;
    Ok(state)
}
