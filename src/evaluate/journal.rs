//! A benchmark's completions as they are made, appended to `<results>.partial.jsonl`, so an
//! evaluation interrupted hours in (Ctrl-C, a crash, a pre-empted job) continues where it
//! stopped: rerun the same command and only the missing prompts are generated. A completion
//! is keyed by its prompt, seed and settings, so a changed setting never reuses an old one.

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
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Line {
    key: String,
    completion: Completion,
}

impl Journal {
    /// The journal at `path`, with what an earlier run left in it (a cut last line ignored).
    pub fn open(path: &Path) -> Result<Self> {
        let mut done = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.lines() {
                if let Ok(l) = serde_json::from_str::<Line>(line) {
                    done.insert(l.key, l.completion);
                }
            }
        }
        if !done.is_empty() {
            eprintln!(
                "{}: continuing with {} completions made before",
                path.display(),
                done.len()
            );
        }
        Ok(Journal {
            path: path.to_path_buf(),
            done,
            file: None,
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
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .with_context(|| format!("cannot write {}", self.path.display()))?;
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
