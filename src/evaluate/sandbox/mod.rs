//! A jail for one untrusted program, built from Linux namespaces with no helper binary and no
//! privilege: the unprivileged user namespaces every current distribution enables.
//!
//! prolora `clone`s a process into new user, PID, mount, network, IPC, UTS and cgroup
//! namespaces. That process maps its own user and group (nothing else is mapped), builds a
//! root of its own on a fresh tmpfs — read-only binds of `/usr`, the interpreter's own tree
//! and `/etc/ld.so.cache`, the null and random devices, a private writable `/tmp`, and nothing
//! else: no home, no `/proc`, no `/dev/shm`, no `/run` — pivots into it, and becomes the PID
//! namespace's init. It starts the program as its only child: own session, rlimits, every
//! capability dropped, `no_new_privs`, the [`seccomp`] filter, descriptors 0–4 only. So the
//! program sees no other process and can signal none (init ignores what it has no handler
//! for), has only a loopback that is down, cannot ptrace, mount or start a process, and when
//! init ends — the program exited, or prolora killed init at the deadline — the kernel kills
//! everything left in the namespace.
//!
//! Between the `clone` and the program's `execve` only system calls run, on memory prepared
//! before: prolora is multi-threaded, and a lock another thread held stays held in the copy.

pub mod seccomp;

use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What to run and what it gets.
pub struct Jail<'a> {
    /// The interpreter, as a path that resolves inside the jail (under `/usr` or `readable`).
    pub executable: &'a Path,
    /// Its arguments after argv[0].
    pub args: &'a [&'a str],
    /// Its whole environment.
    pub env: &'a [(&'a str, &'a str)],
    /// Files written into the jail's `/tmp` (its working directory) before it starts.
    pub files: &'a [(&'a str, &'a [u8])],
    /// Descriptors of prolora's handed to the program as (prolora's, the program's number):
    /// numbers 1 to 4; 0 is `/dev/null`, and the program holds nothing else.
    pub fds: &'a [(RawFd, RawFd)],
    /// Host directories outside `/usr` it may read, bound read-only at the same path.
    pub readable: &'a [PathBuf],
    /// Resource limits (RLIMIT_*, value), lowered to the hard limits prolora has.
    pub rlimits: &'a [(libc::__rlimit_resource_t, u64)],
    /// From the start; past it everything in the jail is killed.
    pub deadline: Duration,
    /// A private directory of prolora's, for the jail's mount point.
    pub scratch: &'a Path,
}

/// How the jail's init ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The program exited with this status (128 + n when signal n killed it).
    Status(i32),
    /// Still running at the deadline: killed with all it started.
    Killed,
}

/// Runs `jail`; an error means the jail could not be built (no user namespaces, a missing
/// interpreter, …), never that the program misbehaved.
pub fn run(jail: &Jail) -> Result<Exit> {
    let root = jail.scratch.join("root");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&root)
        .with_context(|| format!("cannot create {}", root.display()))?;
    let exit = Prepared::new(jail, &root).and_then(|p| p.run(jail.deadline));
    // Only a mount point: the jail's files lived in its own namespace and are gone with it.
    let removed =
        std::fs::remove_dir(&root).with_context(|| format!("cannot remove {}", root.display()));
    let exit = exit?;
    removed?;
    Ok(exit)
}

/// One change to the jail's root, under the scratch mount point.
enum Step {
    Dir(CString),
    File(CString),
    Link {
        target: CString,
        path: CString,
    },
    Tmpfs {
        path: CString,
        options: CString,
    },
    /// A recursive bind; `remount` the flags to put on it after (none: as the source's).
    Bind {
        source: CString,
        path: CString,
        remount: Option<libc::c_ulong>,
    },
    Write {
        path: CString,
        bytes: Vec<u8>,
    },
    /// A tmpfs made read-only once filled.
    ReadOnly(CString),
}

/// Everything the jail's processes use, made before the `clone`.
struct Prepared {
    root: CString,
    steps: Vec<Step>,
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    executable: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    fds: Vec<(RawFd, RawFd)>,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    filter: Vec<libc::sock_filter>,
}

fn c(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{}: a path with a NUL byte", path.display()))
}

/// Read-only, no set-uid, no devices, and no-exec where the source is (a flag the kernel
/// would not let a user namespace clear).
fn read_only_flags(source: &Path) -> Result<libc::c_ulong> {
    let path = c(source)?;
    // SAFETY: statvfs fills the zeroed struct it is given.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("{}: cannot read its mount", source.display()));
    }
    Ok(libc::MS_REMOUNT
        | libc::MS_BIND
        | libc::MS_RDONLY
        | libc::MS_NOSUID
        | libc::MS_NODEV
        | (st.f_flag & libc::ST_NOEXEC))
}

impl Prepared {
    fn new(jail: &Jail, scratch: &Path) -> Result<Self> {
        if let Some(&(_, n)) = jail.fds.iter().find(|(_, n)| !(1..=4).contains(n)) {
            bail!("the sandbox hands descriptors 1 to 4, not {n}");
        }
        let inside = |p: &Path| scratch.join(p.strip_prefix("/").unwrap_or(p));
        let mut steps = vec![Step::Tmpfs {
            path: c(scratch)?,
            options: CString::new("size=1m,mode=0755")?,
        }];
        let mut dirs = BTreeSet::new();
        let mut dir = |steps: &mut Vec<Step>, p: &Path| -> Result<()> {
            // Parents first; each once.
            let mut chain: Vec<&Path> = p.ancestors().filter(|a| a.parent().is_some()).collect();
            chain.reverse();
            for a in chain {
                if dirs.insert(a.to_path_buf()) {
                    steps.push(Step::Dir(c(&inside(a))?));
                }
            }
            Ok(())
        };
        // The top-level library and binary directories: links where the system merged them
        // into /usr, read-only binds where it did not.
        for top in [
            "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr",
        ] {
            let top = Path::new(top);
            match std::fs::symlink_metadata(top) {
                Ok(m) if m.file_type().is_symlink() => steps.push(Step::Link {
                    target: c(&std::fs::read_link(top)?)?,
                    path: c(&inside(top))?,
                }),
                Ok(m) if m.is_dir() => {
                    dir(&mut steps, top)?;
                    steps.push(Step::Bind {
                        source: c(top)?,
                        path: c(&inside(top))?,
                        remount: Some(read_only_flags(top)?),
                    });
                }
                _ => {}
            }
        }
        for extra in jail.readable {
            if !extra.is_absolute() || extra.parent().is_none() || !extra.is_dir() {
                bail!("{}: not a directory the sandbox can show", extra.display());
            }
            if extra.starts_with("/usr") || extra.starts_with("/tmp") || extra.starts_with("/dev") {
                continue;
            }
            dir(&mut steps, extra)?;
            steps.push(Step::Bind {
                source: c(extra)?,
                path: c(&inside(extra))?,
                remount: Some(read_only_flags(extra)?),
            });
        }
        // Where the dynamic loader finds the multiarch libraries.
        let cache = Path::new("/etc/ld.so.cache");
        if cache.is_file() {
            dir(&mut steps, Path::new("/etc"))?;
            steps.push(Step::File(c(&inside(cache))?));
            steps.push(Step::Bind {
                source: c(cache)?,
                path: c(&inside(cache))?,
                remount: Some(read_only_flags(cache)?),
            });
        }
        let dev = Path::new("/dev");
        dir(&mut steps, dev)?;
        steps.push(Step::Tmpfs {
            path: c(&inside(dev))?,
            options: CString::new("size=64k,mode=0755")?,
        });
        for name in ["null", "zero", "random", "urandom"] {
            let device = dev.join(name);
            steps.push(Step::File(c(&inside(&device))?));
            steps.push(Step::Bind {
                source: c(&device)?,
                path: c(&inside(&device))?,
                remount: None,
            });
        }
        steps.push(Step::ReadOnly(c(&inside(dev))?));
        let tmp = Path::new("/tmp");
        dir(&mut steps, tmp)?;
        steps.push(Step::Tmpfs {
            path: c(&inside(tmp))?,
            options: CString::new("size=64m,mode=0700")?,
        });
        for (name, bytes) in jail.files {
            if name.contains('/') {
                bail!("{name}: a file of the sandbox's /tmp, not a path");
            }
            steps.push(Step::Write {
                path: c(&inside(&tmp.join(name)))?,
                bytes: bytes.to_vec(),
            });
        }
        // SAFETY: these only read the calling process's ids.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let rlimits = jail
            .rlimits
            .iter()
            .map(|&(resource, wanted)| {
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
            })
            .collect();
        let mut argv = vec![c(jail.executable)?];
        for a in jail.args {
            argv.push(CString::new(*a)?);
        }
        Ok(Prepared {
            root: c(scratch)?,
            steps,
            uid_map: format!("{uid} {uid} 1").into_bytes(),
            gid_map: format!("{gid} {gid} 1").into_bytes(),
            executable: c(jail.executable)?,
            argv,
            env: jail
                .env
                .iter()
                .map(|(k, v)| CString::new(format!("{k}={v}")))
                .collect::<Result<_, _>>()?,
            fds: jail.fds.to_vec(),
            rlimits,
            filter: seccomp::filter()?,
        })
    }

    fn run(&self, deadline: Duration) -> Result<Exit> {
        let started = Instant::now();
        let argv: Vec<*const libc::c_char> = self
            .argv
            .iter()
            .map(|a| a.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        let envp: Vec<*const libc::c_char> = self
            .env
            .iter()
            .map(|a| a.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        // Where a jail process reports the stage that failed.
        let (errors, report) = pipe()?;
        // Held by us alone: the jail goes on only once it is sure to die with us.
        let (lifeline, alive) = pipe()?;
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(errors.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let flags = libc::CLONE_NEWUSER
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWCGROUP
            | libc::SIGCHLD;
        // SAFETY: a fork with namespaces: the child runs `init` and never returns; it only
        // makes system calls on memory prepared above.
        let pid = unsafe { libc::syscall(libc::SYS_clone, flags as libc::c_long, 0, 0, 0, 0) };
        if pid == 0 {
            // SAFETY: in the child, see above.
            unsafe {
                self.init(
                    report.as_raw_fd(),
                    (lifeline.as_raw_fd(), alive.as_raw_fd()),
                    &argv,
                    &envp,
                )
            }
        }
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            bail!(
                "HumanEval's sandbox needs unprivileged user namespaces, and this system refuses \
                 them ({e}); enable them (sysctl kernel.unprivileged_userns_clone=1, \
                 user.max_user_namespaces > 0, or on Ubuntu \
                 kernel.apparmor_restrict_unprivileged_userns=0) or run where they are allowed"
            );
        }
        let pid = pid as libc::pid_t;
        drop(report);
        drop(lifeline);
        // SAFETY: one byte from a local.
        unsafe { libc::write(alive.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        drop(alive);
        let left = deadline.saturating_sub(started.elapsed());
        let exited = exits_within(pid, left);
        let mut status = 0;
        // SAFETY: kill and waitpid on our own child; killing init kills the namespace.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, &mut status, 0);
        }
        let exited = exited.context("cannot wait for the sandbox")?;
        if let Some((stage, errno)) = read_failure(&errors) {
            bail!(
                "HumanEval's sandbox could not be built: {}: {} (where a security module limits \
                 user namespaces, allow them: on Ubuntu, sysctl \
                 kernel.apparmor_restrict_unprivileged_userns=0)",
                self.stage(stage),
                std::io::Error::from_raw_os_error(errno)
            );
        }
        if !exited {
            return Ok(Exit::Killed);
        }
        Ok(Exit::Status(if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        }))
    }

    /// What failed, for a stage number that [`Prepared::init`] reported.
    fn stage(&self, stage: u32) -> String {
        match stage {
            STAGE_MAPS => "mapping the user and group (/proc/self/uid_map, gid_map)".into(),
            STAGE_PRIVATE => "making the mounts private".into(),
            STAGE_PIVOT => "entering the new root (pivot_root)".into(),
            STAGE_FORK => "starting the program".into(),
            STAGE_FDS => "handing over descriptors".into(),
            STAGE_LIMITS => "setting resource limits".into(),
            STAGE_PRIVILEGES => "dropping privileges and loading the seccomp filter".into(),
            STAGE_EXEC => format!("running {}", self.executable.to_string_lossy()),
            s if s >= STAGE_STEPS => match self.steps.get((s - STAGE_STEPS) as usize) {
                Some(Step::Dir(p) | Step::File(p) | Step::Write { path: p, .. }) => {
                    format!("creating {}", p.to_string_lossy())
                }
                Some(Step::Link { path, .. }) => format!("linking {}", path.to_string_lossy()),
                Some(Step::Tmpfs { path, .. } | Step::ReadOnly(path)) => {
                    format!("mounting a tmpfs on {}", path.to_string_lossy())
                }
                Some(Step::Bind { source, .. }) => {
                    format!("showing {} read-only", source.to_string_lossy())
                }
                None => format!("step {s}"),
            },
            s => format!("step {s}"),
        }
    }

    /// The namespaces' init: builds the root, starts the program, waits for it. Only system
    /// calls from here on, and it never returns.
    unsafe fn init(
        &self,
        report: RawFd,
        (lifeline, alive): (RawFd, RawFd),
        argv: &[*const libc::c_char],
        envp: &[*const libc::c_char],
    ) -> ! {
        let ok = |rc: libc::c_int, stage: u32| check(rc, report, stage);
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        libc::close(alive);
        let mut byte = 0u8;
        if libc::read(lifeline, (&mut byte as *mut u8).cast(), 1) != 1 {
            // prolora died before we could die with it.
            libc::_exit(1);
        }
        // Our /proc files belong to the user only while we are dumpable (prolora is not,
        // while programs run); undumpable again at once, so the program cannot read us.
        libc::prctl(libc::PR_SET_DUMPABLE, 1 as libc::c_ulong, 0, 0, 0);
        let maps = write_file(c"/proc/self/setgroups", b"deny")
            && write_file(c"/proc/self/uid_map", &self.uid_map)
            && write_file(c"/proc/self/gid_map", &self.gid_map);
        libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0);
        ok(if maps { 0 } else { -1 }, STAGE_MAPS);
        let none = std::ptr::null::<libc::c_char>();
        let no_data = std::ptr::null::<libc::c_void>();
        ok(
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                no_data,
            ),
            STAGE_PRIVATE,
        );
        for (i, step) in self.steps.iter().enumerate() {
            let stage = STAGE_STEPS + i as u32;
            match step {
                Step::Dir(p) => ok(libc::mkdir(p.as_ptr(), 0o755), stage),
                Step::File(p) => {
                    let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC;
                    let fd = libc::open(p.as_ptr(), flags, 0o644);
                    ok(fd, stage);
                    libc::close(fd);
                }
                Step::Link { target, path } => {
                    ok(libc::symlink(target.as_ptr(), path.as_ptr()), stage)
                }
                Step::Tmpfs { path, options } => ok(
                    libc::mount(
                        c"tmpfs".as_ptr(),
                        path.as_ptr(),
                        c"tmpfs".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV,
                        options.as_ptr().cast(),
                    ),
                    stage,
                ),
                Step::Bind {
                    source,
                    path,
                    remount,
                } => {
                    let bind = libc::MS_BIND | libc::MS_REC;
                    ok(
                        libc::mount(source.as_ptr(), path.as_ptr(), none, bind, no_data),
                        stage,
                    );
                    if let Some(flags) = remount {
                        ok(
                            libc::mount(none, path.as_ptr(), none, *flags, no_data),
                            stage,
                        );
                    }
                }
                Step::Write { path, bytes } => {
                    ok(if write_new_file(path, bytes) { 0 } else { -1 }, stage)
                }
                Step::ReadOnly(path) => {
                    let flags =
                        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
                    ok(
                        libc::mount(none, path.as_ptr(), none, flags, no_data),
                        stage,
                    )
                }
            }
        }
        ok(libc::chdir(self.root.as_ptr()), STAGE_PIVOT);
        let pivot = libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr());
        ok(pivot as libc::c_int, STAGE_PIVOT);
        ok(libc::umount2(c".".as_ptr(), libc::MNT_DETACH), STAGE_PIVOT);
        ok(libc::chdir(c"/".as_ptr()), STAGE_PIVOT);
        let read_only =
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
        ok(
            libc::mount(none, c"/".as_ptr(), none, read_only, no_data),
            STAGE_PIVOT,
        );
        let child = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0);
        ok(child as libc::c_int, STAGE_FORK);
        if child == 0 {
            self.program(report, argv, envp)
        }
        // init keeps nothing open: the program's descriptors are its own.
        close_from(0);
        loop {
            let mut status = 0;
            let pid = libc::waitpid(-1, &mut status, 0);
            if pid == child as libc::pid_t {
                libc::_exit(if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                });
            }
            if pid < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(126);
            }
        }
    }

    /// The program's process: descriptors, limits, no privileges, the filter, exec.
    unsafe fn program(
        &self,
        report: RawFd,
        argv: &[*const libc::c_char],
        envp: &[*const libc::c_char],
    ) -> ! {
        let ok = |rc: libc::c_int, stage: u32| check(rc, report, stage);
        ok(libc::setsid(), STAGE_FDS);
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        // Copies above every number handed out, so that no target overwrites a source.
        let mut high = [-1; 4];
        for (i, &(source, _)) in self.fds.iter().enumerate().take(high.len()) {
            high[i] = libc::fcntl(source, libc::F_DUPFD_CLOEXEC, 64);
            ok(high[i], STAGE_FDS);
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        ok(null, STAGE_FDS);
        ok(libc::dup2(null, 0), STAGE_FDS);
        for (i, &(_, target)) in self.fds.iter().enumerate().take(high.len()) {
            ok(libc::dup2(high[i], target), STAGE_FDS);
        }
        ok(libc::dup3(report, REPORT_FD, libc::O_CLOEXEC), STAGE_FDS);
        let ok = |rc: libc::c_int, stage: u32| check(rc, REPORT_FD, stage);
        close_from(REPORT_FD as libc::c_uint + 1);
        for (resource, limit) in &self.rlimits {
            ok(libc::setrlimit(*resource, limit), STAGE_LIMITS);
        }
        // Root inside the namespace keeps its capabilities across exec unless the bounding
        // set, the ambient set and the process's own sets are all emptied.
        for cap in 0..64 {
            libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
        }
        let clear_all = libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong;
        libc::prctl(libc::PR_CAP_AMBIENT, clear_all, 0, 0, 0);
        let header = CapHeader {
            version: 0x2008_0522,
            pid: 0,
        };
        let data = [CapData::default(); 2];
        let capset = libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr());
        ok(capset as libc::c_int, STAGE_PRIVILEGES);
        ok(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0),
            STAGE_PRIVILEGES,
        );
        let filter = libc::sock_fprog {
            len: self.filter.len() as libc::c_ushort,
            filter: self.filter.as_ptr().cast_mut(),
        };
        ok(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &filter as *const libc::sock_fprog,
            ),
            STAGE_PRIVILEGES,
        );
        ok(libc::chdir(c"/tmp".as_ptr()), STAGE_EXEC);
        libc::execve(self.executable.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(REPORT_FD, STAGE_EXEC)
    }
}

/// The program's descriptor for reporting a failed exec (closed by a successful one).
const REPORT_FD: RawFd = 5;

const STAGE_MAPS: u32 = 1;
const STAGE_PRIVATE: u32 = 2;
const STAGE_PIVOT: u32 = 3;
const STAGE_FORK: u32 = 4;
const STAGE_FDS: u32 = 5;
const STAGE_LIMITS: u32 = 6;
const STAGE_PRIVILEGES: u32 = 7;
const STAGE_EXEC: u32 = 8;
const STAGE_STEPS: u32 = 100;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot make a pipe");
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Ends the process, reporting `stage` and errno on `report`, when `rc` is negative.
unsafe fn check(rc: libc::c_int, report: RawFd, stage: u32) {
    if rc < 0 {
        fail(report, stage)
    }
}

unsafe fn fail(report: RawFd, stage: u32) -> ! {
    let errno = *libc::__errno_location();
    let mut record = [0u8; 8];
    record[..4].copy_from_slice(&stage.to_ne_bytes());
    record[4..].copy_from_slice(&errno.to_ne_bytes());
    libc::write(report, record.as_ptr().cast(), record.len());
    libc::_exit(127)
}

/// The stage and errno a jail process reported, if one did.
fn read_failure(errors: &OwnedFd) -> Option<(u32, i32)> {
    let mut record = [0u8; 8];
    // SAFETY: reads into a local buffer; the descriptor is non-blocking.
    let n = unsafe { libc::read(errors.as_raw_fd(), record.as_mut_ptr().cast(), record.len()) };
    (n == 8).then(|| {
        (
            u32::from_ne_bytes(record[..4].try_into().expect("4 bytes")),
            i32::from_ne_bytes(record[4..].try_into().expect("4 bytes")),
        )
    })
}

/// Writes `bytes` to an existing file; false on any failure.
unsafe fn write_file(path: &CStr, bytes: &[u8]) -> bool {
    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    fd >= 0 && write_all(fd, bytes) & (libc::close(fd) == 0)
}

/// Creates `path` and writes `bytes` to it; false on any failure.
unsafe fn write_new_file(path: &CStr, bytes: &[u8]) -> bool {
    let fd = libc::open(
        path.as_ptr(),
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
        0o600,
    );
    fd >= 0 && write_all(fd, bytes) & (libc::close(fd) == 0)
}

unsafe fn write_all(fd: RawFd, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        if n <= 0 {
            return false;
        }
        bytes = &bytes[n as usize..];
    }
    true
}

/// Closes every descriptor from `first` up.
unsafe fn close_from(first: libc::c_uint) {
    if libc::syscall(libc::SYS_close_range, first, libc::c_uint::MAX, 0) != 0 {
        // Before Linux 5.9.
        for fd in first..4096 {
            libc::close(fd as RawFd);
        }
    }
}

/// Whether the child `pid` exits within `timeout`. It stays unreaped (WNOWAIT).
fn exits_within(pid: libc::pid_t, timeout: Duration) -> std::io::Result<bool> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        // SAFETY: waitid fills the zeroed siginfo_t it is given.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        if unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) } != 0 {
            return Err(std::io::Error::last_os_error());
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
