//! A run killed with SIGKILL at arbitrary points and resumed ends with the adapter bit-identical
//! to an uninterrupted run; a killed checkpoint write never leaves a loadable half checkpoint.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::root;

const STEPS: usize = 16;

fn write_config(dir: &Path, run: &Path) -> PathBuf {
    let cfg = dir.join("run.toml");
    let data = root().join("data/sample_chat.jsonl");
    std::fs::write(
        &cfg,
        format!(
            r#"seed = 5
output_dir = "{run}"
[model]
source = "tiny"
[adapter]
rank = 4
alpha = 8
dropout = 0.1
[data]
train = "{data}"
max_seq_len = 48
[optim]
lr = 2e-3
[train]
steps = {STEPS}
batch_size = 4
micro_batch_size = 2
gradient_checkpointing = true
save_every = 2
keep_last = 2
"#,
            run = run.display(),
            data = data.display()
        ),
    )
    .unwrap();
    cfg
}

/// The adapter of an uninterrupted run of the test config (with `extra` flags) in `dir`.
fn reference_adapter(dir: &Path, extra: &[&str]) -> Vec<u8> {
    let reference = dir.join("reference");
    let cfg = write_config(dir, &reference);
    succeeds(train(
        &[&["--config", cfg.to_str().unwrap()][..], extra].concat(),
    ));
    std::fs::read(reference.join("adapter_model.safetensors")).unwrap()
}

fn train(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_prolora"));
    c.arg("train")
        .args(args)
        .arg("--quiet")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Runs `cmd` to completion and fails the test with its stderr unless it succeeded.
fn succeeds(mut cmd: Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn newest_checkpoint(run: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(run.join("checkpoints")) else {
        return 0;
    };
    entries
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn resume_after_sigkill_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();

    let want = reference_adapter(tmp.path(), &[]);

    let run = tmp.path().join("killed");
    let cfg = write_config(tmp.path(), &run);
    // Kill at growing delays after the newest checkpoint appears: some kills land mid-step,
    // some mid-write of the next checkpoint.
    let mut kills = 0;
    for delay_ms in [0u64, 150, 400, 50] {
        let before = newest_checkpoint(&run);
        let mut child = if before == 0 {
            train(&["--config", cfg.to_str().unwrap()]).spawn().unwrap()
        } else {
            train(&["--resume", run.to_str().unwrap()]).spawn().unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while newest_checkpoint(&run) <= before && Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
    }
    assert!(kills >= 2, "the run finished before it could be killed");
    if !run.join("adapter_model.safetensors").exists() {
        succeeds(train(&["--resume", run.to_str().unwrap()]));
    }
    let got = std::fs::read(run.join("adapter_model.safetensors")).unwrap();
    assert!(
        got == want,
        "resumed adapter differs from the uninterrupted run"
    );

    // Metrics hold each training step exactly once.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert_eq!(steps, (1..=STEPS as u64).collect::<Vec<_>>());
    // keep_last: only the two newest checkpoints remain, and no temporary directory.
    let names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("step-")), "{names:?}");
}

#[test]
fn a_finished_run_is_not_overwritten_by_accident() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("adapter_model.safetensors"), b"precious").unwrap();
    let cfg = write_config(tmp.path(), &run);
    let out = train(&["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(run.join("adapter_model.safetensors")).unwrap(),
        b"precious"
    );
}

#[test]
fn resume_with_a_changed_config_names_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let cfg = write_config(tmp.path(), &run);
    succeeds(train(&[
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "train.steps=2",
    ]));
    let out = train(&["--resume", run.to_str().unwrap(), "--set", "optim.lr=1e-3"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("optim.lr"), "{err}");
}

#[test]
fn a_non_finite_step_stops_the_run_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let cfg = write_config(tmp.path(), &run);
    // An absurd learning rate: the first update sends the weights to ~1e30 and the next
    // loss overflows.
    let blow_up = [
        "--set",
        "optim.lr=1e30",
        "--set",
        "optim.warmup_ratio=0.0",
        "--set",
        "train.save_every=1",
    ];
    let out = train(&[&["--config", cfg.to_str().unwrap()][..], &blow_up].concat())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("step 2:") && err.contains("checkpoint of step 1 is kept"),
        "{err}"
    );
    assert!(run
        .join("checkpoints/step-0000001/adapter_model.safetensors")
        .exists());
    assert!(
        !run.join("adapter_model.safetensors").exists(),
        "no final adapter from a failed run"
    );

    // With on_nonfinite = "skip" the run goes on and says which steps it skipped.
    let skipped = tmp.path().join("skipped");
    let cfg = write_config(tmp.path(), &skipped);
    let out = train(
        &[
            &["--config", cfg.to_str().unwrap()][..],
            &blow_up,
            &["--set", "train.on_nonfinite=skip"],
        ]
        .concat(),
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = std::fs::read_to_string(skipped.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"skipped\":true"), "{metrics}");
}

/// Training steps logged so far in `run`'s metrics.
fn steps_logged(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"loss\""))
        .count()
}

/// Waits (up to two minutes) until `run` has logged more than `after` steps.
fn wait_for_steps(run: &Path, after: usize, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while steps_logged(run) <= after && Instant::now() < deadline {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGINT (Ctrl-C), SIGTERM and SIGUSR1 (Slurm's warning) each stop the run between two steps
/// with a checkpoint and exit 128 + the signal; resumed after each, the run ends with the
/// adapter of an uninterrupted run, bit for bit.
#[test]
fn stop_signals_checkpoint_and_the_resumed_run_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let no_saves = ["--set", "train.save_every=0"];
    let want = reference_adapter(tmp.path(), &no_saves);

    let run = tmp.path().join("stopped");
    let cfg = write_config(tmp.path(), &run);
    for (signal, name) in [
        (libc::SIGINT, "SIGINT"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGUSR1, "SIGUSR1"),
    ] {
        let before = steps_logged(&run);
        let mut child = if before == 0 {
            train(&[&["--config", cfg.to_str().unwrap()][..], &no_saves].concat())
        } else {
            train(&["--resume", run.to_str().unwrap()])
        }
        .spawn()
        .unwrap();
        wait_for_steps(&run, before + 1, &mut child);
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, signal) };
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(128 + signal), "{name}: {err}");
        assert!(
            err.contains(&format!("stopped by {name} after step"))
                && err.contains("prolora train --resume"),
            "{name}: {err}"
        );
        let at = newest_checkpoint(&run);
        assert!(at > before, "{name}: no checkpoint past step {before}");
        assert!(!run.join("adapter_model.safetensors").exists());
    }
    succeeds(train(&["--resume", run.to_str().unwrap()]));
    let got = std::fs::read(run.join("adapter_model.safetensors")).unwrap();
    assert!(
        got == want,
        "the resumed adapter differs from the uninterrupted run"
    );
}

/// A second process on a running run's directory is refused with the owner's pid, whatever it
/// asks (a new run, --overwrite, --resume); the first finishes as if alone.
#[test]
fn a_second_owner_of_a_run_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let want = reference_adapter(tmp.path(), &[]);

    let run = tmp.path().join("run");
    let cfg = write_config(tmp.path(), &run);
    let mut first = train(&["--config", cfg.to_str().unwrap()]).spawn().unwrap();
    wait_for_steps(&run, 2, &mut first);
    let owner = format!("pid {}", first.id());
    for args in [
        vec!["--config", cfg.to_str().unwrap()],
        vec!["--config", cfg.to_str().unwrap(), "--overwrite"],
        vec!["--resume", run.to_str().unwrap()],
    ] {
        let out = train(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} ran beside the owner");
        assert!(
            err.contains("is in use by another prolora train") && err.contains(&owner),
            "{args:?}: {err}"
        );
    }
    let out = first.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = std::fs::read(run.join("adapter_model.safetensors")).unwrap();
    assert!(got == want, "the owner's run was disturbed");
    // A lock left by a finished (or killed) process does not block.
    succeeds(train(&["--config", cfg.to_str().unwrap(), "--overwrite"]));
}

/// `--resume` is always safe to call: on a finished run it changes nothing, and with no
/// checkpoint yet (a job killed before its first) it starts at step 0 and ends as a fresh run.
#[test]
fn resume_of_a_finished_or_unstarted_run_is_safe() {
    let tmp = tempfile::tempdir().unwrap();
    let short = ["--set", "train.steps=4"];
    let done = tmp.path().join("done");
    let cfg = write_config(tmp.path(), &done);
    succeeds(train(
        &[&["--config", cfg.to_str().unwrap()][..], &short].concat(),
    ));
    let files = [
        "adapter_model.safetensors",
        "metrics.jsonl",
        "run.json",
        "config.toml",
    ];
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(done.join(f)).unwrap())
        .collect();
    let out = train(&["--resume", done.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("already finished"),
        "{err}"
    );
    for (f, b) in files.iter().zip(&before) {
        assert!(&std::fs::read(done.join(f)).unwrap() == b, "{f} changed");
    }

    let fresh = tmp.path().join("fresh");
    let cfg = write_config(tmp.path(), &fresh);
    let out = train(
        &[
            &[
                "--config",
                cfg.to_str().unwrap(),
                "--resume",
                fresh.to_str().unwrap(),
            ][..],
            &short,
        ]
        .concat(),
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("starting at step 0"),
        "{err}"
    );
    assert!(
        std::fs::read(fresh.join("adapter_model.safetensors")).unwrap() == before[0],
        "a resume from nothing differs from a fresh run"
    );
    let out = train(&["--resume", tmp.path().join("never").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("pass --config"),
        "{err}"
    );
}

/// A damaged newest checkpoint (its adapter cut short) is named and skipped: the run resumes
/// from the newest intact one and still ends bit-identical.
#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let want = reference_adapter(tmp.path(), &[]);

    let run = tmp.path().join("run");
    let cfg = write_config(tmp.path(), &run);
    succeeds(train(&["--config", cfg.to_str().unwrap()]));
    // Make it unfinished with a damaged newest checkpoint (keep_last 2: steps 14 and 16).
    std::fs::remove_file(run.join("adapter_model.safetensors")).unwrap();
    let newest = run.join(format!(
        "checkpoints/step-{STEPS:07}/adapter_model.safetensors"
    ));
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let out = train(&["--resume", run.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("skipping the checkpoint of step {STEPS}"))
            && err.contains("resuming from")
            && err.contains(&format!("step {}", STEPS - 2)),
        "{err}"
    );
    let got = std::fs::read(run.join("adapter_model.safetensors")).unwrap();
    assert!(got == want, "the run resumed from the fallback differs");
}

/// The saved config holds absolute paths: a run resumes from any working directory, however
/// relative the paths it was started with.
#[test]
fn a_run_resumes_from_another_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        "output_dir = \"runs/rel\"\n[model]\nsource = \"tiny\"\n[adapter]\nrank = 2\n\
         [data]\ntrain = \"data/sample_chat.jsonl\"\nmax_seq_len = 48\n\
         [train]\nsteps = 2\nbatch_size = 2\nsave_every = 1\n",
    )
    .unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(work.join("data")).unwrap();
    std::fs::copy(
        root().join("data/sample_chat.jsonl"),
        work.join("data/sample_chat.jsonl"),
    )
    .unwrap();
    let mut first = train(&["--config", cfg.to_str().unwrap()]);
    first.current_dir(&work);
    succeeds(first);
    let run = work.join("runs/rel");
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        saved.contains(&work.join("data/sample_chat.jsonl").display().to_string()),
        "{saved}"
    );
    // Unfinish it, then resume from elsewhere.
    std::fs::remove_file(run.join("adapter_model.safetensors")).unwrap();
    std::fs::remove_dir_all(run.join("checkpoints/step-0000002")).unwrap();
    let mut again = train(&["--resume", run.to_str().unwrap()]);
    again.current_dir(tmp.path());
    succeeds(again);
    assert!(run.join("adapter_model.safetensors").exists());
}

/// A resume refuses a run whose config.toml was edited or whose training file changed, naming
/// the file; restored, it resumes.
#[test]
fn resume_refuses_an_edited_config_or_changed_data() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("train.jsonl");
    std::fs::copy(root().join("data/sample_chat.jsonl"), &data).unwrap();
    let run = tmp.path().join("run");
    let cfg = write_config(tmp.path(), &run);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &root().join("data/sample_chat.jsonl").display().to_string(),
        &data.display().to_string(),
    );
    std::fs::write(&cfg, text).unwrap();
    succeeds(train(&[
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "train.steps=4",
    ]));
    // Unfinish it: no final adapter, no final checkpoint.
    std::fs::remove_file(run.join("adapter_model.safetensors")).unwrap();
    std::fs::remove_dir_all(run.join("checkpoints/step-0000004")).unwrap();
    let resume = || {
        train(&["--resume", run.to_str().unwrap()])
            .output()
            .unwrap()
    };

    let saved = run.join("config.toml");
    let original = std::fs::read_to_string(&saved).unwrap();
    std::fs::write(&saved, format!("{original}# edited\n")).unwrap();
    let out = resume();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("config.toml was edited"),
        "{err}"
    );
    std::fs::write(&saved, &original).unwrap();

    let lines = std::fs::read(&data).unwrap();
    std::fs::write(&data, &lines[..lines.len() - 1]).unwrap();
    let out = resume();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("train.jsonl changed since the run read it"),
        "{err}"
    );
    std::fs::write(&data, &lines).unwrap();
    let out = resume();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
