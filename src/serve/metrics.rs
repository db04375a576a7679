//! What `GET /metrics` reports, in Prometheus' text format: requests by status, prompt and
//! generated tokens, queue depth, running batch, resident adapters and their bytes, and
//! histograms of the time to the first token and per output token.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A cumulative histogram of durations.
#[derive(Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            if s <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            let n = count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {n}");
        }
        let n = self.count.load(Ordering::Relaxed);
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {n}\n{name}_sum {sum}\n{name}_count {n}"
        );
    }
}

/// The server's counters, shared by the engine and the connection threads.
#[derive(Default)]
pub struct Metrics {
    /// Answered requests by (endpoint, status).
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    pub queued: AtomicU64,
    running: AtomicU64,
    adapters_resident: AtomicU64,
    adapter_bytes: AtomicU64,
    first_token: Histogram,
    per_token: Histogram,
}

impl Metrics {
    pub fn answered(&self, endpoint: &str, status: u16) {
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *requests.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    pub fn prompt(&self, tokens: usize) {
        self.prompt_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
    }

    pub fn generated(&self, tokens: usize) {
        self.generated_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
    }

    pub fn first_token(&self, after: Duration) {
        self.first_token.observe(after);
    }

    /// One decoding step that gave each of `rows` rows a token.
    pub fn step(&self, took: Duration, rows: usize) {
        for _ in 0..rows {
            self.per_token.observe(took);
        }
    }

    pub fn set_running(&self, rows: usize) {
        self.running.store(rows as u64, Ordering::Relaxed);
    }

    pub fn set_adapters(&self, resident: usize, bytes: usize) {
        self.adapters_resident
            .store(resident as u64, Ordering::Relaxed);
        self.adapter_bytes.store(bytes as u64, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP prolora_requests_total Requests answered, by endpoint and HTTP status.\n\
             # TYPE prolora_requests_total counter"
        );
        for ((endpoint, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "prolora_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let gauges = [
            (
                "prolora_prompt_tokens_total",
                "counter",
                "Prompt tokens prefilled.",
                &self.prompt_tokens,
            ),
            (
                "prolora_generation_tokens_total",
                "counter",
                "Tokens generated.",
                &self.generated_tokens,
            ),
            (
                "prolora_queue_depth",
                "gauge",
                "Requests waiting for a row.",
                &self.queued,
            ),
            (
                "prolora_running_rows",
                "gauge",
                "Rows in the running batch.",
                &self.running,
            ),
            (
                "prolora_adapters_resident",
                "gauge",
                "Adapters in memory.",
                &self.adapters_resident,
            ),
            (
                "prolora_adapter_bytes",
                "gauge",
                "Bytes the resident adapters hold.",
                &self.adapter_bytes,
            ),
        ];
        for (name, kind, help, value) in gauges {
            let v = value.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        self.first_token.render(
            &mut out,
            "prolora_time_to_first_token_seconds",
            "From a request's arrival to its first token.",
        );
        self.per_token.render(
            &mut out,
            "prolora_time_per_output_token_seconds",
            "Decoding step time per token after the first.",
        );
        out
    }
}
