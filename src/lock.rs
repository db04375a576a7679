//! Advisory locks between prolora processes: a `flock` on a lock file, shared or exclusive,
//! never waited for (a second process is refused at once, naming the holder). The kernel drops
//! the lock of a process that dies, so a killed holder never blocks the next.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Held by any number of processes at once, none holding it exclusively.
    Shared,
    /// Held by one process alone.
    Exclusive,
}

/// A held lock; released when dropped.
pub struct Lock {
    file: File,
    /// The lock file, removed on release (only for an exclusive lock nobody else shares).
    remove: Option<PathBuf>,
}

/// Takes `mode` on the lock file `path` (created if needed) and records this process in it
/// ("pid P, started T"); `Ok(Err(holder))` when another process holds it in a conflicting mode,
/// with what the holder recorded.
pub fn try_lock(path: &Path, mode: Mode) -> Result<std::result::Result<Lock, String>> {
    let mut file = open(path)?;
    if !flock(&file, mode) {
        return Ok(Err(holder(path)));
    }
    // Shared holders each write their line; the file then names the latest.
    file.set_len(0)
        .and_then(|_| write!(file, "{}", this_process()))
        .and_then(|_| file.flush())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Ok(Lock { file, remove: None }))
}

/// An exclusive lock on `path` whose file is removed again on release, so no lock file is
/// left beside an output. A process that took the lock of a file removed meanwhile tries again
/// on the new one.
pub fn try_lock_removed_after(path: &Path) -> Result<std::result::Result<Lock, String>> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let mut lock = match try_lock(path, Mode::Exclusive)? {
            Ok(lock) => lock,
            Err(holder) => return Ok(Err(holder)),
        };
        let held = lock.file.metadata()?.ino();
        if std::fs::metadata(path).is_ok_and(|m| m.ino() == held) {
            lock.remove = Some(path.to_path_buf());
            return Ok(Ok(lock));
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Removed while still held: a process that opened it before sees it gone and retries.
        if let Some(path) = &self.remove {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Whether a lock on `path` could be taken in `mode` now (taken and dropped at once).
pub fn is_free(path: &Path, mode: Mode) -> bool {
    File::open(path).map_or(true, |file| flock(&file, mode))
}

/// What the holder of `path` recorded ("pid P, started T"), or "owner unknown".
pub fn holder(path: &Path) -> String {
    match std::fs::read_to_string(path).unwrap_or_default().trim() {
        "" => "owner unknown".into(),
        h => h.to_string(),
    }
}

fn open(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// Takes `mode` on `file` without waiting; false when another process holds a conflicting one.
fn flock(file: &File, mode: Mode) -> bool {
    let op = match mode {
        Mode::Shared => libc::LOCK_SH,
        Mode::Exclusive => libc::LOCK_EX,
    };
    // SAFETY: flock on a file descriptor `file` owns.
    unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) == 0 }
}

/// "pid P, started T" of this process.
fn this_process() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("pid {}, started {}", std::process::id(), utc_time(now))
}

/// `2026-12-02 16:21:07 UTC` for seconds since 1970.
fn utc_time(secs: u64) -> String {
    // Days to a civil date (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let t = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_times_match_the_civil_calendar() {
        // Values from Python's datetime.utcfromtimestamp.
        for (secs, want) in [
            (0, "1970-01-01 00:00:00 UTC"),
            (951_782_400, "2000-02-29 00:00:00 UTC"),
            (1_796_231_222, "2026-12-02 17:07:02 UTC"),
            (4_102_444_799, "2099-12-31 23:59:59 UTC"),
        ] {
            assert_eq!(super::utc_time(secs), want);
        }
    }

    #[test]
    fn shared_holders_exclude_an_exclusive_one_and_back() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(".lock");
        let a = super::try_lock(&path, super::Mode::Shared)
            .unwrap()
            .unwrap();
        let b = super::try_lock(&path, super::Mode::Shared)
            .unwrap()
            .unwrap();
        let refused = super::try_lock(&path, super::Mode::Exclusive).unwrap();
        assert!(refused.err().unwrap().starts_with("pid "));
        drop((a, b));
        let x = super::try_lock(&path, super::Mode::Exclusive)
            .unwrap()
            .unwrap();
        assert!(super::try_lock(&path, super::Mode::Shared)
            .unwrap()
            .is_err());
        drop(x);
    }

    #[test]
    fn a_removed_after_lock_leaves_no_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(".out.lock");
        let held = super::try_lock_removed_after(&path).unwrap().unwrap();
        assert!(super::try_lock_removed_after(&path).unwrap().is_err());
        drop(held);
        assert!(!path.exists());
    }
}
