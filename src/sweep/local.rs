//! The local backend: up to `jobs` points at a time, each its own `prolora sweep task`
//! process (its own lock, its own signals), its output (progress lines) appended to
//! `logs/<point>.log`. A task dies with the sweep: a killed sweep leaves no point training
//! behind it, in the way of the rerun.

use super::Sweep;
use crate::signals;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Runs every point not yet finished; on SIGINT/SIGTERM/SIGUSR1 passes the signal on to the
/// running points (each checkpoints and stops) and waits for them.
pub fn run(dir: &Path, sweep: &Sweep, jobs: usize, gpus: usize) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the prolora binary")?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let todo: Vec<usize> = sweep
        .points
        .iter()
        // A trained point still runs when the sweep evaluates: its results may be missing or
        // made with other evaluation settings.
        .filter(|p| {
            sweep.evaluate.is_some()
                || !p.run_dir.join(crate::adapters::peft::WEIGHTS_FILE).exists()
        })
        .map(|p| p.index)
        .collect();
    crate::to_stderr!(
        "sweep {}: {} points, {} to run, {jobs} at a time",
        dir.display(),
        sweep.points.len(),
        todo.len()
    );
    let _guard = signals::catch_stop_signals();
    let mut queue = todo.into_iter();
    // (point, slot, child)
    let mut running: Vec<(usize, usize, Child)> = Vec::new();
    let mut failed = Vec::new();
    let mut stopping = None;
    loop {
        if stopping.is_none() {
            if let Some(signal) = signals::requested() {
                for (_, _, child) in &running {
                    // SAFETY: a signal to a child this process started and has not reaped.
                    unsafe { libc::kill(child.id() as i32, signal) };
                }
                stopping = Some(signal);
            }
        }
        while stopping.is_none() && running.len() < jobs {
            let Some(index) = queue.next() else { break };
            let slot = (0..jobs)
                .find(|s| running.iter().all(|r| r.1 != *s))
                .unwrap_or(0);
            let point = &sweep.points[index];
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(logs.join(format!("{}.log", point.name)))?;
            let mut cmd = Command::new(&exe);
            // Its own process group: a terminal's Ctrl-C reaches the task once, through us (a
            // second SIGINT would abort it without a checkpoint).
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            cmd.args(["sweep", "task"])
                .arg(dir)
                .args(["--index", &index.to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            dies_with_this_process(&mut cmd);
            if gpus > 0 {
                cmd.env("CUDA_VISIBLE_DEVICES", (slot % gpus).to_string());
            }
            crate::to_stderr!("start {}", point.name);
            running.push((
                index,
                slot,
                cmd.spawn().context("cannot start a sweep task")?,
            ));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut k = 0;
        while k < running.len() {
            if let Some(status) = running[k].2.try_wait()? {
                let (index, _, _) = running.remove(k);
                let name = &sweep.points[index].name;
                if status.success() {
                    crate::to_stderr!("finished {name}");
                } else {
                    crate::to_stderr!(
                        "{name} ended with {status}: see {}",
                        logs.join(format!("{name}.log")).display()
                    );
                    failed.push(name.clone());
                }
            } else {
                k += 1;
            }
        }
    }
    if let Some(signal) = stopping {
        let message = format!(
            "sweep stopped by {}: the running points wrote checkpoints; continue with the same `prolora sweep` command",
            signals::name(signal)
        );
        return Err(signals::Interrupted { signal, message }.into());
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} points failed ({}): `prolora sweep status {}` shows why",
            failed.len(),
            sweep.points.len(),
            failed.join(", "),
            dir.display()
        );
    }
    Ok(())
}

/// Has the kernel kill `cmd`'s process when this one dies. A sweep killed without a chance to
/// pass a signal on (SIGKILL, the OOM killer) would otherwise leave its points training with
/// no owner; a rerun then found them in use and reported them failed.
pub fn dies_with_this_process(cmd: &mut Command) {
    let parent = std::process::id();
    let arm = move || {
        // SAFETY: prctl and getppid are async-signal-safe, as pre_exec requires.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // This process died before the prctl: the signal will never come.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        Ok(())
    };
    // SAFETY: the closure only makes the async-signal-safe calls above.
    unsafe { std::os::unix::process::CommandExt::pre_exec(cmd, arm) };
}
