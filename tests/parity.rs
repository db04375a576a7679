//! Training parity with PyTorch + PEFT: the first 20 optimizer steps of LoRA from identical
//! initial weights on identical batches (scripts/reference/trainer_parity.py), and the same for
//! PRoLoRA (scripts/reference/prolora_parity.py).

use std::path::PathBuf;
use std::process::Command;

fn fixture(rel: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
        .display()
        .to_string()
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
/// losses and the final adapter with the golden in `golden_dir`.
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
    assert_eq!(lines.len(), want.len());
    for (i, (ours, theirs)) in lines.iter().zip(want).enumerate() {
        let (a, b) = (ours["loss"].as_f64().unwrap(), theirs.as_f64().unwrap());
        assert!(
            ((a - b) / b).abs() < 1e-4,
            "step {}: loss {a} vs PyTorch {b}",
            i + 1
        );
        if let Some(lr) = expected["lrs"][i].as_f64() {
            let a = ours["lr"].as_f64().unwrap();
            assert!((a - lr).abs() < 1e-12, "step {}: lr {a} vs {lr}", i + 1);
        }
    }

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
