//! The threads of one decoding step, kept busy between its products.
//!
//! A decoding step is about a hundred and fifty small parallel loops (the products of every
//! layer, its attention, the head) with a little serial work between them. On rayon each loop
//! wakes the other workers, which have gone to sleep in the gaps: a futex and a context switch
//! per loop, about as long as a small product itself. Inside [`run`] the other workers stay in
//! the step instead, spinning on the next loop ([`for_each_mut`]) as llama.cpp's threads do.
//! Each loop is cut into one contiguous share per thread, claimed index by index through the
//! share's atomic counter; a thread takes its own share first, then helps with the others'.
//! The caller's thread takes part too, so a loop finishes even when no helper has started (a
//! worker busy elsewhere, or the helper's job still queued on the caller's own deque).
//!
//! Spinning costs cores that a busy machine's other processes want, and a helper that loses its
//! core mid-loop makes the caller wait: when the caller's thread has run less than 80 % of its
//! steps' time of late, the next 64 steps run on rayon (whole decodes beside two busy loops of
//! another process went 1.3–1.6× slower on a team without this). "Of late" is a running mean
//! that halves the weight of older steps at each step: one step cut short by a moment's
//! descheduling (a virtual machine's host, a page fault) no longer sends 64 steps to rayon.
//!
//! Between loops, while the caller works alone, an idle helper reads ahead: the model names the
//! memory the next loop streams ([`prefetch`]), and each helper brings the share it will take
//! first into its own cache.
//!
//! Outside [`run`] the loops are rayon's: training, full forwards and serving keep its work
//! stealing.

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rayon::prelude::*;

/// Spins of an idle helper between two yields of its core (to a thread that needs it, such as
/// candle's own pool; a yield with nobody waiting returns at once).
const SPINS_PER_YIELD: u32 = 64;

/// The caller's share of its steps' time (a running mean, [`SHARE_WEIGHT`] on the newest step)
/// below which other processes have its cores: on a busy machine spinning helpers take the
/// cores that the step's own threads need, so the next [`BACK_OFF`] steps run on rayon's pool,
/// whose sleeping workers cost nothing when cores are short.
const RUN_SHARE: f64 = 0.8;
/// The newest step's weight in the running share: one step backs off below a share of 0.6,
/// two in a row below 0.73, steady steps below 0.8.
const SHARE_WEIGHT: f64 = 0.5;
/// Steps without a team after one on a busy machine.
const BACK_OFF: u64 = 64;

/// One parallel loop: `run(i)` for every `i < n`. The indices are cut into one contiguous
/// share per thread, claimed one by one through the share's counter: each thread works through
/// its own share first (streaming neighbouring weights, which the hardware prefetchers follow),
/// then helps with the others'.
struct Job<'a> {
    run: &'a (dyn Fn(usize) + Sync),
    n: usize,
    next: Vec<AtomicUsize>,
    done: AtomicUsize,
    /// Tells a helper that this is not the loop it already finished (the next loop of a step
    /// often sits at the same stack address).
    seq: u64,
}

impl Job<'_> {
    /// Claims and runs indices until none is left, starting with thread `me`'s share.
    fn work(&self, me: usize) {
        let shares = self.next.len();
        for s in (me..me + shares).map(|s| s % shares) {
            let (first, end) = (s * self.n / shares, (s + 1) * self.n / shares);
            loop {
                let i = first + self.next[s].fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    break;
                }
                // Counted even if `run` unwinds, so the caller never waits for it forever.
                let _done = Done(&self.done);
                (self.run)(i);
            }
        }
    }
}

struct Done<'a>(&'a AtomicUsize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// What the step's threads share: the loop now open (null between loops).
struct Team {
    job: AtomicPtr<Job<'static>>,
    /// Helpers inside the open loop; the caller closes a loop only when none is.
    inside: AtomicUsize,
    seq: AtomicU64,
    /// The caller and its helpers.
    threads: usize,
    stop: AtomicBool,
    owner: usize,
    /// A helper's panic, raised again on the caller's thread when its loop closes.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// The memory the next loop will read (address, length), which idle helpers bring into
    /// their caches ([`prefetch`]), and how many times it was set.
    ahead: Mutex<Vec<(usize, usize)>>,
    ahead_seq: AtomicU64,
}

impl Team {
    /// A helper's life: take part in every loop the caller opens until the step ends.
    fn help(&self, me: usize) {
        let mut seen = 0;
        // The memory to read ahead, and how much of this helper's share of it is read (MAX:
        // all, or none to read).
        let (mut seen_ahead, mut ranges, mut read) = (0, Vec::new(), usize::MAX);
        let mut spins = 0u32;
        while !self.stop.load(Ordering::Acquire) {
            if !self.job.load(Ordering::Acquire).is_null() {
                // Announced before the second look, so the caller, having closed the loop,
                // waits for this helper to leave it before the job goes out of scope.
                self.inside.fetch_add(1, Ordering::SeqCst);
                let job = self.job.load(Ordering::SeqCst);
                // SAFETY: non-null after `inside` was raised, the loop stays open until this
                // helper lowers it again (see `for_each`'s `Close`).
                let fresh = unsafe { job.as_ref() }.filter(|job| job.seq != seen);
                if let Some(job) = fresh {
                    seen = job.seq;
                    if let Err(p) = panic::catch_unwind(AssertUnwindSafe(|| job.work(me))) {
                        *self.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
                    }
                    spins = 0;
                }
                self.inside.fetch_sub(1, Ordering::SeqCst);
                if fresh.is_some() {
                    continue;
                }
            }
            // No loop open, or only the one this helper finished: read what the next one
            // will, then wait for it.
            let ahead = self.ahead_seq.load(Ordering::Acquire);
            if ahead != seen_ahead {
                seen_ahead = ahead;
                ranges.clear();
                ranges.extend_from_slice(&self.ahead.lock().unwrap_or_else(|e| e.into_inner()));
                read = 0;
            }
            if read < usize::MAX {
                read = self.read_ahead(&ranges, me, seen, read);
                continue;
            }
            spins += 1;
            if spins.is_multiple_of(SPINS_PER_YIELD) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Touches each cache line of helper `me`'s share of `ranges` (the share the next loop
    /// hands it first) from byte `from` of the share on, until a loop other than `seen` (the
    /// last this helper took part in) opens or the step ends. Returns how far it got:
    /// `usize::MAX` once the share is read.
    fn read_ahead(&self, ranges: &[(usize, usize)], me: usize, seen: u64, from: usize) -> usize {
        let total: usize = ranges.iter().map(|r| r.1).sum();
        let share = total / self.threads;
        let mut skip = total * me / self.threads + from;
        let mut read = from;
        for &(at, len) in ranges {
            if skip >= len {
                skip -= len;
                continue;
            }
            let mut line = at + skip;
            let end = at + len.min(skip + (share - read));
            skip = 0;
            while line < end {
                // The open loop is the latest numbered; unless this helper was in it, go.
                let open = !self.job.load(Ordering::Acquire).is_null();
                if open && self.seq.load(Ordering::Acquire) != seen
                    || self.stop.load(Ordering::Relaxed)
                {
                    return read;
                }
                let chunk = (end - line).min(READ_AHEAD_CHUNK);
                for l in (line..line + chunk).step_by(64) {
                    touch(l);
                }
                line += chunk;
                read += chunk;
            }
            if read >= share {
                break;
            }
        }
        usize::MAX
    }
}

/// Brings the cache line at `address` into this core's caches. A prefetch never faults, so a
/// range that ended meanwhile costs nothing but the hint.
#[inline(always)]
fn touch(address: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing the program sees and never faults.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(address as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

/// Bytes an idle helper reads ahead between two looks for the next loop.
const READ_AHEAD_CHUNK: usize = 4096;

/// Whether this thread runs a step on a team ([`run`]): only then does [`prefetch`] act.
pub fn in_step() -> bool {
    TEAM.with(|t| t.get().is_some())
}

/// Tells the step's idle helpers what the next loop will read, so that each brings the share
/// it will take first into its own cache while the caller works alone (the norms, the
/// attention's bookkeeping, the next product's preparation: a fifth of a quantized SmolLM2
/// step, in which the memory would otherwise idle). Only a hint: nothing outside [`run`], and
/// a range that is gone before a helper gets to it costs nothing (see [`touch`]).
pub fn prefetch(ranges: &[&[u8]]) {
    let Some(team) = TEAM.with(|t| t.get()) else {
        return;
    };
    // SAFETY: set by `run`, whose `End` clears it before the team can go.
    let team = unsafe { &*team };
    let mut ahead = team.ahead.lock().unwrap_or_else(|e| e.into_inner());
    ahead.clear();
    ahead.extend(ranges.iter().map(|r| (r.as_ptr() as usize, r.len())));
    drop(ahead);
    team.ahead_seq.fetch_add(1, Ordering::Release);
}

thread_local! {
    /// The team of the step running on this thread, if any.
    static TEAM: Cell<Option<*const Team>> = const { Cell::new(None) };
    /// Steps this thread started, and the first that may form a team again ([`BACK_OFF`]).
    static STEPS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    /// The running share of its steps' time this thread ran ([`RUN_SHARE`]); full again after
    /// a back-off, so the team that follows is judged afresh.
    static SHARE: Cell<f64> = const { Cell::new(1.0) };
}

/// Runs `body` (one decoding step) on this thread with the pool's other workers spinning
/// beside it, taking part in every [`for_each_mut`] of `body`; they go back to rayon when it
/// returns. On a thread outside rayon's pool, in a pool of one, or inside another `run`, just
/// `body()`.
pub fn run<R>(body: impl FnOnce() -> R) -> R {
    let helpers = rayon::current_num_threads().saturating_sub(1);
    // Only a worker of the pool leads a team: another thread's rayon work would queue behind
    // helpers that spin until its step ends.
    let Some(owner) = rayon::current_thread_index() else {
        return body();
    };
    if helpers == 0 || TEAM.with(|t| t.get().is_some()) {
        return body();
    }
    let (step, team_from) = STEPS.with(|s| s.get());
    STEPS.with(|s| s.set((step + 1, team_from)));
    if step < team_from {
        return body();
    }
    let team = Arc::new(Team {
        job: AtomicPtr::new(std::ptr::null_mut()),
        inside: AtomicUsize::new(0),
        seq: AtomicU64::new(0),
        threads: helpers + 1,
        stop: AtomicBool::new(false),
        owner,
        panic: Mutex::new(None),
        ahead: Mutex::new(Vec::new()),
        ahead_seq: AtomicU64::new(0),
    });
    for me in 1..=helpers {
        let team = Arc::clone(&team);
        rayon::spawn(move || {
            // The caller popping its own queued helper while it waits on rayon work: this
            // thread is the step's, and the step would wait for itself.
            if rayon::current_thread_index() != Some(team.owner) {
                team.help(me);
            }
        });
    }
    struct End<'a>(&'a Team);
    impl Drop for End<'_> {
        fn drop(&mut self) {
            TEAM.with(|t| t.set(None));
            self.0.stop.store(true, Ordering::Release);
        }
    }
    TEAM.with(|t| t.set(Some(Arc::as_ptr(&team))));
    let end = End(&team);
    let (started, ran_before) = (Instant::now(), thread_cpu_seconds());
    let out = body();
    drop(end);
    if let (Some(before), Some(after)) = (ran_before, thread_cpu_seconds()) {
        let ran = (after - before) / started.elapsed().as_secs_f64().max(f64::MIN_POSITIVE);
        match running_share(SHARE.with(|s| s.get()), ran) {
            Some(share) => SHARE.with(|s| s.set(share)),
            None => {
                STEPS.with(|s| s.set((step + 1, step + 1 + BACK_OFF)));
                SHARE.with(|s| s.set(1.0));
            }
        }
    }
    out
}

/// The running share after a step whose thread ran `ran` of its time, or None where the team
/// backs off ([`RUN_SHARE`]).
fn running_share(share: f64, ran: f64) -> Option<f64> {
    let share = share * (1.0 - SHARE_WEIGHT) + ran.min(1.0) * SHARE_WEIGHT;
    (share >= RUN_SHARE).then_some(share)
}

/// The CPU time this thread has run, where the platform tells it.
fn thread_cpu_seconds() -> Option<f64> {
    #[cfg(unix)]
    {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `t` is a valid timespec for the call to fill.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } == 0 {
            return Some(t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9);
        }
    }
    None
}

/// `f(i, &mut items[i])` for every item, in parallel: on the step's team inside [`run`], on
/// rayon's pool elsewhere.
pub fn for_each_mut<T: Send>(items: &mut [T], f: impl Fn(usize, &mut T) + Sync) {
    let Some(team) = TEAM.with(|t| t.get()) else {
        items
            .par_iter_mut()
            .enumerate()
            .for_each(|(i, item)| f(i, item));
        return;
    };
    let base = Items(items.as_mut_ptr());
    let n = items.len();
    // SAFETY: every index below `n` is claimed once (`Job::work`), so each item is borrowed
    // mutably by one call only, and all calls end before this function returns.
    let run = move |i: usize| f(i, unsafe { &mut *base.at(i) });
    // SAFETY: set by `run`, whose `End` clears it before the team can go.
    let team = unsafe { &*team };
    for_each(team, n, &run);
}

/// A mutable slice's items shared out to the team by index.
struct Items<T>(*mut T);

impl<T> Clone for Items<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Items<T> {}

// SAFETY: the items are `Send` and each is handed to one thread at a time (`for_each_mut`).
unsafe impl<T: Send> Send for Items<T> {}
unsafe impl<T: Send> Sync for Items<T> {}

impl<T> Items<T> {
    /// # Safety
    /// `i` is within the slice and no other reference to its item is live.
    unsafe fn at(self, i: usize) -> *mut T {
        self.0.add(i)
    }
}

/// Opens a loop of `n` indices to `team`, works on it, and closes it when every index is done
/// and no helper is inside.
fn for_each(team: &Team, n: usize, run: &(dyn Fn(usize) + Sync)) {
    let job = Job {
        run,
        n,
        next: (0..team.threads).map(|_| AtomicUsize::new(0)).collect(),
        done: AtomicUsize::new(0),
        seq: team.seq.fetch_add(1, Ordering::Relaxed) + 1,
    };
    /// Closes the loop on every way out, unwinding included: the helpers must not see the
    /// job after it is gone.
    struct Close<'a>(&'a Team);
    impl Drop for Close<'_> {
        fn drop(&mut self) {
            self.0.job.store(std::ptr::null_mut(), Ordering::SeqCst);
            while self.0.inside.load(Ordering::SeqCst) != 0 {
                std::hint::spin_loop();
            }
        }
    }
    // The lifetime is erased for the shared slot; `Close` ends every use of it.
    let ptr = &job as *const Job<'_> as *mut Job<'static>;
    team.job.store(ptr, Ordering::SeqCst);
    let close = Close(team);
    job.work(0);
    let mut spins = 0u32;
    while job.done.load(Ordering::Acquire) < n {
        // A helper that lost its core mid-index may get this one.
        spins += 1;
        if spins.is_multiple_of(SPINS_PER_YIELD) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    drop(close);
    let helper_panic = team.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(p) = helper_panic {
        panic::resume_unwind(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn squares(n: usize) -> Vec<u64> {
        let mut out = vec![0u64; n];
        for_each_mut(&mut out, |i, o| *o = (i as u64) * (i as u64));
        out
    }

    #[test]
    fn every_item_once_on_the_team_and_on_rayon() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            let expected: Vec<u64> = (0..1000u64).map(|i| i * i).collect();
            assert_eq!(squares(1000), expected);
            let in_team = run(|| (0..50).map(|n| squares(n * 20)).collect::<Vec<_>>());
            for (n, got) in in_team.iter().enumerate() {
                assert_eq!(got, &expected[..n * 20], "loop {n} of the step");
            }
            // Nested steps run as one; a step on one thread is the plain loop.
            assert_eq!(run(|| run(|| squares(7))), expected[..7]);
        });
        let single = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        assert_eq!(
            single.install(|| run(|| squares(9))),
            (0..9u64).map(|i| i * i).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_step_that_also_uses_rayon_finishes() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let sum: u64 = pool.install(|| {
            run(|| {
                (0..20)
                    .map(|n| {
                        let plain: u64 = (0..1000u64).into_par_iter().sum();
                        plain + squares(n).iter().sum::<u64>()
                    })
                    .sum()
            })
        });
        let expected: u64 = (0..20u64)
            .map(|n| 499_500 + (0..n).map(|i| i * i).sum::<u64>())
            .sum();
        assert_eq!(sum, expected);
    }

    #[test]
    fn one_short_step_keeps_the_team_and_several_do_not() {
        // A moment's descheduling (the host of a virtual machine): the team stays.
        assert!(running_share(1.0, 0.64).is_some());
        // Half the time off the core, even once: another process has it.
        assert!(running_share(1.0, 0.5).is_none());
        // Two in a row below 0.73 back off, above it they do not.
        assert!(running_share(running_share(1.0, 0.72).unwrap(), 0.72).is_none());
        let two = running_share(running_share(1.0, 0.74).unwrap(), 0.74).unwrap();
        // Steady steps short of 0.8 back off in the end.
        assert!((0..5)
            .try_fold(two, |s, _| running_share(s, 0.78))
            .is_none());
        // A full step makes up for an earlier short one.
        let after = running_share(running_share(1.0, 0.65).unwrap(), 1.0).unwrap();
        assert!(running_share(after, 0.7).is_some());
    }

    /// Read-ahead hints between the loops of a step, a range gone before the helpers read it
    /// among them, change nothing the loops compute; outside a step they do nothing.
    #[test]
    fn hints_to_read_ahead_leave_the_loops_as_they_are() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let expected: Vec<u64> = (0..300u64).map(|i| i * i).collect();
        prefetch(&[&[1u8; 64]]);
        assert!(!in_step());
        pool.install(|| {
            let kept = vec![7u8; 1 << 20];
            let got = run(|| {
                assert!(in_step());
                (0..20)
                    .map(|n| {
                        let gone = vec![n as u8; 1 << 16];
                        prefetch(&[&kept[..], &gone[..], &[]]);
                        drop(gone);
                        squares(n * 15)
                    })
                    .collect::<Vec<_>>()
            });
            for (n, got) in got.iter().enumerate() {
                assert_eq!(got, &expected[..n * 15]);
            }
            prefetch(&[]);
        });
    }

    /// A step whose thread was off its core most of the time (here asleep, as if another
    /// process had the core) makes the next ones run without a team.
    #[cfg(unix)]
    #[test]
    fn a_step_short_of_its_core_backs_off() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let teamed = run(|| {
                std::thread::sleep(std::time::Duration::from_millis(20));
                TEAM.with(|t| t.get().is_some())
            });
            assert!(teamed, "the step ran on a team");
            assert!(!run(|| TEAM.with(|t| t.get().is_some())), "backed off");
            assert_eq!(run(|| squares(6)), vec![0, 1, 4, 9, 16, 25]);
        });
    }

    #[test]
    fn a_panicking_item_reaches_the_caller() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let caught = pool.install(|| {
            std::panic::catch_unwind(|| {
                run(|| {
                    let mut v = vec![0u8; 64];
                    for_each_mut(&mut v, |i, _| assert!(i != 40, "item 40"));
                })
            })
        });
        assert!(caught.is_err());
        // The pool still works afterwards.
        assert_eq!(pool.install(|| run(|| squares(5))), vec![0, 1, 4, 9, 16]);
    }
}
