//! The two Hub requests a download needs, with the guarantees hf-hub's own client lacks:
//! connect and read timeouts, retries with backoff on 5xx/429 and on a connection that drops
//! mid-file, and resuming a partial file with an HTTP Range request.
//!
//! The protocol is huggingface_hub's: `GET {endpoint}/{repo}/resolve/{revision}/{file}` with
//! `Range: bytes=0-0` and no redirects gives the commit (`X-Repo-Commit`), the content hash
//! (`X-Linked-Etag` or `ETag`) and the size (`X-Linked-Size` or `Content-Range`); a redirect
//! (large files live on a CDN) names where the bytes are.

use crate::progress::Progress;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use ureq::{Agent, AgentBuilder, Response};

/// Why a request did not give what was asked.
#[derive(Debug)]
pub enum Failure {
    /// The server answered with an error status; `code` is its `X-Error-Code` header.
    Status { status: u16, code: String },
    /// No answer: the connection failed, dropped or timed out.
    Transport { detail: String, timed_out: bool },
    /// An answer that is not the Hub's (a header missing or malformed).
    NotHub(String),
    /// The local file could not be written.
    Io(std::io::Error),
}

impl Failure {
    /// Worth another try: the server said "later", or the connection dropped after it had
    /// started to answer.
    fn retryable(&self, progressed: bool) -> bool {
        match self {
            Failure::Status { status, .. } => *status == 429 || *status >= 500,
            Failure::Transport { timed_out, .. } => progressed || !timed_out,
            Failure::NotHub(_) | Failure::Io(_) => false,
        }
    }
}

/// Where a file's bytes are and what they are.
pub struct Remote {
    pub commit: String,
    pub etag: String,
    pub size: u64,
    location: String,
}

pub struct Client {
    /// Metadata requests: no redirects followed automatically, the etag timeout.
    meta: Agent,
    /// Byte transfers: the download timeout.
    bytes: Agent,
    token: Option<String>,
    /// `scheme://host[:port]` of the endpoint; the token is sent to this origin only.
    origin: String,
    retries: u32,
    retry_wait: Duration,
    progress: bool,
}

/// How hard to try.
#[derive(Clone, Debug)]
pub struct Patience {
    pub etag_timeout: Duration,
    pub download_timeout: Duration,
    pub retries: u32,
    /// First wait between tries; it doubles up to eight times this.
    pub retry_wait: Duration,
}

impl Default for Patience {
    /// huggingface_hub's timeouts (10 s each); five retries, waiting 1, 2, 4, 8, 8 s.
    fn default() -> Self {
        Patience {
            etag_timeout: Duration::from_secs(10),
            download_timeout: Duration::from_secs(10),
            retries: 5,
            retry_wait: Duration::from_secs(1),
        }
    }
}

impl Client {
    pub fn new(endpoint: &str, token: Option<String>, patience: &Patience, progress: bool) -> Self {
        let agent = |timeout: Duration, redirects: u32| -> Agent {
            AgentBuilder::new()
                .try_proxy_from_env(true)
                .timeout_connect(timeout)
                .timeout_read(timeout)
                .timeout_write(timeout)
                .redirects(redirects)
                .user_agent(concat!("prolora/", env!("CARGO_PKG_VERSION")))
                .build()
        };
        Client {
            meta: agent(patience.etag_timeout, 0),
            bytes: agent(patience.download_timeout, 5),
            token,
            origin: origin(endpoint).to_string(),
            retries: patience.retries,
            retry_wait: patience.retry_wait,
            progress,
        }
    }

    fn get(&self, agent: &Agent, url: &str) -> ureq::Request {
        let request = agent.get(url).set("Accept-Encoding", "identity");
        match &self.token {
            Some(token) if origin(url) == self.origin => {
                request.set("Authorization", &format!("Bearer {token}"))
            }
            _ => request,
        }
    }

    /// Retries `attempt` while it fails in a way worth retrying, waiting longer each time.
    fn patiently<T>(
        &self,
        mut attempt: impl FnMut() -> Result<T, (Failure, bool)>,
    ) -> Result<T, Failure> {
        let mut wait = self.retry_wait;
        for tries in 0.. {
            match attempt() {
                Ok(value) => return Ok(value),
                Err((failure, progressed)) => {
                    if tries >= self.retries || !failure.retryable(progressed) {
                        return Err(failure);
                    }
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(self.retry_wait * 8);
                }
            }
        }
        unreachable!("the loop returns")
    }

    /// The metadata of the file at `url`, following only redirects within the endpoint (a
    /// renamed repo); a redirect elsewhere is where the bytes are.
    pub fn metadata(&self, url: &str) -> Result<Remote, Failure> {
        self.patiently(|| self.metadata_once(url).map_err(|f| (f, false)))
    }

    fn metadata_once(&self, url: &str) -> Result<Remote, Failure> {
        let mut url = url.to_string();
        let mut response = call(self.get(&self.meta, &url).set("Range", "bytes=0-0"))?;
        for _ in 0..5 {
            if !(300..400).contains(&response.status()) {
                break;
            }
            let Some(location) = response.header("Location") else {
                return Err(Failure::NotHub("a redirect without Location".into()));
            };
            if !location.starts_with('/') {
                break;
            }
            url = format!("{}{location}", origin(&url));
            response = call(self.get(&self.meta, &url).set("Range", "bytes=0-0"))?;
        }
        let header = |name: &str| response.header(name).map(str::to_string);
        let commit = header("X-Repo-Commit")
            .ok_or_else(|| Failure::NotHub("header X-Repo-Commit missing".into()))?;
        let etag = header("X-Linked-Etag")
            .or_else(|| header("ETag"))
            .map(|e| e.trim_start_matches("W/").replace('"', ""))
            .ok_or_else(|| Failure::NotHub("header ETag missing".into()))?;
        // Both become file names in the cache: a hostile answer must not leave it.
        for (name, value) in [("X-Repo-Commit", &commit), ("ETag", &etag)] {
            if value.is_empty()
                || !value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(Failure::NotHub(format!(
                    "header {name} is not a plain hash"
                )));
            }
        }
        let redirected = (300..400).contains(&response.status());
        let location = if redirected {
            header("Location").unwrap_or_default()
        } else {
            url.clone()
        };
        let size = match header("X-Linked-Size") {
            Some(size) => size.trim().parse().ok(),
            None if redirected => None,
            None => header("Content-Range").and_then(|r| total_of(&r)),
        };
        let size = match size {
            Some(size) => size,
            // Storage answers the size of what it holds.
            None if redirected => {
                let answer = call(self.get(&self.meta, &location).set("Range", "bytes=0-0"))?;
                answer
                    .header("Content-Range")
                    .and_then(total_of)
                    .ok_or_else(|| Failure::NotHub("header Content-Range missing".into()))?
            }
            None => return Err(Failure::NotHub("header Content-Range missing".into())),
        };
        Ok(Remote {
            commit,
            etag,
            size,
            location,
        })
    }

    /// Brings `partial` to the remote file's full size, resuming from what it already holds;
    /// the bytes are those of `remote` once this returns.
    pub fn download(&self, remote: &Remote, partial: &Path, name: &str) -> Result<(), Failure> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(partial)
            .map_err(Failure::Io)?;
        let mut progress = self.progress(remote.size, name);
        self.patiently(|| {
            let have = file.metadata().map_err(|e| (Failure::Io(e), false))?.len();
            if have == remote.size {
                return Ok(());
            }
            if have > remote.size {
                file.set_len(0).map_err(|e| (Failure::Io(e), false))?;
            }
            let before = file.metadata().map_err(|e| (Failure::Io(e), false))?.len();
            let result = self.transfer(remote, &mut file, before, &mut progress);
            let after = file.metadata().map(|m| m.len()).unwrap_or(before);
            result.map_err(|f| (f, after > before))
        })?;
        file.sync_all().map_err(Failure::Io)?;
        progress.finish_and_clear();
        Ok(())
    }

    fn transfer(
        &self,
        remote: &Remote,
        file: &mut File,
        have: u64,
        progress: &mut Progress,
    ) -> Result<(), Failure> {
        let range = format!("bytes={have}-");
        let response = call(self.get(&self.bytes, &remote.location).set("Range", &range))?;
        if response.status() == 200 && have > 0 {
            // The server ignored the range: start over.
            file.set_len(0).map_err(Failure::Io)?;
            file.rewind().map_err(Failure::Io)?;
        }
        let (started, from) = (Instant::now(), file.metadata().map_err(Failure::Io)?.len());
        let mut at = from;
        let mut reader = response.into_reader();
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let n = match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(transport(&e)),
            };
            file.write_all(&buffer[..n]).map_err(Failure::Io)?;
            at += n as u64;
            let rate = (at - from) as f64 / started.elapsed().as_secs_f64().max(1e-9);
            progress.advance_to(mib(at), format!("MiB, {:.1} MiB/s", rate / MIB as f64));
        }
        let now = file.metadata().map_err(Failure::Io)?.len();
        if now != remote.size {
            return Err(Failure::Transport {
                detail: format!("the connection closed after {now} of {} bytes", remote.size),
                timed_out: false,
            });
        }
        Ok(())
    }

    /// Progress over the MiB of a file (none for a file under 1 MiB: it is done before a bar
    /// would be readable).
    fn progress(&self, size: u64, name: &str) -> Progress {
        Progress::new(self.progress && size >= MIB, name, mib(size), 0, 0)
    }
}

const MIB: u64 = 1 << 20;

/// Whole MiB in `bytes`.
fn mib(bytes: u64) -> usize {
    (bytes / MIB) as usize
}

fn call(request: ureq::Request) -> Result<Response, Failure> {
    match request.call() {
        Ok(response) => Ok(response),
        Err(ureq::Error::Status(status, response)) => Err(Failure::Status {
            status,
            code: response.header("X-Error-Code").unwrap_or("").to_string(),
        }),
        Err(ureq::Error::Transport(t)) => {
            // Only the kind and the cause: ureq's own text holds the URL, and with it any
            // credentials the endpoint carries.
            let timed_out = std::error::Error::source(&t)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .is_some_and(is_timeout);
            let cause = std::error::Error::source(&t)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            Err(Failure::Transport {
                detail: format!("{}{cause}", t.kind()),
                timed_out,
            })
        }
    }
}

fn transport(e: &std::io::Error) -> Failure {
    Failure::Transport {
        detail: e.to_string(),
        timed_out: is_timeout(e),
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

/// The total of a `Content-Range: bytes a-b/total` header.
fn total_of(range: &str) -> Option<u64> {
    range.rsplit('/').next()?.trim().parse().ok()
}

/// `scheme://authority` of `url`.
fn origin(url: &str) -> &str {
    let start = url.find("://").map_or(0, |i| i + 3);
    match url[start..].find('/') {
        Some(i) => &url[..start + i],
        None => url,
    }
}

/// `url` with any `user:password@` replaced, for messages.
pub fn redacted(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[start..].find('/').map_or(url.len(), |i| start + i);
    match url[start..authority_end].rfind('@') {
        Some(at) => format!("{}***@{}", &url[..start], &url[start + at + 1..]),
        None => url.to_string(),
    }
}

/// `s` percent-encoded as a URL path segment (or path, keeping `/`).
pub fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_redacted_and_origins_found() {
        assert_eq!(redacted("https://u:p@host:8/x@y"), "https://***@host:8/x@y");
        assert_eq!(redacted("http://host/a"), "http://host/a");
        assert_eq!(origin("http://h:1/a/b"), "http://h:1");
        assert_eq!(origin("http://h:1"), "http://h:1");
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(encode("a b/c.json", true), "a%20b/c.json");
        assert_eq!(total_of("bytes 0-0/1234"), Some(1234));
    }
}
