//! The binary in the places a long night puts it: its stderr a log file or a pipe that closes,
//! a tree of runs with links in circles, losses at the edge of f64, names that are not tidy.

use std::path::Path;
use std::process::Command;

mod common;
use common::{prolora, root, stderr};

/// `train` of the demo config into `out` for `steps` steps, with `extra` arguments.
fn train_args(out: &Path, steps: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--config",
        "configs/demo.toml",
        "--set",
        &format!("output_dir={}", out.display()),
        "--set",
        &format!("train.steps={steps}"),
        "--set",
        "train.batch_size=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A log (stderr not a terminal) shows the steps, their loss, learning rate, throughput and
/// time left, and every held-out loss.
#[test]
fn train_writes_progress_lines_into_a_log() {
    let tmp = tempfile::tempdir().unwrap();
    let args = train_args(
        &tmp.path().join("run"),
        6,
        &["--set", "train.log_every=3", "--set", "train.eval_every=3"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = prolora(&args);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let step3 = err
        .lines()
        .find(|l| l.starts_with("step 3/6 loss "))
        .unwrap_or_else(|| panic!("no progress line at step 3: {err}"));
    for part in [" lr ", " tok/s", " eta "] {
        assert!(step3.contains(part), "{step3}");
    }
    assert!(
        err.lines().any(|l| l.starts_with("step 6/6 loss ")),
        "{err}"
    );
    for step in ["0/6", "3/6", "6/6"] {
        assert!(
            err.lines()
                .any(|l| l.starts_with(&format!("step {step} eval loss "))),
            "no held-out loss at step {step}: {err}"
        );
    }
}

/// `evaluate` in a log: per benchmark, examples done of all, examples/s and time left.
#[test]
fn evaluate_writes_progress_lines_into_a_log() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mmlu.json");
    let o = prolora(&[
        "evaluate",
        "--benchmark",
        "mmlu",
        "--model",
        "tiny",
        "--data-dir",
        "data/eval",
        "--limit",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let last = err
        .lines()
        .rfind(|l| l.starts_with("mmlu "))
        .unwrap_or_else(|| panic!("no progress line: {err}"));
    let (done, total) = last
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.split_once('/'))
        .unwrap_or_else(|| panic!("{last}"));
    assert_eq!(done, total, "{last}");
    assert!(
        last.contains(" examples/s ") && last.contains(" eta "),
        "{last}"
    );
}

/// `train … 2>&1 | head -n 1`: the reader goes after one line, and the run still trains,
/// checkpoints and writes its adapter.
#[test]
fn a_closed_pipe_never_costs_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let args = train_args(&run, 8, &["--set", "train.log_every=1"]);
    let o = Command::new("bash")
        .arg("-c")
        .arg(r#""$@" 2>&1 | head -n 1 >/dev/null; exit "${PIPESTATUS[0]}""#)
        .arg("bash")
        .arg(env!("CARGO_BIN_EXE_prolora"))
        .args(&args)
        .current_dir(root())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "train exited {:?}", o.status.code());
    assert!(run.join("adapter_model.safetensors").exists());
    assert!(run.join("checkpoints").is_dir());
}

/// A run directory made by hand: the demo's config and these metrics lines.
fn fake_run(dir: &Path, metrics: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(root().join("configs/demo.toml"), dir.join("config.toml")).unwrap();
    std::fs::write(dir.join("metrics.jsonl"), metrics).unwrap();
}

/// Links back up the tree are followed once, not forever, and a run counts once; a `|` or a
/// newline in a run's name stays inside its markdown cell.
#[test]
fn collect_visits_each_directory_once_and_keeps_its_table_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let sweep = tmp.path().join("sweep");
    fake_run(
        &sweep.join("lr|2\nx"),
        "{\"step\": 1, \"loss\": 9.0}\n{\"step\": 1, \"eval_loss\": 9.5}\n",
    );
    std::os::unix::fs::symlink(".", sweep.join("again")).unwrap();
    std::os::unix::fs::symlink(".", sweep.join("and_again")).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args(["collect", sweep.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("collect never finished on a tree with links to .");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8(o.stdout).unwrap();
    let rows: Vec<&str> = table.lines().filter(|l| l.contains("9.5000")).collect();
    assert_eq!(rows.len(), 2, "one run row and one setting row: {table}");
    assert!(rows[0].starts_with("| lr\\|2\\nx | lora r8"), "{table}");
    assert!(rows[1].contains("| 1 |"), "one seed: {table}");
    for line in table.lines().filter(|l| !l.is_empty()) {
        assert!(line.starts_with('|') && line.ends_with('|'), "{table}");
    }
}

/// Losses at the edge of f64 are drawn, or left out, but never as NaN or inf coordinates.
#[test]
fn plot_never_writes_a_non_finite_coordinate() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    fake_run(
        &run,
        "{\"step\": 1, \"loss\": 1e308}\n{\"step\": 2, \"loss\": -1.7e308}\n\
         {\"step\": 3, \"loss\": 9.0}\n{\"step\": 3, \"eval_loss\": 1.7e308}\n",
    );
    let svg = tmp.path().join("loss.svg");
    let o = prolora(&[
        "plot",
        run.to_str().unwrap(),
        "--out",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(!text.contains("NaN") && !text.contains("inf"), "{text}");
    assert!(text.contains("<polyline points=\"") && text.contains("<circle"));
}

/// `.ci/run` finds the binary where cargo put it, CARGO_TARGET_DIR included.
#[test]
fn ci_finds_the_binary_in_cargos_target_directory() {
    let script = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    let commands: Vec<&str> = script
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("set ") && !l.starts_with("cd "))
        .collect();
    assert_eq!(commands.first(), Some(&"cargo test"), "{script}");
    assert!(!script.contains("target/debug"), "{script}");
    let locate = commands
        .iter()
        .find(|l| l.starts_with("target_dir="))
        .expect("a line that asks cargo for its target directory");
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!("{locate}\nprintf %s \"$target_dir\""))
        .current_dir(root())
        .env("CARGO_TARGET_DIR", tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        tmp.path().to_str().unwrap()
    );
}

/// A UTF-8 byte-order mark before the first prompt, as some editors write it, is no error.
#[test]
fn a_prompts_file_may_start_with_a_byte_order_mark() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(&prompts, "\u{feff}{\"prompt\": \"Hi\"}\n").unwrap();
    let o = prolora(&[
        "generate",
        "--model",
        "tiny",
        "--prompts",
        prompts.to_str().unwrap(),
        "--max-new-tokens",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1);
}

/// A written file's errors name the path given, not a temporary beside it, and a long name
/// that the file system takes is written.
#[test]
fn write_errors_name_the_path_given() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    fake_run(&run, "{\"step\": 1, \"loss\": 9.0}\n");
    let plot = |out: &Path| {
        prolora(&[
            "plot",
            run.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let file = tmp.path().join("notes.txt");
    std::fs::write(&file, "").unwrap();
    let under_a_file = file.join("loss.svg");
    let o = plot(&under_a_file);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("cannot write ")
            && stderr(&o).contains("notes.txt/loss.svg: Not a directory"),
        "{}",
        stderr(&o)
    );
    let long = tmp.path().join(format!("{}.svg", "x".repeat(240)));
    let o = plot(&long);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(long.exists());
}

/// A dangling link given as --out is written through (its target created), not replaced.
#[test]
fn a_dangling_link_as_out_is_written_through() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    fake_run(&run, "{\"step\": 1, \"loss\": 9.0}\n");
    let (link, target) = (tmp.path().join("link.svg"), tmp.path().join("target.svg"));
    std::os::unix::fs::symlink("target.svg", &link).unwrap();
    let o = prolora(&[
        "plot",
        run.to_str().unwrap(),
        "--out",
        link.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
    assert!(std::fs::read_to_string(&target)
        .unwrap()
        .starts_with("<svg"));
}

/// A data file without newlines (`/dev/zero`) is refused at a line-length limit, with one error
/// line, instead of being read into memory until the allocator aborts.
#[test]
fn a_file_without_newlines_is_refused_not_read_whole() {
    let commands: [&[&str]; 2] = [
        &["data", "encode", "--data", "/dev/zero", "--out", "-"],
        &["generate", "--model", "tiny", "--prompts", "/dev/zero"],
    ];
    for args in commands {
        let o = prolora(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("/dev/zero:1: a line longer than"), "{err}");
    }
}

/// Under a memory cap (`ulimit -v`, about 5.7 GiB), a prompt whose attention cannot fit — the
/// issue's 40,000 words, and 8,000 words (about 15 GiB, which many machines have but the cap
/// does not allow) — is refused with one line before the allocation, not aborted by the
/// allocator with a backtrace.
#[test]
fn a_prompt_too_long_for_memory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for words in [40_000, 8_000] {
        let prompts = tmp.path().join(format!("{words}.jsonl"));
        let text: Vec<String> = (0..words).map(|i| format!("word{}", i % 50)).collect();
        let line = serde_json::json!({"prompt": text.join(" ")});
        std::fs::write(&prompts, format!("{line}\n")).unwrap();
        let o = Command::new("bash")
            .arg("-c")
            .arg(r#"ulimit -v 6000000 && exec "$@""#)
            .arg("bash")
            .arg(env!("CARGO_BIN_EXE_prolora"))
            .args(["generate", "--model", "tiny", "--prompts"])
            .arg(&prompts)
            .args(["--past-max-positions", "--max-new-tokens", "1"])
            .current_dir(root())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{words} words: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("GiB at once") && err.contains("shorten the input"),
            "{err}"
        );
    }
}

/// HumanEval's programs run for minutes on a full evaluation: a log sees them counted.
#[test]
fn humaneval_counts_its_programs_in_a_log() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("humaneval.json");
    let o = prolora(&[
        "evaluate",
        "--benchmark",
        "humaneval",
        "--model",
        "tiny",
        "--data-dir",
        "data/eval",
        "--allow-code-execution",
        "--limit",
        "1",
        "--samples",
        "2",
        "--max-new-tokens",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("humaneval 2/2 programs run eta ")),
        "{err}"
    );
}
