//! `prolora collect`: one table of a sweep — final and best eval loss per run, and mean ± std
//! over the seeds of each setting.

use crate::evaluate::{results_path, HEADLINES};
use crate::runs::Run;
use anyhow::{bail, Result};
use std::fmt::Write;
use std::path::Path;

fn fmt(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into())
}

/// Mean and sample standard deviation (none for one value).
fn mean_std(xs: &[f64]) -> (f64, Option<f64>) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    // One value has no spread to report (not a spread of 0).
    let std = (xs.len() > 1)
        .then(|| (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    (mean, std)
}

/// The setting a run belongs to: its whole config except the seed and the output directory.
fn setting_key(run: &Run) -> String {
    let mut c = run.config.clone();
    c.seed = 0;
    c.output_dir.clear();
    c.to_toml().unwrap_or_default()
}

fn setting_label(run: &Run) -> String {
    let c = &run.config;
    format!(
        "{} r{} lr {:e}",
        c.adapter.kind(),
        c.adapter.rank,
        c.optim.lr
    )
}

/// A run's headline benchmark scores (percent), by column, from RUN/eval/<benchmark>.json;
/// results of another adapter than the run's (an older run in the same directory) are skipped
/// with a warning.
fn scores(run: &Run) -> Result<Vec<Option<f64>>> {
    let adapter =
        crate::content_hash::sha256(&run.dir.join(crate::adapters::peft::WEIGHTS_FILE)).ok();
    HEADLINES
        .iter()
        .map(|(benchmark, _, pointer, scale)| {
            let path = results_path(&run.dir, benchmark);
            let Ok(text) = std::fs::read_to_string(&path) else {
                return Ok(None);
            };
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not JSON ({e}); rerun prolora evaluate --run",
                    path.display()
                )
            })?;
            let evaluated = v["identity"]["adapter_sha256"].as_str();
            if evaluated.is_some_and(|e| Some(e) != adapter.as_deref()) {
                crate::to_stderr!(
                    "warning: skipping {}: made with another adapter than the run's (its \
                     adapter_sha256 differs); rerun prolora evaluate --run",
                    path.display()
                );
                return Ok(None);
            }
            Ok(v.pointer(pointer)
                .and_then(|x| x.as_f64())
                .map(|x| x * scale))
        })
        .collect()
}

/// The tables for every run under `root`, as markdown or CSV.
pub fn collect(root: &Path, csv: bool) -> Result<String> {
    let runs = Run::find_all(root)?;
    if runs.is_empty() {
        bail!(
            "{}: no run directories (config.toml + metrics.jsonl) found",
            root.display()
        );
    }
    let mut out = String::new();
    let scores: Vec<Vec<Option<f64>>> = runs.iter().map(scores).collect::<Result<_>>()?;
    // A column per benchmark that some run has results for.
    let benchmarks: Vec<usize> = (0..HEADLINES.len())
        .filter(|&b| scores.iter().any(|s| s[b].is_some()))
        .collect();
    let score = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = runs
        .iter()
        .zip(&scores)
        .map(|(r, s)| {
            let cells = [
                r.dir
                    .strip_prefix(root)
                    .ok()
                    .map(|p| p.display().to_string())
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| r.name()),
                setting_label(r),
                r.config.seed.to_string(),
                format!(
                    "{}/{}",
                    r.train.last().map_or(0, |t| t.0),
                    r.config.train.steps
                ),
                fmt(r.train.last().map(|t| t.1)),
                fmt(r.final_eval()),
                fmt(r.best_eval()),
                if r.finished { "yes" } else { "no" }.into(),
            ];
            cells
                .into_iter()
                .chain(benchmarks.iter().map(|&b| score(s[b])))
                .collect()
        })
        .collect();
    let header: Vec<&str> = [
        "run",
        "setting",
        "seed",
        "steps",
        "train loss",
        "final eval",
        "best eval",
        "finished",
    ]
    .into_iter()
    .chain(benchmarks.iter().map(|&b| HEADLINES[b].1))
    .collect();
    if csv {
        writeln!(out, "{}", header.join(","))?;
        for r in &rows {
            writeln!(
                out,
                "{}",
                r.iter().map(|c| csv_field(c)).collect::<Vec<_>>().join(",")
            )?;
        }
        return Ok(out);
    }
    writeln!(out, "| {} |", header.join(" | "))?;
    writeln!(out, "|{}", "---|".repeat(header.len()))?;
    for r in &rows {
        let cells: Vec<String> = r.iter().map(|c| markdown_cell(c)).collect();
        writeln!(out, "| {} |", cells.join(" | "))?;
    }

    // Settings in first-seen order, with their seeds pooled.
    let mut groups: Vec<(String, String, Vec<usize>)> = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let key = setting_key(r);
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(g) => g.2.push(i),
            None => groups.push((key, setting_label(r), vec![i])),
        }
    }
    let columns: String = benchmarks
        .iter()
        .map(|&b| format!(" {} |", HEADLINES[b].1))
        .collect();
    writeln!(
        out,
        "\n| setting | seeds | final eval (mean ± std) | best eval (mean ± std) |{columns}"
    )?;
    writeln!(out, "|---|---|---|---|{}", "---|".repeat(benchmarks.len()))?;
    for (_, label, members) in &groups {
        let finals: Vec<f64> = members
            .iter()
            .filter_map(|&i| runs[i].final_eval())
            .collect();
        let bests: Vec<f64> = members
            .iter()
            .filter_map(|&i| runs[i].best_eval())
            .collect();
        let show = |xs: &[f64], digits: usize| {
            if xs.is_empty() {
                "-".to_string()
            } else {
                match mean_std(xs) {
                    (m, Some(s)) => format!("{m:.digits$} ± {s:.digits$}"),
                    (m, None) => format!("{m:.digits$}"),
                }
            }
        };
        let benchmark_cells: String = benchmarks
            .iter()
            .map(|&b| {
                let xs: Vec<f64> = members.iter().filter_map(|&i| scores[i][b]).collect();
                format!(" {} |", show(&xs, 2))
            })
            .collect();
        writeln!(
            out,
            "| {} | {} | {} | {} |{benchmark_cells}",
            markdown_cell(label),
            members.len(),
            show(&finals, 4),
            show(&bests, 4)
        )?;
    }
    Ok(out)
}

/// `s` as one cell of a markdown table row: a `|` would end the cell and a newline the row.
fn markdown_cell(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '|' => "\\|".to_string(),
            c if c.is_control() => c.escape_default().to_string(),
            c => c.to_string(),
        })
        .collect()
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::{markdown_cell, mean_std};

    #[test]
    fn a_markdown_cell_keeps_its_row_whole() {
        assert_eq!(markdown_cell("a|b\nc"), "a\\|b\\nc");
        assert_eq!(markdown_cell("lr=1e-3"), "lr=1e-3");
    }

    #[test]
    fn sample_standard_deviation() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!((s.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(mean_std(&[5.0]), (5.0, None));
    }
}
