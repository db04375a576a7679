//! Where each point of a sweep stands, read from its run directory and the record of its last
//! attempt.

use super::{Point, Sweep};
use crate::atomic;
use crate::train::run_dir::{self, METRICS_FILE};
use crate::train::TrainSummary;
use anyhow::{Context, Result};
use serde_json::json;
use std::path::Path;

/// How the last attempt at `point` ended: `points/<index>.json`.
pub fn record(dir: &Path, point: &Point, result: &Result<TrainSummary>) -> Result<()> {
    let points = dir.join("points");
    std::fs::create_dir_all(&points)
        .with_context(|| format!("cannot create {}", points.display()))?;
    let value = match result {
        Ok(_) => json!({"point": point.name, "ended": "finished"}),
        Err(e) => match e.downcast_ref::<crate::signals::Interrupted>() {
            Some(stop) => json!({"point": point.name, "ended": "interrupted",
                "signal": crate::signals::name(stop.signal)}),
            None => json!({"point": point.name, "ended": "failed", "error": format!("{e:#}")}),
        },
    };
    atomic::write(
        &points.join(format!("{}.json", point.index)),
        &serde_json::to_vec_pretty(&value)?,
    )
}

/// One point's state.
pub struct PointStatus {
    pub name: String,
    /// pending, running, interrupted, failed or finished.
    pub state: &'static str,
    pub step: Option<u64>,
    pub steps: usize,
    pub loss: Option<f64>,
    pub detail: String,
}

pub fn of(dir: &Path, sweep: &Sweep) -> Vec<PointStatus> {
    sweep
        .points
        .iter()
        .map(|point| {
            let steps = sweep
                .point_config(point)
                .map(|c| c.train.steps)
                .unwrap_or(0);
            let (step, loss) = last_step(&point.run_dir.join(METRICS_FILE));
            let ended: Option<serde_json::Value> =
                std::fs::read_to_string(dir.join("points").join(format!("{}.json", point.index)))
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok());
            let ended_as = |s: &str| ended.as_ref().is_some_and(|e| e["ended"] == s);
            let finished = point
                .run_dir
                .join(crate::adapters::peft::WEIGHTS_FILE)
                .exists();
            let (state, detail) = if let Some(owner) = run_dir::owner(&point.run_dir) {
                ("running", owner)
            } else if finished {
                ("finished", String::new())
            } else if ended_as("failed") {
                let error = ended
                    .as_ref()
                    .and_then(|e| e["error"].as_str())
                    .unwrap_or("");
                ("failed", error.to_string())
            } else if step.is_some() {
                (
                    "interrupted",
                    "rerun the sweep (or its task) to resume it".into(),
                )
            } else {
                ("pending", String::new())
            };
            PointStatus {
                name: point.name.clone(),
                state,
                step,
                steps,
                loss,
                detail,
            }
        })
        .collect()
}

/// The last logged step and its training loss.
fn last_step(metrics: &Path) -> (Option<u64>, Option<f64>) {
    let Ok(text) = std::fs::read_to_string(metrics) else {
        return (None, None);
    };
    let mut last = (None, None);
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(step), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) {
            last = (Some(step), Some(loss));
        }
    }
    last
}

/// The table `prolora sweep status` prints.
pub fn table(statuses: &[PointStatus]) -> String {
    let mut out = String::from("| point | state | step | loss | detail |\n|---|---|---|---|---|\n");
    for s in statuses {
        let step = s
            .step
            .map(|k| format!("{k}/{}", s.steps))
            .unwrap_or_else(|| format!("-/{}", s.steps));
        let loss = s
            .loss
            .map(|l| format!("{l:.4}"))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "| {} | {} | {step} | {loss} | {} |\n",
            s.name, s.state, s.detail
        ));
    }
    let count = |state: &str| statuses.iter().filter(|s| s.state == state).count();
    out.push_str(&format!(
        "\n{} points: {} finished, {} running, {} interrupted, {} failed, {} pending\n",
        statuses.len(),
        count("finished"),
        count("running"),
        count("interrupted"),
        count("failed"),
        count("pending")
    ));
    out
}

pub fn json(statuses: &[PointStatus]) -> serde_json::Value {
    statuses
        .iter()
        .map(|s| {
            json!({"point": s.name, "state": s.state, "step": s.step, "steps": s.steps,
                "loss": s.loss, "detail": s.detail})
        })
        .collect()
}
