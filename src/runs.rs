//! Reading finished and running run directories: their config and metrics, for `collect` and
//! `plot`.

use crate::config::RunConfig;
use crate::train::run_dir::{CONFIG_FILE, METRICS_FILE};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// One run directory as the tool left it.
pub struct Run {
    pub dir: PathBuf,
    pub config: RunConfig,
    /// (step, train loss)
    pub train: Vec<(usize, f64)>,
    /// (step, eval loss)
    pub eval: Vec<(usize, f64)>,
    /// The final adapter has been written.
    pub finished: bool,
}

impl Run {
    pub fn read(dir: &Path) -> Result<Self> {
        let config = RunConfig::load(&dir.join(CONFIG_FILE), &[])?;
        let path = dir.join(METRICS_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let (mut train, mut eval) = (Vec::new(), Vec::new());
        let lines: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .collect();
        for (k, &(i, line)) in lines.iter().enumerate() {
            let v: serde_json::Value = match serde_json::from_str(line) {
                Ok(v) => v,
                // A run killed mid-write leaves a partial last line: the lines before it stand.
                Err(_) if k + 1 == lines.len() && !text.ends_with('\n') => break,
                Err(e) => bail!("{}:{}: not a metrics line ({e})", path.display(), i + 1),
            };
            let Some(step) = v["step"].as_u64() else {
                continue;
            };
            if let Some(l) = v["loss"].as_f64() {
                train.push((step as usize, l));
            }
            if let Some(l) = v["eval_loss"].as_f64() {
                eval.push((step as usize, l));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            train,
            eval,
            finished: dir.join(crate::adapters::peft::WEIGHTS_FILE).exists(),
        })
    }

    /// Every run directory at or below `root` (a directory with config.toml and metrics.jsonl),
    /// each real directory once: a symlink to a directory above it (`ln -s . loop`) would
    /// otherwise be walked without end, and one to a run would count it twice.
    pub fn find_all(root: &Path) -> Result<Vec<Run>> {
        use std::os::unix::fs::MetadataExt;
        let mut runs = Vec::new();
        let mut visited = std::collections::HashSet::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let id = std::fs::metadata(&dir)
                .with_context(|| format!("cannot read {}", dir.display()))?;
            if !visited.insert((id.dev(), id.ino())) {
                continue;
            }
            if dir.join(CONFIG_FILE).exists() && dir.join(METRICS_FILE).exists() {
                // One broken run does not hide the others.
                match Run::read(&dir) {
                    Ok(run) => runs.push(run),
                    Err(e) => crate::to_stderr!("warning: skipping {}: {e:#}", dir.display()),
                }
                continue;
            }
            let entries = std::fs::read_dir(&dir)
                .with_context(|| format!("cannot list {}", dir.display()))?;
            let mut entries: Vec<_> = entries.flatten().collect();
            // Popped in name order, so the name a directory is listed under does not depend on
            // the order the file system lists it in.
            entries.sort_by_key(|e| std::cmp::Reverse(e.file_name()));
            for e in entries {
                if e.path().is_dir() && e.file_name() != "checkpoints" {
                    stack.push(e.path());
                }
            }
        }
        runs.sort_by(|a, b| a.dir.cmp(&b.dir));
        Ok(runs)
    }

    pub fn name(&self) -> String {
        self.dir.display().to_string()
    }

    pub fn final_eval(&self) -> Option<f64> {
        self.eval.last().map(|e| e.1)
    }

    pub fn best_eval(&self) -> Option<f64> {
        self.eval.iter().map(|e| e.1).reduce(f64::min)
    }
}
