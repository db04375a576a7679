//! `prolora sweep` on this machine: the grid, idempotent reruns, a Ctrl-C that keeps every
//! point's progress, and `sweep status` on points in every state.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{prolora, root};

fn sweep_args<'a>(out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "sweep",
        "--config",
        "configs/demo.toml",
        "--grid",
        "optim.lr=1e-3,2e-3",
        "--set",
        steps,
        "--set",
        "train.eval_every=0",
        "--set",
        "train.batch_size=4",
        "--out",
        out,
    ]
}

fn adapter(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("adapter_model.safetensors")).unwrap()
}

fn status(dir: &str) -> serde_json::Value {
    let o = prolora(&["sweep", "status", dir, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn an_interrupted_sweep_continues_to_the_same_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let steps = "train.steps=20";

    // Uninterrupted.
    let o = prolora(&sweep_args(a, steps));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Interrupted by SIGINT once the first point has logged a few steps, then the same command.
    let child = Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args(sweep_args(b, steps))
        .current_dir(root())
        .env("HF_HUB_OFFLINE", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = Path::new(b).join("runs/optim.lr=1e-3/metrics.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.matches("\"loss\"").count()) < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the point never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("sweep stopped by SIGINT"), "{err}");
    let s = status(b);
    assert_eq!(s[0]["state"], "interrupted", "{s}");
    assert_eq!(s[1]["state"], "pending", "{s}");

    let o = prolora(&sweep_args(b, steps));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for point in ["optim.lr=1e-3", "optim.lr=2e-3"] {
        let (x, y) = (
            Path::new(a).join("runs").join(point),
            Path::new(b).join("runs").join(point),
        );
        assert!(adapter(&x) == adapter(&y), "{point}: adapters differ");
    }
    let s = status(b);
    assert!(
        s.as_array()
            .unwrap()
            .iter()
            .all(|p| p["state"] == "finished"),
        "{s}"
    );

    // Rerunning a finished sweep runs nothing; the tables of both sweeps are the same.
    let o = prolora(&sweep_args(b, steps));
    assert!(String::from_utf8_lossy(&o.stderr).contains("0 to run"));
    let table = |d: &str| String::from_utf8(prolora(&["collect", d]).stdout).unwrap();
    assert_eq!(table(a), table(b));

    // Another grid into the same directory is refused.
    let o = prolora(&sweep_args(b, "train.steps=21"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("holds another sweep")
            && err.contains("--set train.steps=21 (it had --set train.steps=20)"),
        "{err}"
    );
}

#[test]
fn bad_grids_are_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    let out = out.to_str().unwrap();
    let err = |extra: &[&str]| {
        let mut args = vec!["sweep", "--config", "configs/demo.toml", "--out", out];
        args.extend(extra);
        let o = prolora(&args);
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = err(&["--grid", "optim.learning_rate=1,2"]);
    assert!(e.contains("learning_rate"), "{e}");
    let e = err(&["--grid", "optim.lr=1e-3,2e-3", "--set", "optim.lr=1e-4"]);
    assert!(e.contains("conflicts with --set optim.lr=1e-4"), "{e}");
    let e = err(&["--grid", "optim.lr=-1,1e-3"]);
    assert!(
        e.contains("optim.lr") && e.contains("grid point optim.lr=-1"),
        "{e}"
    );
    assert!(!Path::new(out).exists(), "nothing written");
    let e = err(&["--grid", "seed=1,2", "--slurm-args", "--partition=gpu"]);
    assert!(e.contains("--backend slurm only"), "{e}");
}

/// `sweep status` tells a failed point (with its error) and a running one (with its owner)
/// from finished and pending ones.
#[test]
fn status_names_failed_and_running_points() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    let out = out.to_str().unwrap();
    // max_seq_len 2 leaves no example with a label token: the point fails when it loads data.
    let o = prolora(&[
        "sweep",
        "--config",
        "configs/demo.toml",
        "--grid",
        "data.max_seq_len=2,64",
        "--set",
        "train.steps=200",
        "--set",
        "train.eval_every=0",
        "--out",
        out,
        "--dry-run",
    ]);
    assert!(o.status.success());
    let plan = String::from_utf8(o.stdout).unwrap();
    assert!(plan.starts_with("0\tdata.max_seq_len=2\t"), "{plan}");
    assert!(!Path::new(out).exists(), "a dry run writes nothing");

    let mut child = Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args([
            "sweep",
            "--config",
            "configs/demo.toml",
            "--grid",
            "data.max_seq_len=2,64",
            "--set",
            "train.steps=200",
            "--set",
            "train.eval_every=0",
            "--out",
            out,
        ])
        .current_dir(root())
        .env("HF_HUB_OFFLINE", "1")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let metrics = Path::new(out).join("runs/data.max_seq_len=64/metrics.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.matches("\"loss\"").count()) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the second point never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = status(out);
    assert_eq!(s[0]["state"], "failed", "{s}");
    assert!(s[0]["detail"].as_str().unwrap().contains("data"), "{s}");
    assert_eq!(s[1]["state"], "running", "{s}");
    assert!(s[1]["detail"].as_str().unwrap().starts_with("pid "), "{s}");
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(143));
    assert_eq!(status(out)[1]["state"], "interrupted");
}

/// `--evaluate`: each point is evaluated once it has trained, `collect` gains the benchmark's
/// column with mean ± std over the seeds, and a rerun evaluates nothing again.
#[test]
fn evaluated_points_show_in_collect_and_are_not_evaluated_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    let out = out.to_str().unwrap();
    let args = [
        "sweep",
        "--config",
        "configs/demo.toml",
        "--grid",
        "seed=1,2",
        "--set",
        "train.steps=4",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.batch_size=4",
        "--out",
        out,
        "--evaluate",
        "mmlu",
        "--eval-data-dir",
        "data/eval",
    ];
    let o = prolora(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let results = |seed: u32| Path::new(out).join(format!("runs/seed={seed}/eval/mmlu.json"));
    let score = |seed: u32| -> f64 {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(results(seed)).unwrap()).unwrap();
        assert_eq!(v["examples"].as_array().unwrap().len(), 16);
        100.0 * v["metrics"]["average_acc"].as_f64().unwrap()
    };
    let (s1, s2) = (score(1), score(2));
    let table = String::from_utf8(prolora(&["collect", out]).stdout).unwrap();
    assert!(table.contains("MMLU (EM)"), "{table}");
    let mean = (s1 + s2) / 2.0;
    let std = ((s1 - mean).powi(2) + (s2 - mean).powi(2)).sqrt();
    assert!(
        table.contains(&format!("{mean:.2} ± {std:.2}")),
        "{s1} {s2}\n{table}"
    );

    let before = std::fs::metadata(results(1)).unwrap().modified().unwrap();
    let o = prolora(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::metadata(results(1)).unwrap().modified().unwrap(),
        before
    );

    // Other evaluation data: every point is evaluated again, on it.
    let other = tmp.path().join("eval");
    std::fs::create_dir_all(other.join("mmlu")).unwrap();
    for dir in ["dev", "test"] {
        let (from, to) = (
            root().join("data/eval/mmlu").join(dir),
            other.join("mmlu").join(dir),
        );
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(from).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
    let mut moved = args.to_vec();
    let at = moved.len() - 1;
    moved[at] = other.to_str().unwrap();
    let o = prolora(&moved);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for seed in [1, 2] {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(results(seed)).unwrap()).unwrap();
        assert_eq!(
            v["identity"]["options"]["data_dir"],
            other.canonicalize().unwrap().to_str().unwrap(),
            "seed {seed}"
        );
    }

    // HumanEval without consent is refused before anything runs.
    let mut bad = args.to_vec();
    let at = bad.len() - 3;
    bad[at] = "humaneval";
    let o = prolora(&bad);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--allow-code-execution"));
}

/// Whether process `pid` is alive (a zombie waiting to be reaped is not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// A second sweep on the same --out is refused naming the first one's pid; a SIGKILLed sweep
/// takes its running point with it, and the same command then finishes every point.
#[test]
fn a_sweep_has_one_owner_and_its_points_die_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    let out = out.to_str().unwrap();
    let steps = "train.steps=60";
    let mut first = Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args(sweep_args(out, steps))
        .current_dir(root())
        .env("HF_HUB_OFFLINE", "1")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let run = Path::new(out).join("runs/optim.lr=1e-3");
    let started = Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl"))
        .map_or(0, |t| t.matches("\"loss\"").count())
        < 2
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the point never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let second = prolora(&sweep_args(out, steps));
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: --out ") && err.contains(&format!("pid {}", first.id())),
        "{err}"
    );

    // The point's own process, as its run directory's lock names it.
    let holder = std::fs::read_to_string(run.join(".lock")).unwrap();
    let point: u32 = holder
        .strip_prefix("pid ")
        .and_then(|h| h.split(',').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{holder}"));
    assert!(alive(point));
    first.kill().unwrap();
    first.wait().unwrap();
    let killed = Instant::now();
    while alive(point) {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the point trains on after its sweep was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let o = prolora(&sweep_args(out, steps));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = status(out);
    assert!(
        s.as_array()
            .unwrap()
            .iter()
            .all(|p| p["state"] == "finished"),
        "{s}"
    );
    // Its log holds the points' progress lines.
    let log = std::fs::read_to_string(Path::new(out).join("logs/optim.lr=2e-3.log")).unwrap();
    assert!(log.contains("step 60/60 loss "), "{log}");
}

/// A newline in --out would become a shell line of the Slurm script: refused.
#[test]
fn a_slurm_sweep_refuses_a_control_character_in_its_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s\ntouch pwned");
    let mut args = sweep_args(out.to_str().unwrap(), "train.steps=2");
    args.extend(["--backend", "slurm", "--dry-run"]);
    let o = prolora(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        err.starts_with("error: --out ") && err.contains("control character"),
        "{err}"
    );
}
