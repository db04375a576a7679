//! Reading jsonl files line by line: streamed in chunks, each line checked for text, bad
//! lines reported by number. Below every data module that reads files.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// A line that was skipped and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub line: usize,
    pub error: String,
}

/// One raw line: its text, or why it is not text. A UTF-8 byte-order mark on line 1 is
/// tolerated (some editors write one); blank lines give `Ok(None)`.
pub fn line_text(lineno: usize, raw: &[u8]) -> std::result::Result<Option<&str>, String> {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let text = std::str::from_utf8(raw).map_err(|e| {
        format!(
            "not valid UTF-8 (bad byte at byte {} of the line); save the file as UTF-8",
            e.valid_up_to() + 1
        )
    })?;
    let text = if lineno == 1 {
        text.trim_start_matches('\u{feff}')
    } else {
        text
    };
    Ok((!text.trim().is_empty()).then_some(text))
}

/// The longest line read: far past any example that fits a model's positions, and small
/// enough that a file with no newlines (`/dev/zero`, a binary) is refused, not read into memory
/// until the allocator aborts.
pub const MAX_LINE_BYTES: u64 = 64 << 20;

/// Calls `f` with successive chunks of (line number, raw bytes) of a file, streaming.
pub fn for_each_chunk(
    path: &Path,
    chunk_lines: usize,
    mut f: impl FnMut(Vec<(usize, Vec<u8>)>) -> Result<()>,
) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut lineno = 0;
    loop {
        let mut chunk = Vec::with_capacity(chunk_lines);
        while chunk.len() < chunk_lines {
            let mut buf = Vec::new();
            let n = (&mut reader)
                .take(MAX_LINE_BYTES + 1)
                .read_until(b'\n', &mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            lineno += 1;
            if n as u64 > MAX_LINE_BYTES && buf.last() != Some(&b'\n') {
                bail!(
                    "{}:{lineno}: a line longer than {} MiB; is this a jsonl file (one JSON object per line)?",
                    path.display(),
                    MAX_LINE_BYTES >> 20
                );
            }
            if buf.last() == Some(&b'\n') {
                buf.pop();
            }
            chunk.push((lineno, buf));
        }
        if chunk.is_empty() {
            return Ok(());
        }
        f(chunk)?;
    }
}
