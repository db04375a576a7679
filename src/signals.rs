//! Stopping a run without losing it: while the training loop runs, SIGINT (Ctrl-C), SIGTERM
//! and SIGUSR1 (what Slurm sends before a pre-emption or the time limit) only raise a flag; the
//! loop finishes its optimizer step, writes a checkpoint and exits 128 + the signal. A second
//! SIGINT exits at once (the last complete checkpoint stays: every write is atomic).

use std::sync::atomic::{AtomicI32, Ordering};

/// The first stop signal received, 0 for none.
static REQUESTED: AtomicI32 = AtomicI32::new(0);

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1];

extern "C" fn on_signal(signal: libc::c_int) {
    // Only async-signal-safe work here: an atomic swap, and `_exit` for a second Ctrl-C.
    let first = REQUESTED.swap(signal, Ordering::SeqCst);
    if first != 0 && signal == libc::SIGINT {
        // SAFETY: _exit is async-signal-safe and ends the process without unwinding.
        unsafe { libc::_exit(128 + libc::SIGINT) };
    }
    if first != 0 {
        REQUESTED.store(first, Ordering::SeqCst);
    }
}

/// While alive, the stop signals are caught; dropping it restores their default actions.
pub struct StopGuard(());

/// Catches the stop signals until the guard is dropped.
pub fn catch_stop_signals() -> StopGuard {
    REQUESTED.store(0, Ordering::SeqCst);
    for signal in STOP_SIGNALS {
        set_handler(
            signal,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    StopGuard(())
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        for signal in STOP_SIGNALS {
            set_handler(signal, libc::SIG_DFL);
        }
    }
}

fn set_handler(signal: libc::c_int, handler: libc::sighandler_t) {
    // SAFETY: a zeroed sigaction with a handler that only touches atomics (or SIG_DFL).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal, &action, std::ptr::null_mut());
    }
}

/// The stop signal received since [`catch_stop_signals`], if any.
pub fn requested() -> Option<i32> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// `SIGINT`, `SIGTERM`, …
pub fn name(signal: i32) -> String {
    match signal {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        other => format!("signal {other}"),
    }
}

/// A run stopped by a signal after writing its checkpoint: the process exits 128 + `signal`.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
    pub message: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Interrupted {}
