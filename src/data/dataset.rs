//! A `messages` jsonl file → encoded examples, at scale: the file is streamed in chunks of lines
//! (never all parsed at once), each chunk is parsed and tokenized on all cores, and the result
//! is cached on disk under a key of everything it depends on, so a second run skips the work.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::atomic;
use crate::data::chat::{parse_line, ChatEncoder, Encoded, IGNORE_INDEX};
use crate::data::jsonl::Skipped;
use crate::data::jsonl::{for_each_chunk, line_text};

/// Lines parsed and tokenized together: enough to keep every core busy, few enough that the
/// raw text of one chunk is all that is held.
const CHUNK_LINES: usize = 4096;

/// Names the encoders' rules in the cache key (with the chat format and template themselves);
/// change it when `chat.rs` or `spans.rs` changes what they produce.
pub const TEMPLATE: &str = "chat-encoders/v2";

pub struct LoadOptions {
    pub max_seq_len: usize,
    /// Skip and count bad lines instead of stopping at the first.
    pub skip_invalid: bool,
    /// Where tokenized files are cached; `None`: no cache.
    pub cache_dir: Option<PathBuf>,
}

/// What loading a file did, for the user and the run directory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DataReport {
    pub file: String,
    /// Valid examples read.
    pub examples: usize,
    /// Examples longer than `max_seq_len` (cut on the right).
    pub truncated: usize,
    /// Examples with no label token left after truncation (not trained on).
    pub dropped: usize,
    /// Bad lines skipped under `skip_invalid`.
    pub skipped: Vec<Skipped>,
    pub from_cache: bool,
}

impl DataReport {
    /// One line for the terminal.
    pub fn summary(&self) -> String {
        format!(
            "{}: {} examples, {} truncated, {} dropped (no label token left), {} invalid lines skipped{}",
            self.file,
            self.examples,
            self.truncated,
            self.dropped,
            self.skipped.len(),
            if self.from_cache { " (tokenized cache)" } else { "" }
        )
    }
}

/// The default cache directory: `$PROLORA_CACHE`, else `$XDG_CACHE_HOME/prolora/tokenized`,
/// else `~/.cache/prolora/tokenized`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("PROLORA_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("prolora").join("tokenized"))
}

/// The outcome of one line.
enum Line {
    Blank,
    Bad(String),
    Good { encoded: Encoded, truncated: bool },
}

/// Reads, encodes and filters a `messages` jsonl file (see the module doc). Errors name the file
/// and line; an empty result (every example dropped or skipped) is an error.
pub fn load(
    encoder: &ChatEncoder,
    path: &Path,
    opts: &LoadOptions,
) -> Result<(Vec<Encoded>, DataReport)> {
    let cache_file = match &opts.cache_dir {
        Some(dir) => Some(dir.join(format!("{}.bin", cache_key(encoder, path, opts)?))),
        None => None,
    };
    let cached = cache_file.as_deref().and_then(|f| read_cache(f).ok());
    let (examples, mut report) = match cached {
        Some((examples, mut report)) => {
            report.from_cache = true;
            (examples, report)
        }
        None => {
            let mut examples = Vec::new();
            let report = encode_file(encoder, path, opts, |e| {
                if e.num_trained() > 0 {
                    examples.push(e);
                }
                Ok(())
            })?;
            if let Some(f) = &cache_file {
                // A cache that cannot be written only costs time next run.
                if let Err(e) = write_cache(f, &examples, &report) {
                    crate::to_stderr!(
                        "warning: not caching tokenized data at {}: {e:#}",
                        f.display()
                    );
                }
            }
            (examples, report)
        }
    };
    report.file = path.display().to_string();
    if !opts.skip_invalid {
        if let Some(s) = report.skipped.first() {
            return Err(bad_line(path, s.line, &s.error));
        }
    }
    if examples.is_empty() {
        bail!(
            "{}: no example left to train on ({} read, {} dropped with no label token within \
             {} tokens, {} invalid lines skipped); raise the max sequence length or check the data",
            path.display(),
            report.examples,
            report.dropped,
            opts.max_seq_len,
            report.skipped.len()
        );
    }
    Ok((examples, report))
}

fn bad_line(path: &Path, line: usize, error: &str) -> anyhow::Error {
    anyhow!(
        "{}:{line}: {error} (or skip bad lines with --skip-invalid / data.skip_invalid = true)",
        path.display()
    )
}

/// Streams `path` through the encoder, giving every valid example to `sink` in file order
/// (those with no label token too); counts what it saw. Bad lines stop the run unless
/// `opts.skip_invalid`.
pub fn encode_file(
    encoder: &ChatEncoder,
    path: &Path,
    opts: &LoadOptions,
    mut sink: impl FnMut(Encoded) -> Result<()>,
) -> Result<DataReport> {
    let mut report = DataReport {
        file: path.display().to_string(),
        ..DataReport::default()
    };
    for_each_chunk(path, CHUNK_LINES, |chunk| {
        let lines: Vec<Line> = chunk
            .par_iter()
            .map(|(lineno, raw)| encode_line(encoder, *lineno, raw, opts.max_seq_len))
            .collect();
        for ((lineno, _), line) in chunk.iter().zip(lines) {
            match line {
                Line::Blank => {}
                Line::Bad(error) => {
                    if !opts.skip_invalid {
                        return Err(bad_line(path, *lineno, &error));
                    }
                    crate::to_stderr!("{}:{lineno}: skipped: {error}", path.display());
                    report.skipped.push(Skipped {
                        line: *lineno,
                        error,
                    });
                }
                Line::Good { encoded, truncated } => {
                    report.examples += 1;
                    report.truncated += usize::from(truncated);
                    report.dropped += usize::from(encoded.num_trained() == 0);
                    sink(encoded)?;
                }
            }
        }
        Ok(())
    })?;
    Ok(report)
}

fn encode_line(encoder: &ChatEncoder, lineno: usize, raw: &[u8], max_seq_len: usize) -> Line {
    let text = match line_text(lineno, raw) {
        Ok(Some(t)) => t,
        Ok(None) => return Line::Blank,
        Err(e) => return Line::Bad(e),
    };
    let example = match parse_line(text) {
        Ok(e) => e,
        Err(e) => return Line::Bad(e),
    };
    match encoder.encode_with_length(&example, max_seq_len) {
        Ok((encoded, full_len)) => Line::Good {
            encoded,
            truncated: full_len > max_seq_len,
        },
        Err(e) => Line::Bad(format!("{e:#}")),
    }
}

fn sha256_hex(bytes: impl AsRef<[u8]>) -> String {
    let digest = Sha256::digest(bytes.as_ref());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 over (data file, tokenizer, max length, template), hex.
/// The sha256 of a file's bytes, streamed.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut data = Sha256::new();
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        data.update(&buf[..n]);
    }
    Ok(format!("{:x}", data.finalize()))
}

fn cache_key(encoder: &ChatEncoder, path: &Path, opts: &LoadOptions) -> Result<String> {
    let data = file_sha256(path)?;
    let tokenizer = encoder
        .tokenizer()
        .to_string(false)
        .map_err(|e| anyhow!("serializing the tokenizer for the cache key: {e}"))?;
    let key = format!(
        "data {data}\ntokenizer {}\nmax_seq_len {}\ntemplate {TEMPLATE}\n{}",
        sha256_hex(tokenizer),
        opts.max_seq_len,
        encoder.identity()
    );
    Ok(sha256_hex(key))
}

const MAGIC: &[u8; 8] = b"PRLTOK01";

/// Layout: magic, u64 length + JSON report, u64 example count, then per example u32 length,
/// the ids (u32 LE) and one byte per position (1 = trained on).
fn write_cache(file: &Path, examples: &[Encoded], report: &DataReport) -> Result<()> {
    let dir = file.parent().expect("a cache file has a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let meta = serde_json::to_vec(report)?;
    // Atomic, so a cache file is either complete or absent.
    atomic::write_with(file, |w| {
        w.write_all(MAGIC)?;
        w.write_all(&(meta.len() as u64).to_le_bytes())?;
        w.write_all(&meta)?;
        w.write_all(&(examples.len() as u64).to_le_bytes())?;
        for e in examples {
            w.write_all(&(e.input_ids.len() as u32).to_le_bytes())?;
            for id in &e.input_ids {
                w.write_all(&id.to_le_bytes())?;
            }
            let mask: Vec<u8> = e
                .labels
                .iter()
                .map(|&l| u8::from(l != IGNORE_INDEX))
                .collect();
            w.write_all(&mask)?;
        }
        Ok(())
    })
}

fn read_cache(file: &Path) -> Result<(Vec<Encoded>, DataReport)> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut r = bytes.as_slice();
    let mut take = |n: usize| -> Result<&[u8]> {
        if r.len() < n {
            bail!("truncated cache file");
        }
        let (head, tail) = r.split_at(n);
        r = tail;
        Ok(head)
    };
    if take(8)? != MAGIC {
        bail!("not a tokenized cache file");
    }
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize;
    let meta_len = u64_at(take(8)?);
    let report: DataReport = serde_json::from_slice(take(meta_len)?)?;
    let count = u64_at(take(8)?);
    let mut examples = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
        let input_ids: Vec<u32> = take(4 * len)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let labels = take(len)?
            .iter()
            .zip(&input_ids)
            .map(|(&m, &id)| if m == 1 { i64::from(id) } else { IGNORE_INDEX })
            .collect();
        examples.push(Encoded { input_ids, labels });
    }
    Ok((examples, report))
}
