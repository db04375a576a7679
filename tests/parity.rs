//! Training parity with PyTorch + PEFT: the first 20 optimizer steps of LoRA from identical
//! initial weights on identical batches (scripts/reference/trainer_parity.py), and the same for
//! PRoLoRA (scripts/reference/prolora_parity.py).

use std::process::Command;

mod common;

/// A fixture's path as a command-line or config argument.
fn fixture(rel: &str) -> String {
    common::fixture(rel).display().to_string()
}

/// Relative tolerance on the pre-clip gradient norm of each step (`grad_norm` in metrics.jsonl
/// against the value `clip_grad_norm_` returned in PyTorch): ~10x the worst measured, 9.1e-7
/// (LoRA) and 3.9e-7 (PRoLoRA).
const GRAD_NORM_RTOL: f64 = 1e-5;

/// The golden's per-step list `key`; a golden without it fails rather than skipping the check.
fn golden_floats(expected: &serde_json::Value, key: &str, golden_dir: &str) -> Vec<f64> {
    expected[key]
        .as_array()
        .unwrap_or_else(|| panic!("{golden_dir}/expected.json has no \"{key}\" list"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn twenty_lora_steps_match_pytorch_peft() {
    check_parity("parity", "rank = 4\nalpha = 8\n", "peft-lora/adapter");
}

/// PRoLoRA r 4, u 1, m = n = 3 (chunks that do not divide 32, 16, 64) against the authors'
/// expansion trained by PyTorch autograd (scripts/reference/prolora_parity.py).
#[test]
fn twenty_prolora_steps_match_pytorch() {
    check_parity(
        "parity-prolora",
        "kind = \"prolora\"\nrank = 4\nunshared_rank = 1\nsharing_rate_a = 3\nsharing_rate_b = 3\nalpha = 8\n",
        "parity-prolora/init",
    );
}

/// Trains from the adapter in `init` with the `[adapter]` keys `adapter` and compares the
/// losses, learning rates, gradient norms and the final adapter with the golden in `golden_dir`.
fn check_parity(golden_dir: &str, adapter: &str, init: &str) {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("{golden_dir}/expected.json"))).unwrap(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let cfg = tmp.path().join("parity.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"seed = 1
output_dir = "{run}"
[model]
source = "{base}"
[adapter]
{adapter}dropout = 0.0
init_from = "{init}"
[data]
train = "{data}"
max_seq_len = {max_len}
order = "file"
[optim]
lr = {lr}
warmup_ratio = {warmup}
max_grad_norm = {clip}
[train]
steps = {steps}
batch_size = {batch}
"#,
            run = run.display(),
            base = fixture("peft-lora/base"),
            init = fixture(init),
            data = fixture("peft-lora/data.jsonl"),
            max_len = expected["max_seq_len"],
            lr = expected["lr"],
            warmup = expected["warmup_ratio"],
            clip = expected["max_grad_norm"],
            steps = expected["steps"],
            batch = expected["batch_size"],
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args(["train", "--quiet", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("loss").is_some())
        .collect();
    let want = expected["losses"].as_array().unwrap();
    let lrs = golden_floats(&expected, "lrs", golden_dir);
    let norms = golden_floats(&expected, "grad_norms", golden_dir);
    assert_eq!(lines.len(), want.len());
    assert_eq!(lrs.len(), want.len(), "{golden_dir}: lrs");
    assert_eq!(norms.len(), want.len(), "{golden_dir}: grad_norms");
    let (mut worst_lr, mut worst_norm) = (0f64, 0f64);
    for (i, (ours, theirs)) in lines.iter().zip(want).enumerate() {
        let (a, b) = (ours["loss"].as_f64().unwrap(), theirs.as_f64().unwrap());
        assert!(
            ((a - b) / b).abs() < 1e-4,
            "step {}: loss {a} vs PyTorch {b}",
            i + 1
        );
        let (a, lr) = (ours["lr"].as_f64().unwrap(), lrs[i]);
        worst_lr = worst_lr.max((a - lr).abs());
        assert!((a - lr).abs() < 1e-12, "step {}: lr {a} vs {lr}", i + 1);
        let (a, b) = (ours["grad_norm"].as_f64().unwrap(), norms[i]);
        let rel = ((a - b) / b).abs();
        worst_norm = worst_norm.max(rel);
        assert!(
            rel < GRAD_NORM_RTOL,
            "step {}: gradient norm {a} vs PyTorch {b} (relative {rel:e})",
            i + 1
        );
    }
    eprintln!(
        "{golden_dir}: max |Δ| of the lrs {worst_lr:e}, max relative |Δ| of the pre-clip \
         gradient norms {worst_norm:e}"
    );

    let ours = candle_core::safetensors::load(
        run.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let theirs = candle_core::safetensors::load(
        fixture(&format!("{golden_dir}/final_adapter.safetensors")),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(ours.len(), theirs.len());
    let mut worst = 0f32;
    for (name, t) in &theirs {
        let a: Vec<f32> = ours[name].flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (x, y) in a.iter().zip(&b) {
            worst = worst.max((x - y).abs() / scale);
        }
    }
    eprintln!("max |Δ| of the final adapter, relative to each tensor's max: {worst:e}");
    assert!(
        worst < 1e-4,
        "final adapter differs from PyTorch by {worst:e} (relative)"
    );
}
