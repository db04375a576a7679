//! What `prolora data inspect` shows: examples with the trained-on tokens marked, and length
//! statistics of the encoded set.

use anyhow::{anyhow, Result};

use crate::data::chat::{ChatEncoder, Encoded, IGNORE_INDEX};
use crate::data::dataset::DataReport;

/// Marks around trained-on text: ANSI bold green on a terminal, `[[…]]` in plain text.
pub struct Marks {
    pub open: &'static str,
    pub close: &'static str,
}

pub const ANSI: Marks = Marks {
    open: "\x1b[1;32m",
    close: "\x1b[0m",
};
pub const PLAIN: Marks = Marks {
    open: "[[",
    close: "]]",
};

/// The decoded example with every run of trained-on tokens inside `marks`. Special tokens are
/// shown (`<s>`, `</s>`, `<|im_end|>`) so the end of turn the model learns is visible.
pub fn render(encoder: &ChatEncoder, e: &Encoded, marks: &Marks) -> Result<String> {
    // Text of a span = decode(prefix up to its end) minus decode(prefix up to its start): a
    // span decoded alone would lose the leading space SentencePiece folds into its first token.
    let decode = |n: usize| {
        encoder
            .tokenizer()
            .decode(&e.input_ids[..n], false)
            .map_err(|err| anyhow!("decoding: {err}"))
    };
    let mut out = String::new();
    let mut start = 0;
    let mut prev = String::new();
    while start < e.labels.len() {
        let trained = e.labels[start] != IGNORE_INDEX;
        let end = (start..e.labels.len())
            .find(|&i| (e.labels[i] != IGNORE_INDEX) != trained)
            .unwrap_or(e.labels.len());
        let upto = decode(end)?;
        let piece = upto.strip_prefix(prev.as_str()).map(str::to_string);
        let piece = match piece {
            Some(p) => p,
            // A byte-fallback character split across the boundary: decode the span alone.
            None => encoder
                .tokenizer()
                .decode(&e.input_ids[start..end], false)
                .map_err(|err| anyhow!("decoding: {err}"))?,
        };
        if trained {
            out.extend([marks.open, piece.as_str(), marks.close]);
        } else {
            out.push_str(&piece);
        }
        prev = upto;
        start = end;
    }
    Ok(out)
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[usize], p: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The statistics block: counts from the report, percentiles of the encoded lengths and label
/// counts of the examples that are trained on.
pub fn statistics(report: &DataReport, lengths: &mut [usize], labels: &mut [usize]) -> String {
    lengths.sort_unstable();
    labels.sort_unstable();
    let row = |name: &str, v: &[usize]| {
        format!(
            "{name:<14} min {:>5}  p50 {:>5}  p90 {:>5}  p99 {:>5}  max {:>5}  mean {:>8.1}\n",
            v.first().copied().unwrap_or(0),
            percentile(v, 50.0),
            percentile(v, 90.0),
            percentile(v, 99.0),
            v.last().copied().unwrap_or(0),
            v.iter().sum::<usize>() as f64 / v.len().max(1) as f64
        )
    };
    let mut s = format!(
        "examples       {}\ntrained on     {}\ntruncated      {}\ndropped        {} (no label token left after truncation)\nskipped lines  {}\n",
        report.examples,
        report.examples - report.dropped,
        report.truncated,
        report.dropped,
        report.skipped.len()
    );
    s.push_str(&row("tokens", lengths));
    s.push_str(&row("label tokens", labels));
    s
}
