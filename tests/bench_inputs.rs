//! Every input the benchmark scripts give `prolora train` is accepted: the committed bench data
//! (scripts/bench/data/, written by scripts/bench/make_bench_data.py) with the config template
//! the scripts fill in (scripts/bench/train.toml, `write_config` in scripts/bench/train_step.py),
//! in each setting the scripts use, on the built-in tiny model instead of the bench's.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::root;

/// The placeholders of scripts/bench/train.toml, which `write_config` fills.
const KEYS: [&str; 8] = [
    "run",
    "model",
    "quantize",
    "data",
    "seq",
    "steps",
    "batch",
    "checkpointing",
];

/// scripts/bench/train.toml with its placeholders replaced, as `write_config` does.
fn fill(values: &[(&str, String)]) -> String {
    let mut text = std::fs::read_to_string(root().join("scripts/bench/train.toml")).unwrap();
    for (key, value) in values {
        let slot = format!("{{{key}}}");
        assert!(text.contains(&slot), "train.toml has no {slot}");
        text = text.replace(&slot, value);
    }
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        assert!(!line.contains('{'), "placeholder left unfilled: {line}");
    }
    text
}

fn bench_data() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("scripts/bench/data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    let names: Vec<_> = files.iter().map(|p| p.file_name().unwrap()).collect();
    assert_eq!(names, ["all_labelled.jsonl", "chat.jsonl"]);
    files
}

#[test]
fn the_python_scripts_fill_the_same_placeholders() {
    let script = std::fs::read_to_string(root().join("scripts/bench/train_step.py")).unwrap();
    assert!(script.contains("scripts/bench/train.toml"));
    for key in KEYS {
        assert!(
            script.contains(&format!("\"{key}\":")),
            "write_config does not fill {{{key}}}"
        );
    }
    let template = std::fs::read_to_string(root().join("scripts/bench/train.toml")).unwrap();
    let slots = template
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| l.matches('{').count())
        .sum::<usize>();
    assert_eq!(
        slots,
        KEYS.len(),
        "train.toml has placeholders besides {KEYS:?}"
    );
}

/// Trains 2 steps on `data` with the bench config; returns the losses.
fn train(dir: &Path, data: &Path, quantize: &str, checkpointing: bool) -> Vec<f64> {
    let run = dir.join("run");
    let cfg = dir.join("bench.toml");
    std::fs::write(
        &cfg,
        fill(&[
            ("run", run.display().to_string()),
            ("model", "tiny".into()),
            ("quantize", quantize.into()),
            ("data", data.display().to_string()),
            ("seq", "128".into()),
            ("steps", "2".into()),
            ("batch", "2".into()),
            ("checkpointing", checkpointing.to_string()),
        ]),
    )
    .unwrap();
    // The command line of train_step.py and step_7b.py.
    let out = Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--overwrite",
            "--quiet",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} (quantize {quantize}, checkpointing {checkpointing}): {}",
        data.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
        .collect()
}

#[test]
fn prolora_trains_on_every_bench_input() {
    let dir = tempfile::tempdir().unwrap();
    for data in bench_data() {
        // train_step.py: f32 and --nf4, checkpointing off and on; step_7b.py: nf4, both.
        for quantize in ["none", "nf4"] {
            for checkpointing in [false, true] {
                let losses = train(dir.path(), &data, quantize, checkpointing);
                assert_eq!(losses.len(), 2, "{}", data.display());
                assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
            }
        }
    }
}

/// Fraction of the shifted positions (labels[1:]) that carry a label, over the examples
/// encoded at `max_seq_len`, as scripts/peers/lora_step.py reports it for full batches.
fn label_fraction(data: &Path, max_seq_len: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("encoded.jsonl");
    let tok = root().join("assets/llama2-tokenizer.json");
    let done = Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args([
            "data",
            "encode",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--data",
        ])
        .arg(data)
        .args(["--max-seq-len", &max_seq_len.to_string(), "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let (mut labelled, mut total) = (0usize, 0usize);
    for line in std::fs::read_to_string(&out).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let labels = v["labels"].as_array().unwrap();
        labelled += labels[1..]
            .iter()
            .filter(|l| l.as_i64() != Some(-100))
            .count();
        total += labels.len() - 1;
    }
    labelled as f64 / total as f64
}

#[test]
fn the_bench_data_labels_what_the_rows_say() {
    let [all, chat] = <[PathBuf; 2]>::try_from(bench_data()).unwrap();
    let (f_all, f_chat) = (label_fraction(&all, 128), label_fraction(&chat, 128));
    eprintln!("label fraction at 128: all_labelled {f_all:.3}, chat {f_chat:.3}");
    assert!(f_all > 0.85, "all_labelled: {f_all}");
    assert!(f_chat < 0.2, "chat: {f_chat}");
}
