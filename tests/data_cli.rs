//! `prolora data …` as a user runs it.

use std::path::PathBuf;
use std::process::{Command, Output};

mod common;
use common::{prolora, root};

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const CASES: &str = "tests/fixtures/chat-encoding/cases.jsonl";

#[test]
fn encode_writes_open_instructs_ids_and_labels() {
    // The golden cases whose max length is 512, as one input file: every case comes back, in order.
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<serde_json::Value> = jsonl(&root().join(CASES))
        .into_iter()
        .filter(|c| c["max_seq_length"] == 512)
        .collect();
    assert_eq!(cases.len(), 9);
    let input = dir.path().join("in.jsonl");
    let text: String = cases.iter().map(|c| format!("{c}\n")).collect();
    std::fs::write(&input, text).unwrap();
    let out = dir.path().join("out.jsonl");
    let tok = root().join("assets/llama2-tokenizer.json");
    ok(&prolora(&[
        "data",
        "encode",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--data",
        input.to_str().unwrap(),
        "--max-seq-len",
        "512",
        "--out",
        out.to_str().unwrap(),
    ]));
    let got = jsonl(&out);
    assert_eq!(got.len(), cases.len());
    for (g, c) in got.iter().zip(&cases) {
        assert_eq!(g["input_ids"], c["input_ids"], "{}", c["name"]);
        assert_eq!(g["labels"], c["labels"], "{}", c["name"]);
    }
}

/// `--out -` streams the data on stdout, so its `--json` summary would corrupt it: refused in
/// one line, before anything is read; without `--json` stdout holds the data alone.
#[test]
fn encode_to_stdout_keeps_the_summary_out_of_the_data() {
    let tok = root().join("assets/llama2-tokenizer.json");
    let args = |json: bool| {
        let mut a = vec![
            "data",
            "encode",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--data",
            "data/sample_chat_eval.jsonl",
            "--out",
            "-",
        ];
        if json {
            a.push("--json");
        }
        prolora(&a)
    };
    let o = args(true);
    let err = common::stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.trim().lines().count() == 1 && err.contains("--json with --out -"),
        "{err}"
    );
    assert!(o.stdout.is_empty());
    let data = ok(&args(false));
    assert!(data.lines().all(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["input_ids"].is_array() && v["labels"].is_array()
    }));
}

#[test]
fn encode_keeps_line_order_with_unlabelled_examples_and_skips_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        concat!(
            r#"{"messages": [{"role": "user", "content": "only a question"}]}"#,
            "\nnot json\n",
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    let args = |extra: &'static str| {
        let mut a = vec![
            "data".to_string(),
            "encode".into(),
            "--data".into(),
            input.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        if !extra.is_empty() {
            a.push(extra.into());
        }
        a
    };
    let strict = Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args(args(""))
        .output()
        .unwrap();
    assert!(!strict.status.success());
    let err = String::from_utf8_lossy(&strict.stderr);
    assert!(
        err.contains(&format!("{}:2: not valid JSON", input.display())),
        "{err}"
    );
    assert!(err.contains("--skip-invalid"), "{err}");
    assert!(!out.exists(), "a failed encode leaves no output");

    let lenient = Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args(args("--skip-invalid"))
        .output()
        .unwrap();
    assert!(lenient.status.success());
    let err = String::from_utf8_lossy(&lenient.stderr);
    assert!(err.contains(":2: skipped: not valid JSON"), "{err}");
    assert!(
        err.contains("2 examples")
            && err.contains("1 dropped")
            && err.contains("1 invalid lines skipped"),
        "{err}"
    );
    let got = jsonl(&out);
    assert_eq!(got.len(), 2);
    assert!(got[0]["labels"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l == -100));
    assert!(got[1]["labels"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l != -100));
}

#[test]
fn inspect_marks_assistant_text_and_counts() {
    let out = ok(&prolora(&[
        "data",
        "inspect",
        "--data",
        "data/sample_chat.jsonl",
        "--n",
        "1",
        "--max-seq-len",
        "32",
    ]));
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(root().join("data/sample_chat.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let answer = first["messages"][1]["content"].as_str().unwrap();
    // Not a terminal: plain marks; the answer and its EOS are the trained-on span.
    assert!(out.contains(&format!("[[{answer}</s>]]")), "{out}");
    assert_eq!(out.matches("── example").count(), 1);
    assert!(out.contains("examples       400"), "{out}");
    assert!(out.contains("max    32"), "{out}");
    let truncated: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("truncated"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(truncated > 0, "{out}");
}

#[test]
fn prepare_takes_the_snake_case_format_names() {
    let dir = tempfile::tempdir().unwrap();
    for (format, input) in [
        ("flan_v2", "data/raw/flan_v2.jsonl"),
        ("code_alpaca", "data/raw"),
        ("prompt_completion", "data/raw/prompt_completion.jsonl"),
    ] {
        let out = dir.path().join(format!("{format}.jsonl"));
        let o = prolora(&[
            "data",
            "prepare",
            "--format",
            format,
            "--in",
            input,
            "--out",
            out.to_str().unwrap(),
        ]);
        ok(&o);
        assert!(String::from_utf8_lossy(&o.stderr).starts_with("wrote "));
        assert!(!jsonl(&out).is_empty());
    }
    // A failed run leaves no output file behind.
    let out = dir.path().join("none.jsonl");
    let o = prolora(&[
        "data",
        "prepare",
        "--format",
        "alpaca",
        "--in",
        "data/raw/flan_v2.jsonl",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(!out.exists() && !dir.path().join("none.jsonl.partial").exists());
}

/// A 3-step run of the tiny preset on `train` (a file in `dir`), with `extra` TOML in [data].
fn train_config(dir: &std::path::Path, train: &std::path::Path, extra: &str) -> PathBuf {
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"output_dir = "{out}"
[model]
source = "tiny"
[adapter]
kind = "lora"
rank = 2
alpha = 4
targets = ["q_proj"]
[data]
train = "{train}"
max_seq_len = 64
cache = false
{extra}
[train]
steps = 3
batch_size = 4
micro_batch_size = 2
"#,
            out = dir.join("run").display(),
            train = train.display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn training_skips_reports_and_holds_out_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = std::fs::read_to_string(root().join("data/sample_chat.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().take(40).collect();
    text = format!(
        "{}\n{{broken\n{}\n",
        lines[..20].join("\n"),
        lines[20..].join("\n")
    );
    let train = dir.path().join("train.jsonl");
    std::fs::write(&train, text).unwrap();

    // Strict: the bad line stops the run before any training.
    let cfg = train_config(dir.path(), &train, "eval_size = 8");
    let o = prolora(&["train", "--quiet", "--config", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{}:21: not valid JSON", train.display())),
        "{err}"
    );

    let cfg = train_config(dir.path(), &train, "eval_size = 8\nskip_invalid = true");
    let o = prolora(&["train", "--quiet", "--config", cfg.to_str().unwrap()]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("skipped 1 invalid lines"), "{err}");
    let run = dir.path().join("run");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("data_report.json")).unwrap())
            .unwrap();
    assert_eq!(report[0]["examples"], 40);
    assert_eq!(report[0]["skipped"][0]["line"], 21);
    let metrics = jsonl(&run.join("metrics.jsonl"));
    assert_eq!(metrics[0]["skipped_lines"], 1);
    // The held-out split is evaluated (before training and at the end) …
    let evals: Vec<&serde_json::Value> = metrics
        .iter()
        .filter(|m| m.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals.len(), 2);
    // … and each step's loss covers the label tokens of its 4 examples (2 micro-batches of 2).
    let steps: Vec<&serde_json::Value> =
        metrics.iter().filter(|m| m.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 3);
    assert!(steps
        .iter()
        .all(|m| m["label_tokens"].as_u64().unwrap() > 8));
}
