//! What the benches share: the best of several timed runs (a shared machine only ever adds time).

use std::time::Instant;

/// The fastest of `reps` runs of `f`, in seconds.
pub fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
