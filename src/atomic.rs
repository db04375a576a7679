//! Every file the tool writes goes through here: into a temporary sibling, flushed and fsynced,
//! renamed over the destination, and the directory fsynced. A crash, a full disk or an error
//! half-way leaves the old file (or none) in place, never a torn one.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The temporary sibling of `path`, hidden, in the same directory (so the rename is atomic);
/// `tag` keeps writers of the same path apart. Its name is cut to fit the file system's 255
/// bytes, so any name that fits can be written.
fn temporary(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let mut end = name.len().min(200);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    path.with_file_name(format!(".{}{tag}.tmp", &name[..end]))
}

/// The directory holding `path` (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `path` made absolute with every existing link resolved (the parts that do not exist yet
/// kept as given). A dangling link resolves to where it points, so that writing it creates its
/// target instead of replacing the link by a file.
fn resolved(path: &Path) -> PathBuf {
    resolved_within(path, 40)
}

/// [`resolved`], following at most `links` dangling links (a cycle of them ends).
fn resolved_within(path: &Path, links: usize) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    if let (Ok(target), true) = (std::fs::read_link(path), links > 0) {
        let parent = path.parent().unwrap_or(Path::new(""));
        return resolved_within(&parent.join(target), links - 1);
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => resolved_within(
            if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            },
            links,
        )
        .join(name),
        _ => path.to_path_buf(),
    }
}

/// Refuses an output `out` (given by `flag`) that would destroy what a command reads: one that
/// is, contains or lies inside one of `inputs` ([`check_apart`]), or one that exists and is not
/// empty unless `overwrite` (the old output is then replaced only once the new one is complete).
pub fn check_output(out: &Path, flag: &str, inputs: &[&Path], overwrite: bool) -> Result<()> {
    check_apart(out, flag, inputs)?;
    let o = resolved(out);
    let non_empty = match std::fs::metadata(&o) {
        Ok(m) if m.is_dir() => std::fs::read_dir(&o)
            .with_context(|| format!("{flag} {}", out.display()))?
            .next()
            .is_some(),
        Ok(m) => m.is_file() && m.len() > 0,
        Err(_) => false,
    };
    if non_empty && !overwrite {
        bail!(
            "{flag} {} exists: pass --overwrite to replace it, or write somewhere else",
            out.display()
        );
    }
    Ok(())
}

/// Refuses an output `out` that is, contains or lies inside one of `inputs`.
pub fn check_apart(out: &Path, flag: &str, inputs: &[&Path]) -> Result<()> {
    let o = resolved(out);
    for input in inputs {
        let i = resolved(input);
        if o == i || i.starts_with(&o) || o.starts_with(&i) {
            bail!(
                "{flag} {} would overwrite the input {}: write somewhere else",
                out.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// Makes a rename or a new entry in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

/// Writes `path` with what `write` puts into the buffered file; on success the file replaces
/// `path` whole, on error nothing changes and the temporary is removed.
pub fn write_with<T>(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<T>,
) -> Result<T> {
    // A link is written through, never replaced by a file; a device or a pipe is written to.
    let target = resolved(path);
    if std::fs::metadata(&target).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut w = BufWriter::new(file);
        let value = write(&mut w)?;
        w.flush()
            .with_context(|| format!("cannot write {}", path.display()))?;
        return Ok(value);
    }
    let path = target.as_path();
    // Per process: two runs may write the same shared file (a data cache) at once.
    let tmp = temporary(path, &format!(".{}", std::process::id()));
    let written = (|| {
        // Errors name the destination the user gave, not the temporary beside it.
        let file =
            File::create(&tmp).with_context(|| format!("cannot write {}", path.display()))?;
        let mut w = BufWriter::new(file);
        let value = write(&mut w)?;
        let file = w
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("cannot write {}", path.display()))?;
        file.sync_all()
            .with_context(|| format!("cannot sync {}", path.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        sync_dir(parent(path))?;
        Ok(value)
    })();
    if written.is_err() {
        // Best effort: the error is what the user needs to see.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Writes `bytes` to `path` atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |w| {
        w.write_all(bytes)
            .with_context(|| format!("cannot write {}", path.display()))
    })
}

/// Copies `from` to `to` atomically.
pub fn copy(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
    write(to, &bytes)
}

/// Writes `tensors` as a safetensors file, sorted by name, with `metadata`.
pub fn write_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let bytes = safetensors::serialize(sorted, metadata)
        .with_context(|| format!("cannot serialize {}", path.display()))?;
    write(path, &bytes)
}

/// Builds the directory `dir` whole: `fill` writes into a temporary sibling directory, which
/// then replaces `dir` (an existing `dir` is removed only once the new one is complete). A
/// directory has one writer (a run owns its checkpoints), so a stale temporary is replaced.
pub fn write_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = resolved(dir);
    let dir = dir.as_path();
    let tmp = temporary(dir, "");
    let written = (|| {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("cannot remove {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        fill(&tmp)?;
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot replace {}", dir.display()))?;
        }
        std::fs::rename(&tmp, dir).with_context(|| format!("cannot write {}", dir.display()))?;
        sync_dir(parent(dir))
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}
