//! `prolora plot`: loss curves of one or several runs as an SVG any browser opens.

use crate::runs::Run;
use crate::train::run_dir::CONFIG_FILE;
use anyhow::{bail, Result};
use std::fmt::Write;
use std::path::{Path, PathBuf};

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 520.0;
const MARGIN: (f64, f64, f64, f64) = (70.0, 220.0, 30.0, 50.0); // left, right, top, bottom
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// About five round tick values covering [lo, hi].
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    // Half the span: the span of two losses near ±f64::MAX is not a finite number.
    let half_span = (hi / 2.0 - lo / 2.0).max(1e-12);
    let raw = half_span / 2.5;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| half_span / s <= 3.0)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last)
        .map(|i| i as f64 * step)
        .filter(|v| v.is_finite())
        .collect()
}

/// A tick's label with the decimals its spacing needs (a multiple of 0.2 computed in floats is
/// 9.600000000000001), in scientific notation where that would not fit the margin.
fn tick_label(v: f64, ticks: &[f64]) -> String {
    let step = match ticks {
        [a, b, ..] => (b - a).abs(),
        _ => v.abs(),
    };
    let decimals = if step > 0.0 && step < 1.0 {
        (-step.log10().floor()) as usize
    } else {
        0
    };
    let fixed = format!("{v:.decimals$}");
    match fixed.len() <= 9 {
        true => fixed,
        false => format!("{v:.2e}"),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG of the train (thin) and eval (thick, dots) loss of `runs`.
pub fn svg(runs: &[Run]) -> Result<String> {
    let points = runs.iter().flat_map(|r| r.train.iter().chain(&r.eval));
    let (mut x_max, mut y_lo, mut y_hi) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(s, l) in points {
        x_max = x_max.max(s as f64);
        if l.is_finite() {
            y_lo = y_lo.min(l);
            y_hi = y_hi.max(l);
        }
    }
    if !y_lo.is_finite() {
        bail!("no loss values to plot (are the metrics.jsonl files empty?)");
    }
    // In halves, so that no extreme loss (1e308) overflows the range into inf and NaN.
    let pad = ((y_hi / 2.0 - y_lo / 2.0) * 0.1).max(1e-3);
    let (y_lo, y_hi) = ((y_lo - pad).max(f64::MIN), (y_hi + pad).min(f64::MAX));
    let (l, r, t, b) = MARGIN;
    let (pw, ph) = (WIDTH - l - r, HEIGHT - t - b);
    let x = |s: f64| l + s / x_max * pw;
    let y = |v: f64| t + (y_hi / 2.0 - v / 2.0) / (y_hi / 2.0 - y_lo / 2.0) * ph;
    // The points of `pts` as SVG coordinates; a non-finite one is never written.
    let coordinates = |pts: &[(usize, f64)]| -> Vec<(f64, f64)> {
        pts.iter()
            .map(|&(s, v)| (x(s as f64), y(v)))
            .filter(|(px, py)| px.is_finite() && py.is_finite())
            .collect()
    };

    let mut out = String::new();
    writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    )?;
    writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#)?;
    let y_ticks = ticks(y_lo, y_hi);
    for &v in &y_ticks {
        let py = y(v);
        writeln!(
            out,
            r##"<line x1="{l}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            l + pw,
            l - 6.0,
            py + 4.0,
            tick_label(v, &y_ticks)
        )?;
    }
    let x_ticks = ticks(0.0, x_max);
    for &s in &x_ticks {
        let px = x(s);
        writeln!(
            out,
            r##"<line y1="{t}" y2="{}" x1="{px:.1}" x2="{px:.1}" stroke="#eee"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
            t + ph,
            t + ph + 16.0,
            tick_label(s, &x_ticks)
        )?;
    }
    writeln!(
        out,
        r#"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    )?;
    writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#,
        l + pw / 2.0,
        HEIGHT - 12.0
    )?;
    writeln!(
        out,
        r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">loss</text>"#,
        t + ph / 2.0
    )?;

    for (i, run) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let line = |pts: &[(usize, f64)]| {
            coordinates(pts)
                .iter()
                .map(|(px, py)| format!("{px:.1},{py:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-opacity="0.45" stroke-width="1"/>"#,
            line(&run.train)
        )?;
        writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2.5"/>"#,
            line(&run.eval)
        )?;
        for (px, py) in coordinates(&run.eval) {
            writeln!(
                out,
                r#"<circle cx="{px:.1}" cy="{py:.1}" r="3" fill="{color}"/>"#
            )?;
        }
        let ly = t + 14.0 + 34.0 * i as f64;
        let lx = l + pw + 12.0;
        writeln!(
            out,
            r#"<rect x="{lx}" y="{}" width="14" height="4" fill="{color}"/>"#,
            ly - 6.0
        )?;
        let label = run
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| run.name());
        writeln!(
            out,
            r#"<text x="{}" y="{ly}">{}</text>"#,
            lx + 20.0,
            escape(&label)
        )?;
        let detail = match run.final_eval() {
            Some(e) => format!("eval {e:.4}"),
            None => format!("train {:.4}", run.train.last().map_or(f64::NAN, |p| p.1)),
        };
        writeln!(
            out,
            r##"<text x="{}" y="{}" fill="#555">{detail}</text>"##,
            lx + 20.0,
            ly + 14.0
        )?;
    }
    writeln!(
        out,
        r##"<text x="{l}" y="{}" fill="#555">thin: train loss per step; thick with dots: eval loss</text>"##,
        t - 10.0
    )?;
    writeln!(out, "</svg>")?;
    Ok(out)
}

/// The runs `dirs` name: a run directory as it is, any other directory (a sweep, a folder of
/// runs) for the runs under it, found as `collect` finds them. One broken run or unreadable
/// directory does not cost the plot of the others: it is skipped with a warning.
pub fn runs_named(dirs: &[PathBuf]) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for d in dirs {
        let found = if d.join(CONFIG_FILE).exists() {
            Run::read(d).map(|run| vec![run])
        } else {
            Run::find_all(d)
        };
        match found {
            Ok(found) if found.is_empty() => crate::to_stderr!(
                "warning: skipping {}: no run directories (config.toml + metrics.jsonl) in it",
                d.display()
            ),
            Ok(found) => runs.extend(found),
            Err(e) => crate::to_stderr!("warning: skipping {}: {e:#}", d.display()),
        }
    }
    if runs.is_empty() {
        bail!("no readable run among the {} given", dirs.len());
    }
    Ok(runs)
}

/// Writes the plot of `runs` to `out`.
pub fn plot(runs: &[Run], out: &Path) -> Result<()> {
    crate::atomic::write(out, svg(runs)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::{tick_label, ticks};

    #[test]
    fn ticks_are_round_and_inside() {
        assert_eq!(
            ticks(0.0, 300.0),
            vec![0.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0]
        );
        assert_eq!(
            ticks(0.0, 1000.0),
            vec![0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]
        );
        let t = ticks(8.43, 10.52);
        assert!(
            t.first().unwrap() >= &8.43 && t.last().unwrap() <= &10.52 && t.len() >= 3,
            "{t:?}"
        );
    }

    /// Labels show the decimals the spacing needs and fit the margin (9 characters).
    #[test]
    fn tick_labels_are_short() {
        let t = ticks(9.43, 10.52);
        let labels: Vec<String> = t.iter().map(|&v| tick_label(v, &t)).collect();
        assert_eq!(labels, ["9.6", "9.8", "10.0", "10.2", "10.4"]);
        let t = ticks(0.0, 300.0);
        assert_eq!(tick_label(t[1], &t), "50");
        let t = ticks(1e300, 1e308);
        assert!(t.iter().all(|&v| tick_label(v, &t).len() <= 9), "{t:?}");
        let t = ticks(0.01, 0.09);
        assert_eq!(tick_label(t[0], &t), "0.02");
    }
}
