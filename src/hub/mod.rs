//! Resolving a Hugging Face Hub model id to a local snapshot directory.
//!
//! Downloads land in the standard Hub cache layout (`cache.rs`), so models already
//! downloaded by Python tools are reused and vice versa. The requests are our own (`http.rs`)
//! rather than hf-hub's: its client has no timeouts, so a Hub that stops answering would
//! hang a run forever.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use anyhow::anyhow;

mod cache;
mod http;

use cache::RepoCache;
pub use http::Patience;
use http::{Client, Failure};

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const CONFIG: &str = "config.json";
const TOKENIZER: &str = "tokenizer.json";
/// The tokenizer's special tokens and chat template, and the generation defaults (EOS ids):
/// fetched when the repo has them.
const TOKENIZER_EXTRAS: [&str; 4] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// Where and how to reach the Hub.
///
/// `from_env()` reads HF_ENDPOINT (default https://huggingface.co), HF_TOKEN (falling back
/// to the token file that `huggingface-cli login` writes under HF_HOME), HF_HOME /
/// HF_HUB_CACHE for the cache dir (standard locations, so files downloaded by Python tools
/// are reused), HF_HUB_OFFLINE=1, and the timeouts HF_HUB_ETAG_TIMEOUT (metadata requests)
/// and HF_HUB_DOWNLOAD_TIMEOUT (file transfers), in seconds, 10 each by default.
#[derive(Clone)]
pub struct HubOptions {
    /// Base URL of the Hub, without a trailing slash.
    pub endpoint: String,
    /// Hub cache directory (the one holding `models--org--name` folders).
    pub cache_dir: PathBuf,
    /// Access token sent as `Authorization: Bearer`, needed for gated and private repos.
    pub token: Option<String>,
    /// Use only what is already in `cache_dir`; never touch the network.
    pub offline: bool,
    /// Show download progress bars on stderr.
    pub progress: bool,
    /// Timeouts and retries.
    pub patience: Patience,
}

// Written by hand so that logging the options never leaks the token.
impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubOptions")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("offline", &self.offline)
            .field("progress", &self.progress)
            .field("patience", &self.patience)
            .finish()
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

// Same spellings as huggingface_hub's `_is_true`, so one HF_HUB_OFFLINE works for both.
fn env_flag(name: &str) -> bool {
    env_var(name).is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// A timeout in seconds from the environment, huggingface_hub's 10 s when unset.
fn env_seconds(name: &str) -> anyhow::Result<std::time::Duration> {
    let Some(value) = env_var(name) else {
        return Ok(Patience::default().etag_timeout);
    };
    match value.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => {
            Ok(std::time::Duration::from_secs_f64(s))
        }
        _ => Err(anyhow!(
            "{name}={value:?} is not a timeout: give seconds, a number above 0 and at most 86400 (the default is 10)"
        )),
    }
}

impl HubOptions {
    /// Options from the same environment variables huggingface_hub (Python) reads.
    pub fn from_env() -> anyhow::Result<Self> {
        // Resolved like huggingface_hub does, so both tools share one cache and one login.
        let hf_home = env_var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let xdg = env_var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    std::env::home_dir()
                        .unwrap_or_else(|| PathBuf::from("."))
                        .join(".cache")
                });
            xdg.join("huggingface")
        });
        let cache_dir = env_var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token_file = env_var("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("token"));
        let token = env_var("HF_TOKEN")
            .or_else(|| std::fs::read_to_string(token_file).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let endpoint = env_var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let patience = Patience {
            etag_timeout: env_seconds("HF_HUB_ETAG_TIMEOUT")?,
            download_timeout: env_seconds("HF_HUB_DOWNLOAD_TIMEOUT")?,
            ..Patience::default()
        };
        Ok(HubOptions {
            // hf-hub appends "/{repo}/resolve/…" verbatim; a trailing slash would double it.
            endpoint: endpoint.trim().trim_end_matches('/').to_string(),
            cache_dir,
            token,
            offline: env_flag("HF_HUB_OFFLINE"),
            progress: !env_flag("HF_HUB_DISABLE_PROGRESS_BARS"),
            patience,
        })
    }
}

/// True when `s` looks like a Hub repo id ("org/name", no path that exists locally) rather
/// than a local directory.
pub fn looks_like_repo_id(s: &str) -> bool {
    // An existing path always wins, so a local "org/name" directory is never shadowed.
    if s.is_empty() || Path::new(s).exists() {
        return false;
    }
    let mut parts = s.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    // The Hub's own naming rules; they also reject "./x", "../x", "~/x" and "C:\x".
    let valid = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    };
    valid(org) && valid(name)
}

/// Makes the files of a LLaMA-family model repo available locally and returns the snapshot
/// directory that holds them: config.json, tokenizer.json and its companions (optional: absent
/// is fine, return without them), and the weights: model.safetensors, or model.safetensors.index.json plus
/// every shard it names.
///
/// Files already in the cache are not downloaded again (so a cached branch such as "main"
/// is not re-checked for new commits; pass a commit hash to pin one); in offline mode only
/// the cache is used (clear error naming the missing file if absent).
pub fn fetch_model(repo_id: &str, revision: &str, opts: &HubOptions) -> anyhow::Result<PathBuf> {
    let f = Fetcher::new(repo_id, revision, opts)?;
    let revision = f.revision;

    // A cached file can sit in an older snapshot than one downloaded just now (the branch
    // moved upstream); the caller needs a single directory, so re-resolve once from the
    // newest commit, which re-downloading config.json makes the cached one.
    for attempt in 0..2 {
        if attempt == 1 {
            f.download(CONFIG)?
                .ok_or_else(|| f.not_found(404, "config.json is missing"))?;
        }
        let files = f.resolve_all()?;
        let snapshot = snapshot_of(&files[0].1, &files[0].0);
        if files
            .iter()
            .all(|(name, path)| *path == snapshot.join(name))
        {
            return Ok(snapshot);
        }
    }
    Err(anyhow!(
        "revision {revision} of {repo_id} changed on {} while downloading: run the command again",
        f.endpoint
    ))
}

/// Only the `config.json` of a Hub model (for shape-only uses such as `prolora params`).
pub fn fetch_config(repo_id: &str, revision: &str, opts: &HubOptions) -> anyhow::Result<PathBuf> {
    let f = Fetcher::new(repo_id, revision, opts)?;
    f.fetch(CONFIG)?
        .ok_or_else(|| f.absent(CONFIG, || f.not_found(404, "config.json is missing")))
}

impl<'a> Fetcher<'a> {
    fn new(repo_id: &'a str, revision: &'a str, opts: &'a HubOptions) -> anyhow::Result<Self> {
        let revision = if revision.is_empty() {
            "main"
        } else {
            revision
        };
        cache::check_revision(revision)?;
        let client = (!opts.offline).then(|| {
            Client::new(
                &opts.endpoint,
                opts.token.clone(),
                &opts.patience,
                opts.progress,
            )
        });
        Ok(Fetcher {
            repo_id,
            revision,
            endpoint: http::redacted(&opts.endpoint),
            opts,
            cache: RepoCache::new(&opts.cache_dir, repo_id),
            client,
        })
    }
}

struct Fetcher<'a> {
    repo_id: &'a str,
    revision: &'a str,
    /// The endpoint as messages show it: without credentials.
    endpoint: String,
    opts: &'a HubOptions,
    cache: RepoCache,
    client: Option<Client>,
}

/// Which request failed, for the timeout to name.
#[derive(Clone, Copy)]
enum Phase {
    Metadata,
    Bytes,
}

impl Fetcher<'_> {
    /// (file name in the repo, local path) of every file the model needs, config.json first.
    fn resolve_all(&self) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let (repo_id, revision) = (self.repo_id, self.revision);
        let mut files = Vec::new();
        let config = self
            .fetch(CONFIG)?
            .ok_or_else(|| self.absent(CONFIG, || self.not_found(404, "config.json is missing")))?;
        files.push((CONFIG.to_string(), config));
        if let Some(tok) = self.fetch(TOKENIZER)? {
            files.push((TOKENIZER.to_string(), tok));
            for extra in TOKENIZER_EXTRAS {
                if let Some(path) = self.fetch_optional(extra)? {
                    files.push((extra.to_string(), path));
                }
            }
        }

        // Probe the cache for both layouts before the network, so a cached sharded model
        // costs no request (and no 404 for the single file).
        let single = match self.cached(SINGLE) {
            Some(p) => Some(p),
            None if self.cached(INDEX).is_some() => None,
            None => self.fetch(SINGLE)?,
        };
        if let Some(single) = single {
            files.push((SINGLE.to_string(), single));
            return Ok(files);
        }
        let index = self.fetch(INDEX)?.ok_or_else(|| {
            self.absent("model.safetensors (or model.safetensors.index.json)", || {
                anyhow!(
                    "model repo {repo_id} (revision {revision}) has neither model.safetensors nor model.safetensors.index.json (HTTP 404): prolora needs safetensors weights and does not support .bin (PyTorch) checkpoints, so convert the model to safetensors or pick a repo that ships them"
                )
            })
        })?;
        for shard in shard_names(&index, repo_id)? {
            let path = self.fetch(&shard)?.ok_or_else(|| {
                self.absent(&shard, || {
                    anyhow!(
                        "model repo {repo_id} (revision {revision}) lists shard {shard} in model.safetensors.index.json but the file does not exist (HTTP 404): the repo is incomplete, so pick another revision"
                    )
                })
            })?;
            files.push((shard, path));
        }
        files.push((INDEX.to_string(), index));
        Ok(files)
    }

    /// The cached copy of `file`, else (online) a fresh download; `None` when the file does not
    /// exist upstream (online) or is not cached (offline).
    fn fetch(&self, file: &str) -> anyhow::Result<Option<PathBuf>> {
        match self.cached(file) {
            Some(path) => Ok(Some(path)),
            None => self.download(file),
        }
    }

    /// [`Self::fetch`] for a file many repos lack: its absence at a commit is remembered as
    /// huggingface_hub remembers it (`.no_exist/<commit>/<file>`), so a cached model makes no
    /// request for it again.
    fn fetch_optional(&self, file: &str) -> anyhow::Result<Option<PathBuf>> {
        let commit = self.cache.commit_of(self.revision);
        let marker = commit.as_ref().map(|c| self.cache.no_exist(c, file));
        if self.cached(file).is_none() && marker.as_ref().is_some_and(|m| m.is_file()) {
            return Ok(None);
        }
        let found = self.fetch(file)?;
        if let (None, Some(marker), Some(_)) = (&found, marker, &self.client) {
            // Best effort: without the marker the next run only asks again.
            let _ = std::fs::create_dir_all(marker.parent().expect("under .no_exist"))
                .and_then(|_| std::fs::File::create(&marker));
        }
        Ok(found)
    }

    fn cached(&self, file: &str) -> Option<PathBuf> {
        self.cache.file(self.revision, file)
    }

    fn download(&self, file: &str) -> anyhow::Result<Option<PathBuf>> {
        let Some(client) = &self.client else {
            return Ok(None);
        };
        let url = format!(
            "{}/{}/resolve/{}/{}",
            self.opts.endpoint,
            self.repo_id,
            http::encode(self.revision, false),
            http::encode(file, true)
        );
        let remote = match client.metadata(&url) {
            Ok(remote) => remote,
            Err(failure) => return self.failed(file, failure, Phase::Metadata),
        };
        let blob = self.cache.blob(&remote.etag);
        if !blob.is_file() {
            let blobs = blob.parent().expect("blobs/ holds it");
            std::fs::create_dir_all(blobs).map_err(|e| self.unstorable(file, e))?;
            // Another process may download the same blob: one writes, the other waits.
            let _lock =
                lock(&self.cache.lock(&remote.etag)).map_err(|e| self.unstorable(file, e))?;
            if !blob.is_file() {
                let partial = self.cache.partial(&remote.etag);
                if let Err(failure) = client.download(&remote, &partial, file) {
                    return self.failed(file, failure, Phase::Bytes);
                }
                std::fs::rename(&partial, &blob).map_err(|e| self.unstorable(file, e))?;
            }
        }
        let linked = self
            .cache
            .link(self.revision, &remote.commit, file, &remote.etag)
            .map_err(|e| self.unstorable(file, e))?;
        Ok(Some(linked))
    }

    /// Turns a failed request into one actionable sentence; `Ok(None)` for "file not in repo".
    fn failed(
        &self,
        file: &str,
        failure: Failure,
        phase: Phase,
    ) -> anyhow::Result<Option<PathBuf>> {
        let (repo_id, revision, endpoint) = (self.repo_id, self.revision, &self.endpoint);
        let later =
            "set HF_HUB_OFFLINE=1 to use only the local cache, or pass a local model directory";
        let (status, code) = match failure {
            Failure::Status { status, code } => (status, code),
            Failure::Transport {
                timed_out: true, ..
            } => {
                let (variable, seconds) = match phase {
                    Phase::Metadata => ("HF_HUB_ETAG_TIMEOUT", self.opts.patience.etag_timeout),
                    Phase::Bytes => (
                        "HF_HUB_DOWNLOAD_TIMEOUT",
                        self.opts.patience.download_timeout,
                    ),
                };
                return Err(anyhow!(
                    "{endpoint} did not answer within {} s for {file} of {repo_id}: check the network and HF_ENDPOINT, raise {variable} (seconds), or {later}",
                    seconds.as_secs_f64()
                ));
            }
            Failure::Transport { detail, .. } => {
                return Err(anyhow!(
                    "cannot reach {endpoint} to download {file} of {repo_id} ({detail}): check the network and HF_ENDPOINT, or {later}"
                ));
            }
            Failure::NotHub(what) => {
                return Err(anyhow!(
                    "{endpoint} did not answer like the Hugging Face Hub for {file} of {repo_id} ({what}): check HF_ENDPOINT, or pass a local model directory"
                ));
            }
            Failure::Io(e) => return Err(self.unstorable(file, e)),
        };
        // The Hub says which thing is missing; 401 also covers repos that do not exist,
        // because anonymous requests must not learn whether a private repo exists.
        match (status, code.as_str()) {
            (401 | 403 | 404, "RepoNotFound" | "RevisionNotFound") => Err(self.not_found(status, &code)),
            (401 | 403, _) => {
                let url = format!("{endpoint}/{repo_id}");
                let tokens = format!("{endpoint}/settings/tokens");
                Err(if self.opts.token.is_some() {
                    anyhow!(
                        "{repo_id} is gated or private (HTTP {status}) and the token in use has no access to it: accept its license on {url} with the account that owns the token, or set HF_TOKEN to a valid access token ({tokens})"
                    )
                } else {
                    anyhow!(
                        "{repo_id} is gated or private (HTTP {status}): accept its license on {url} and set HF_TOKEN to an access token ({tokens})"
                    )
                })
            }
            (404, _) => Ok(None),
            _ => Err(anyhow!(
                "{endpoint} answered HTTP {status} for {file} of {repo_id} (revision {revision}), also after {} retries: try again later, or {later}",
                self.opts.patience.retries
            )),
        }
    }

    fn unstorable(&self, file: &str, e: impl fmt::Display) -> anyhow::Error {
        anyhow!(
            "could not store {file} of {} in the cache ({e}): check that {} is writable and has free space, or delete {} to start that model over",
            self.repo_id,
            self.opts.cache_dir.display(),
            self.cache.dir().display()
        )
    }

    fn not_found(&self, status: u16, why: &str) -> anyhow::Error {
        let (repo_id, revision, endpoint) = (self.repo_id, self.revision, &self.endpoint);
        let hint = if status == 401 && self.opts.token.is_none() {
            ", or set HF_TOKEN if the repo is private"
        } else {
            ""
        };
        anyhow!(
            "model repo {repo_id} (revision {revision}) not found on {endpoint} (HTTP {status}, {why}): check the id and revision{hint}"
        )
    }

    /// The error for a missing file: `online` when the Hub said 404, else the offline one.
    fn absent(&self, what: &str, online: impl FnOnce() -> anyhow::Error) -> anyhow::Error {
        if self.client.is_some() {
            return online();
        }
        anyhow!(
            "{what} of model repo {} (revision {}) is not in the Hugging Face cache {} and offline mode is on (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE to download it, or pass a local model directory",
            self.repo_id,
            self.revision,
            self.opts.cache_dir.display()
        )
    }
}

/// An exclusive lock on `path`, waiting for another holder; released when the file closes.
fn lock(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    // SAFETY: flock on a file descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

#[derive(serde::Deserialize)]
struct SafetensorsIndex {
    weight_map: std::collections::HashMap<String, String>,
}

/// The distinct shard files named by a safetensors index, in a stable order.
fn shard_names(index: &Path, repo_id: &str) -> anyhow::Result<BTreeSet<String>> {
    let parsed = std::fs::read_to_string(index)
        .map_err(anyhow::Error::from)
        .and_then(|s| Ok(serde_json::from_str::<SafetensorsIndex>(&s)?));
    let parsed = parsed.map_err(|e| {
        anyhow!(
            "model.safetensors.index.json of {repo_id} at {} is unreadable ({e}): delete it from the cache to download it again",
            index.display()
        )
    })?;
    let shards: BTreeSet<String> = parsed.weight_map.into_values().collect();
    // Shard names become paths under the snapshot; a hostile index must not escape it.
    for shard in &shards {
        let safe = Path::new(shard)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        if !safe || shard.contains('\\') {
            return Err(anyhow!(
                "model.safetensors.index.json of {repo_id} names the shard {shard:?}, which is not a plain relative path: refusing to download it, so pick another repo or revision"
            ));
        }
    }
    Ok(shards)
}

/// The snapshot directory of `path`, the local copy of the repo file `name`.
fn snapshot_of(path: &Path, name: &str) -> PathBuf {
    let mut dir = path.to_path_buf();
    for _ in Path::new(name).components() {
        dir.pop();
    }
    dir
}
