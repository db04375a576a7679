//! Progress of a long loop (training steps, benchmark examples, prompts): a bar on a terminal,
//! plain lines where stderr is a file or a pipe (a Slurm or sweep log, `2>&1 | tee`), as
//! torchtune and the HF Trainer write them, since a bar is invisible there. Quiet shows neither.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// The longest a log goes without a line while a loop runs.
const LINE_INTERVAL: Duration = Duration::from_secs(15);

pub struct Progress {
    shown: Shown,
    label: String,
    total: usize,
    /// Where this process started (a resumed run starts past 0): the rate counts from here.
    first: usize,
    at: usize,
    started: Instant,
}

enum Shown {
    Bar(ProgressBar),
    /// Plain lines: the first, at every multiple of `every` (0: none), at the end, and at
    /// least every [`LINE_INTERVAL`].
    Lines {
        every: usize,
        last_line: Option<Instant>,
    },
    Nothing,
}

impl Progress {
    /// Progress `at` of `total` units of `label` ("step", a benchmark's name); in a log a line
    /// every `every` units.
    pub fn new(show: bool, label: &str, total: usize, at: usize, every: usize) -> Self {
        let shown = if !show {
            Shown::Nothing
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} {bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                )
                .expect("a valid template"),
            );
            bar.set_prefix(label.to_string());
            bar.set_position(at as u64);
            Shown::Bar(bar)
        } else {
            Shown::Lines {
                every,
                last_line: None,
            }
        };
        Progress {
            shown,
            label: label.to_string(),
            total,
            first: at,
            at,
            started: Instant::now(),
        }
    }

    /// Progress that shows nothing (before a loop starts).
    pub fn hidden() -> Self {
        Self::new(false, "", 0, 0, 0)
    }

    /// Seconds since this process started the loop.
    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// `units` more done; `message` says how it goes ("loss 1.23 lr 2e-4 …").
    pub fn advance(&mut self, units: usize, message: String) {
        self.advance_to(self.at + units, message);
    }

    /// Done up to `at`; `message` says how it goes.
    pub fn advance_to(&mut self, at: usize, message: String) {
        let before = self.at;
        self.at = at.min(self.total);
        match &mut self.shown {
            Shown::Bar(bar) => {
                bar.set_message(message);
                bar.set_position(self.at as u64);
            }
            Shown::Lines { every, last_line } => {
                let moved = self.at != before;
                let crossed = *every > 0 && self.at / *every > before / *every;
                let due = match last_line {
                    None => true,
                    Some(t) => {
                        (moved && (crossed || self.at == self.total))
                            || t.elapsed() >= LINE_INTERVAL
                    }
                };
                if due {
                    *last_line = Some(Instant::now());
                    crate::to_stderr!(
                        "{} {}/{} {message} eta {}",
                        self.label,
                        self.at,
                        self.total,
                        self.eta()
                    );
                }
            }
            Shown::Nothing => {}
        }
    }

    /// A line of its own (a held-out loss), above the bar on a terminal.
    pub fn line(&self, text: String) {
        match &self.shown {
            Shown::Bar(bar) => bar.println(text),
            Shown::Lines { .. } => crate::to_stderr!("{text}"),
            Shown::Nothing => {}
        }
    }

    /// The loop is over: the bar stays on a terminal as it ended.
    pub fn finish(&self) {
        if let Shown::Bar(bar) = &self.shown {
            bar.finish();
        }
    }

    /// The loop is over and its bar goes (a benchmark's, before the next one's).
    pub fn finish_and_clear(&self) {
        if let Shown::Bar(bar) = &self.shown {
            bar.finish_and_clear();
        }
    }

    /// The time left at the rate since the start, as H:MM:SS.
    fn eta(&self) -> String {
        let done = self.at.saturating_sub(self.first);
        if done == 0 {
            return "?".into();
        }
        let left = self.elapsed_s() / done as f64 * (self.total - self.at) as f64;
        let s = left.round() as u64;
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    }
}
