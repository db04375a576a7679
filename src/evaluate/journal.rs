//! A benchmark's completions as they are made, appended to `<results>.partial.jsonl`, so an
//! evaluation interrupted hours in (Ctrl-C, a crash, a pre-empted job) continues where it
//! stopped: rerun the same command and only the missing prompts are generated. A completion
//! is keyed by its prompt, seed and settings, so a changed setting never reuses an old one.
//!
//! Its first line is the evaluation's [`Identity`] (model, adapter, loading, options). A
//! journal another evaluation made (another --model, --adapter, --quantize, --dtype, option)
//! is never reused: it is set aside as `<name>.stale.jsonl`, with a warning naming the first
//! difference, and the completions are made again.

use super::identity::Identity;
use crate::generate::{Completion, Request, Settings};
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Journal {
    path: PathBuf,
    done: HashMap<String, Completion>,
    file: Option<std::fs::File>,
    /// The first line of a new journal.
    header: Header,
    /// Whether the file on disk starts with `header` (else it is written anew at the first add).
    has_header: bool,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    identity: serde_json::Value,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Line {
    key: String,
    completion: Completion,
}

impl Journal {
    /// The journal at `path` of the evaluation `identity`, with what an earlier run of it left
    /// there (a cut last line ignored); another evaluation's journal is set aside.
    pub fn open(path: &Path, identity: &Identity) -> Result<Self> {
        let header = Header {
            identity: identity.to_value(),
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut lines = text.lines();
        let recorded = lines
            .next()
            .and_then(|l| serde_json::from_str::<Header>(l).ok())
            .map_or(serde_json::Value::Null, |h| h.identity);
        let mut done = HashMap::new();
        match identity.difference(&recorded) {
            _ if text.is_empty() => {}
            None => {
                for line in lines {
                    if let Ok(l) = serde_json::from_str::<Line>(line) {
                        done.insert(l.key, l.completion);
                    }
                }
                if !done.is_empty() {
                    crate::to_stderr!(
                        "{}: continuing with {} completions made before",
                        path.display(),
                        done.len()
                    );
                }
            }
            Some(difference) => {
                let stale = path.with_extension("stale.jsonl");
                std::fs::rename(path, &stale)
                    .with_context(|| format!("cannot set aside {}", path.display()))?;
                crate::to_stderr!(
                    "warning: {} was made by another evaluation ({difference}); set aside as {}, \
                     starting over",
                    path.display(),
                    stale.display()
                );
            }
        }
        Ok(Journal {
            path: path.to_path_buf(),
            has_header: !done.is_empty(),
            done,
            file: None,
            header,
        })
    }

    pub fn key(request: &Request, settings: &Settings) -> String {
        let ids: Vec<String> = request.prompt.iter().map(u32::to_string).collect();
        let text = format!("{settings:?}\n{}\n{}", request.seed, ids.join(","));
        Sha256::digest(text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub fn get(&self, key: &str) -> Option<&Completion> {
        self.done.get(key)
    }

    /// Appends a completion (flushed, so a kill loses at most the line being written).
    pub fn add(&mut self, key: String, completion: &Completion) -> Result<()> {
        if self.file.is_none() {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .truncate(false)
                .open(&self.path)
                .with_context(|| format!("cannot write {}", self.path.display()))?;
            if !self.has_header {
                let header = serde_json::to_string(&self.header)?;
                file.set_len(0)
                    .and_then(|_| writeln!(file, "{header}"))
                    .with_context(|| format!("cannot write {}", self.path.display()))?;
                self.has_header = true;
            }
            self.file = Some(file);
        }
        let line = serde_json::to_string(&Line {
            key: key.clone(),
            completion: completion.clone(),
        })?;
        let file = self.file.as_mut().expect("opened above");
        writeln!(file, "{line}")
            .and_then(|_| file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.done.insert(key, completion.clone());
        Ok(())
    }

    /// Removes the journal once the results it fed are written.
    pub fn finish(self) -> Result<()> {
        drop(self.file);
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", self.path.display()))
            }
            _ => Ok(()),
        }
    }
}
