//! Results bound to what produced them: a journal of another model, adapter, quantization or
//! dtype is set aside, never reused; the results file names all of them; one writer per
//! results file; no evaluation beside a training of its run; `train --overwrite` drops the old
//! adapter's scores; no output of `evaluate`, `generate` or `plot` destroys an input.

use prolora::lock::{self, Mode};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{prolora, root, stderr};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A copy of the PEFT fixture (base model and adapter) in a temporary directory, so a test can
/// change their files.
fn fixture_copy() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = (tmp.path().join("base"), tmp.path().join("adapter"));
    for (from, to) in [("base", &base), ("adapter", &adapter)] {
        std::fs::create_dir(to).unwrap();
        for file in std::fs::read_dir(common::fixture("peft-lora").join(from)).unwrap() {
            let file = file.unwrap().path();
            std::fs::copy(&file, to.join(file.file_name().unwrap())).unwrap();
        }
    }
    (tmp, base, adapter)
}

/// `prolora evaluate` of GSM's first example on `model`, 4 new tokens, into `out`.
fn evaluate(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "evaluate",
        "--benchmark",
        "gsm",
        "--model",
        s(model),
        "--data-dir",
        "data/eval",
        "--limit",
        "1",
        "--max-new-tokens",
        "4",
        "--out",
        s(out),
    ];
    args.extend(extra);
    prolora(&args)
}

fn journal_of(out: &Path) -> PathBuf {
    PathBuf::from(format!("{}.gsm.partial.jsonl", out.display()))
}

/// Leaves the journal of the evaluation `extra` of `model` beside `out`, as an interrupted run
/// leaves it, with every completion's text replaced by PLANTED (so a rerun that reuses it
/// shows it in its results).
fn plant_journal(model: &Path, out: &Path, extra: &[&str]) {
    // An --out that is a directory: every completion is journaled, then the results cannot be
    // written, so the journal stays.
    std::fs::create_dir(out).unwrap();
    let o = evaluate(model, out, extra);
    assert!(!o.status.success(), "the results were written");
    std::fs::remove_dir(out).unwrap();
    let journal = journal_of(out);
    let text = std::fs::read_to_string(&journal).expect("a journal");
    let mut lines = text.lines();
    let mut planted = format!("{}\n", lines.next().unwrap());
    for line in lines {
        let mut v: Value = serde_json::from_str(line).unwrap();
        v["completion"]["text"] = "PLANTED".into();
        planted.push_str(&format!("{v}\n"));
    }
    assert!(planted.lines().count() > 1, "no completion journaled");
    std::fs::write(&journal, planted).unwrap();
}

fn results(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

fn outputs(out: &Path) -> Vec<String> {
    results(out)["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["output"].as_str().unwrap().to_string())
        .collect()
}

/// Flips the lowest mantissa bit of the first weight of a safetensors file (a finite value
/// stays finite): the same path, other contents.
fn change_weights(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header] ^= 1;
    std::fs::write(file, bytes).unwrap();
}

/// Plants a journal of the evaluation `before`, applies `change`, reruns as `after`: the
/// journal must be set aside naming `field`, and the results made anew. The results' settings,
/// with the directory holding the files they name.
fn assert_set_aside(
    before: &[&str],
    after: &[&str],
    field: &str,
    change: impl FnOnce(&Path, &Path),
) -> (Value, tempfile::TempDir) {
    let (tmp, base, adapter) = fixture_copy();
    let out = tmp.path().join("gsm.json");
    let with_adapter = |args: &[&str]| -> Vec<String> {
        args.iter()
            .map(|a| a.replace("ADAPTER", s(&adapter)))
            .collect()
    };
    let before = with_adapter(before);
    plant_journal(
        &base,
        &out,
        &before.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    change(&base, &adapter);
    let after = with_adapter(after);
    let o = evaluate(
        &base,
        &out,
        &after.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let warning = err
        .lines()
        .find(|l| l.contains("set aside"))
        .unwrap_or_else(|| panic!("no warning: {err}"));
    assert!(
        warning.starts_with("warning: ") && warning.contains(&format!("({field}: ")),
        "{warning}"
    );
    assert!(tmp.path().join("gsm.json.gsm.partial.stale.jsonl").exists());
    assert!(!journal_of(&out).exists());
    assert!(outputs(&out).iter().all(|o| o != "PLANTED"));
    (results(&out)["settings"].clone(), tmp)
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The control of the tests below: the same evaluation does reuse its journal.
#[test]
fn the_same_evaluation_continues_from_its_journal() {
    let (tmp, base, _) = fixture_copy();
    let out = tmp.path().join("gsm.json");
    plant_journal(&base, &out, &[]);
    let o = evaluate(&base, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("continuing with 1 completions"));
    assert_eq!(outputs(&out), ["PLANTED"]);
}

#[test]
fn a_journal_of_other_model_weights_is_set_aside() {
    let (settings, _tmp) = assert_set_aside(&[], &[], "model_sha256", |base, _| {
        change_weights(&base.join("model.safetensors"))
    });
    // The recorded hash is `sha256sum config.json model.safetensors | sha256sum` of the model.
    let dir = PathBuf::from(settings["model"].as_str().unwrap());
    let lines: String = ["config.json", "model.safetensors"]
        .iter()
        .map(|f| {
            format!(
                "{}  {f}\n",
                sha256_hex(&std::fs::read(dir.join(f)).unwrap())
            )
        })
        .collect();
    assert_eq!(settings["model_sha256"], sha256_hex(lines.as_bytes()));
}

#[test]
fn a_journal_of_another_adapter_is_set_aside() {
    let (settings, _tmp) = assert_set_aside(
        &["--adapter", "ADAPTER"],
        &["--adapter", "ADAPTER"],
        "adapter_sha256",
        |_, adapter| change_weights(&adapter.join("adapter_model.safetensors")),
    );
    let adapter = PathBuf::from(settings["adapter"].as_str().unwrap());
    let tensors = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    assert_eq!(settings["adapter_sha256"], sha256_hex(&tensors));
}

#[test]
fn a_journal_of_another_quantization_is_set_aside() {
    let (settings, _) = assert_set_aside(&[], &["--quantize", "nf4"], "quantize", |_, _| {});
    assert_eq!(settings["quantize"], "nf4");
    assert_eq!(settings["double_quant"], true);
}

#[test]
fn a_journal_of_another_dtype_is_set_aside() {
    let (settings, _) =
        assert_set_aside(&["--dtype", "f32"], &["--dtype", "f64"], "dtype", |_, _| {});
    assert_eq!(settings["dtype"], "f64");
    // Every part of the identity is named in the results.
    for key in [
        "model",
        "model_sha256",
        "adapter",
        "adapter_sha256",
        "quantize",
        "double_quant",
        "dtype",
        "data_dir",
        "max_new_tokens",
    ] {
        assert!(settings.get(key).is_some(), "settings.{key}: {settings}");
    }
}

/// A second evaluation on one --out is refused naming the first, and writes nothing; the lock
/// file goes when the first ends.
#[test]
fn a_second_evaluation_on_one_out_is_refused() {
    let (tmp, base, _) = fixture_copy();
    let out = tmp.path().join("gsm.json");
    let lock_file = tmp.path().join(".gsm.json.lock");
    let refused = |o: &Output, pid: u32| {
        assert!(!o.status.success());
        let want = format!(
            "--out {} is being written by another prolora evaluate (pid {pid}",
            out.display()
        );
        assert!(stderr(o).contains(&want), "{}", stderr(o));
    };
    // Two processes: the first runs every GSM sample for long enough to be caught at it.
    let mut first = Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args(["evaluate", "--benchmark", "gsm", "--model", s(&base)])
        .args([
            "--data-dir",
            "data/eval",
            "--batch-size",
            "1",
            "--max-new-tokens",
            "100",
        ])
        .args(["--out", s(&out)])
        .current_dir(root())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&lock_file).is_ok_and(|t| t.starts_with("pid ")) {
        assert!(
            started.elapsed().as_secs() < 60,
            "the first never took the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let o = evaluate(&base, &out, &["--overwrite"]);
    let still_running = first.try_wait().unwrap().is_none();
    first.kill().unwrap();
    first.wait().unwrap();
    // (Should the first have ended already, the second may run: only a refusal is checked.)
    if still_running {
        refused(&o, first.id());
    }

    // Deterministically: a writer held here.
    let _ = std::fs::remove_file(journal_of(&out));
    let held = prolora::evaluate::writer::hold(&out, "--out").unwrap();
    let o = evaluate(&base, &out, &["--overwrite"]);
    refused(&o, std::process::id());
    assert!(!journal_of(&out).exists() && !out.exists());
    drop(held);
    let o = evaluate(&base, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!lock_file.exists());
}

/// `evaluate --run` shares the run's lock with other evaluations, never with a training.
#[test]
fn an_evaluation_and_a_training_of_one_run_exclude_each_other() {
    let (tmp, base, adapter) = fixture_copy();
    let run = adapter;
    let lock_file = run.join(".lock");
    let training = lock::try_lock(&lock_file, Mode::Exclusive)
        .unwrap()
        .unwrap();
    let o = prolora(&[
        "evaluate",
        "--benchmark",
        "gsm",
        "--model",
        s(&base),
        "--run",
        s(&run),
        "--data-dir",
        "data/eval",
    ]);
    assert!(!o.status.success());
    let want = format!(
        "--run {} is being trained (pid {}",
        run.display(),
        std::process::id()
    );
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));
    assert!(!run.join("eval").exists());
    drop(training);

    let evaluating = lock::try_lock(&lock_file, Mode::Shared).unwrap().unwrap();
    let o = prolora(&[
        "train",
        "--config",
        "configs/demo.toml",
        "--overwrite",
        "--set",
        &format!("output_dir=\"{}\"", run.display()),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is being evaluated by prolora evaluate"),
        "{}",
        stderr(&o)
    );
    assert!(run.join("adapter_model.safetensors").exists());
    drop((evaluating, tmp));
}

/// `train --overwrite` removes the old adapter's scores with it; `collect` skips scores of
/// another adapter.
#[test]
fn overwriting_a_run_removes_its_old_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(run.join("eval")).unwrap();
    std::fs::write(run.join("eval/gsm.json"), "{}").unwrap();
    let o = prolora(&[
        "train",
        "--config",
        "configs/demo.toml",
        "--overwrite",
        "--set",
        &format!("output_dir=\"{}\"", run.display()),
        "--set",
        "train.steps=1",
        "--set",
        "train.eval_every=0",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(run.join("adapter_model.safetensors").exists());
    assert!(!run.join("eval").exists());

    // `collect` shows only scores of the run's own adapter.
    let adapter = sha256_hex(&std::fs::read(run.join("adapter_model.safetensors")).unwrap());
    std::fs::create_dir(run.join("eval")).unwrap();
    let mmlu = |sha: &str| {
        let v = serde_json::json!({"identity": {"adapter_sha256": sha},
                                   "metrics": {"average_acc": 0.25}});
        std::fs::write(run.join("eval/mmlu.json"), v.to_string()).unwrap();
        prolora(&["collect", s(tmp.path())])
    };
    let o = mmlu(&"0".repeat(64));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("made with another adapter"),
        "{}",
        stderr(&o)
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("MMLU"));
    let o = mmlu(&adapter);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("25.00"),
        "{}",
        stderr(&o)
    );
}

/// The outputs of `evaluate` and `generate` may not be, contain or lie inside an input;
/// `plot` refuses an existing output without --overwrite.
#[test]
fn evaluate_generate_and_plot_never_destroy_their_inputs() {
    let (tmp, base, adapter) = fixture_copy();
    let inside = adapter.join("gsm.json");
    let o = evaluate(&base, &inside, &["--adapter", s(&adapter)]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("would overwrite the input"),
        "{}",
        stderr(&o)
    );
    let o = evaluate(&base, tmp.path(), &["--overwrite"]);
    assert!(
        stderr(&o).contains("would overwrite the input"),
        "{}",
        stderr(&o)
    );

    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"hi\"}\n").unwrap();
    let o = prolora(&[
        "generate",
        "--model",
        s(&base),
        "--prompts",
        s(&prompts),
        "--out",
        s(&base.join("out.jsonl")),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("would overwrite the input"),
        "{}",
        stderr(&o)
    );
    assert!(!inside.exists() && !base.join("out.jsonl").exists());

    let svg = tmp.path().join("loss.svg");
    std::fs::write(&svg, "old").unwrap();
    let o = prolora(&["plot", s(tmp.path()), "--out", s(&svg)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("pass --overwrite"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&svg).unwrap(), "old");
}
