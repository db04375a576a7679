//! The sha256 of a file, remembered across runs: hashing a 14 GB checkpoint takes about a
//! minute, so the hash is kept under the cache directory, keyed by the file's resolved path,
//! device, inode, size and modification time (nanoseconds). Any change to the file changes one
//! of them, so a stale hash is never used; a cache that cannot be written only costs a rehash.

use crate::data::dataset::file_sha256;
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The sha256 (hex) of `path`'s bytes.
pub fn sha256(path: &Path) -> Result<String> {
    let real = path
        .canonicalize()
        .with_context(|| format!("cannot read {}", path.display()))?;
    let m = std::fs::metadata(&real).with_context(|| format!("cannot read {}", path.display()))?;
    let key = format!(
        "{}\n{} {} {} {} {}",
        real.display(),
        m.dev(),
        m.ino(),
        m.len(),
        m.mtime(),
        m.mtime_nsec()
    );
    let entry = cache_dir().map(|d| d.join(format!("{:x}", Sha256::digest(key.as_bytes()))));
    if let Some(hash) = entry
        .as_ref()
        .and_then(|e| std::fs::read_to_string(e).ok())
        .filter(|h| h.len() == 64)
    {
        return Ok(hash);
    }
    let hash = file_sha256(&real)?;
    if let Some(entry) = entry {
        // Best effort: without the entry the next run hashes the file again.
        let dir = entry.parent().expect("an entry has a directory");
        if std::fs::create_dir_all(dir).is_ok() {
            let _ = crate::atomic::write(&entry, hash.as_bytes());
        }
    }
    Ok(hash)
}

/// `$PROLORA_CACHE/sha256`, else `$XDG_CACHE_HOME/prolora/sha256`, else
/// `~/.cache/prolora/sha256`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("PROLORA_CACHE") {
        return Some(PathBuf::from(d).join("sha256"));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("prolora").join("sha256"))
}
