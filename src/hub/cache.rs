//! The Hugging Face cache layout, shared with Python tools:
//! `<cache>/models--org--name/{refs/<revision>, blobs/<etag>, snapshots/<commit>/<file>}`,
//! where a snapshot file is a relative symlink to its blob and a ref holds a commit hash.
//! A download in progress is `blobs/<etag>.incomplete`, which either tool resumes.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result};

pub struct RepoCache {
    dir: PathBuf,
}

impl RepoCache {
    pub fn new(cache_dir: &Path, repo_id: &str) -> Self {
        RepoCache {
            dir: cache_dir.join(format!("models--{}", repo_id.replace('/', "--"))),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The commit `revision` names here: its ref, or the revision itself when it is a commit
    /// hash (Python writes no ref for those).
    pub fn commit_of(&self, revision: &str) -> Option<String> {
        match std::fs::read_to_string(self.dir.join("refs").join(revision)) {
            Ok(commit) => Some(commit.trim().to_string()),
            Err(_) if is_commit_hash(revision) => Some(revision.to_string()),
            Err(_) => None,
        }
    }

    /// The cached copy of `file` at `revision`, if there is one.
    pub fn file(&self, revision: &str, file: &str) -> Option<PathBuf> {
        let path = self.snapshot(&self.commit_of(revision)?).join(file);
        path.is_file().then_some(path)
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    /// huggingface_hub's marker for a file `commit` does not have (so no request asks again).
    pub fn no_exist(&self, commit: &str, file: &str) -> PathBuf {
        self.dir.join(".no_exist").join(commit).join(file)
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    pub fn partial(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{etag}.incomplete"))
    }

    pub fn lock(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{etag}.lock"))
    }

    /// Makes `file` of `commit` point at the blob `etag`, and `revision` name `commit`.
    pub fn link(&self, revision: &str, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let pointer = self.snapshot(commit).join(file);
        let parent = pointer.parent().expect("a file inside the snapshot");
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        if !pointer.is_file() {
            let _ = std::fs::remove_file(&pointer); // a dangling link
            let up = Path::new(file).components().count() + 1;
            let target = PathBuf::from("../".repeat(up)).join("blobs").join(etag);
            link_or_copy(&target, &self.blob(etag), &pointer)?;
        }
        if revision != commit {
            let reference = self.dir.join("refs").join(revision);
            std::fs::create_dir_all(reference.parent().expect("refs holds it"))?;
            crate::atomic::write(&reference, commit.as_bytes())?;
        }
        Ok(pointer)
    }
}

#[cfg(unix)]
fn link_or_copy(target: &Path, blob: &Path, pointer: &Path) -> Result<()> {
    if std::os::unix::fs::symlink(target, pointer).is_ok() {
        return Ok(());
    }
    crate::atomic::copy(blob, pointer)
}

#[cfg(not(unix))]
fn link_or_copy(_target: &Path, blob: &Path, pointer: &Path) -> Result<()> {
    crate::atomic::copy(blob, pointer)
}

/// A revision is a path under `refs/`; it must stay there.
pub fn check_revision(revision: &str) -> Result<()> {
    let plain = Path::new(revision)
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if !plain || revision.contains('\\') {
        anyhow::bail!("revision {revision:?} is not a branch, tag or commit name: pass e.g. main or a 40-character commit hash");
    }
    Ok(())
}

pub fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}
