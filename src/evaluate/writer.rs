//! One evaluation at a time writes a results file and its journals: two on one `--out` would
//! mix their completions and overwrite each other's scores. The writer holds an exclusive lock
//! on `.<name>.lock` beside the file for the whole evaluation (removed when it ends); a second
//! is refused naming the first.

use crate::lock::{self, Lock};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// The writer's hold on the results file `path` (`flag` names it in the refusal).
pub fn hold(path: &Path, flag: &str) -> Result<Lock> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "results".into());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match lock::try_lock_removed_after(&path.with_file_name(format!(".{name}.lock")))? {
        Ok(held) => Ok(held),
        Err(holder) => bail!(
            "{flag} {} is being written by another prolora evaluate ({holder}): wait for it to \
             end, or write somewhere else",
            path.display()
        ),
    }
}
