//! Lines for the person at the other end of stdout and stderr. `println!` and `eprintln!`
//! panic when the reader has gone (`prolora train … 2>&1 | head` closes the pipe), and a panic
//! ends the run; a lost line must never cost a run, so these drop the line instead.

use std::fmt::Arguments;
use std::io::Write;

/// Writes to stderr; a closed or failing stderr loses the text, nothing else.
pub fn write_err(text: Arguments) {
    let _ = std::io::stderr().lock().write_fmt(text);
}

/// Writes to stdout and flushes; a closed or failing stdout loses the text, nothing else.
pub fn write_out(text: Arguments) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(text).and_then(|_| out.flush());
}

/// `eprintln!` that never panics.
#[macro_export]
macro_rules! to_stderr {
    ($($arg:tt)*) => {
        $crate::console::write_err(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `println!` that never panics.
#[macro_export]
macro_rules! to_stdout {
    ($($arg:tt)*) => {
        $crate::console::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}
