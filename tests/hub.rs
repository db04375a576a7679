//! Drives `prolora::hub` through its real HTTP download path against a tiny in-process
//! imitation of the Hub's `/{repo}/resolve/{revision}/{file}` endpoint on 127.0.0.1, with
//! the faults a real network has: 5xx answers, connections cut mid-file, no answer at all.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prolora::hub::{fetch_model, looks_like_repo_id, HubOptions, Patience};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
// The server stops by itself even if a test forgets it or hangs.
const SERVER_LIFETIME: Duration = Duration::from_secs(30);

struct FakeRepo {
    id: &'static str,
    /// Required `Authorization: Bearer` value; `None` for a public repo.
    token: Option<&'static str>,
    files: Vec<(&'static str, Vec<u8>)>,
}

#[derive(Clone, Debug)]
struct Request {
    method: String,
    target: String,
    headers: HashMap<String, String>,
}

/// What goes wrong on the next requests.
#[derive(Default)]
struct Faults {
    /// Answer this many of the next requests with 503.
    unavailable: usize,
    /// Send only the first half of the next file body of more than one byte, then close.
    cut_next_body: bool,
}

struct FakeHub {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Request>>>,
    faults: Arc<Mutex<Faults>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHub {
    fn start(repos: Vec<FakeRepo>) -> FakeHub {
        Self::start_with(repos, Faults::default())
    }

    fn start_with(repos: Vec<FakeRepo>, faults: Faults) -> FakeHub {
        // ureq 2 honours these but ignores NO_PROXY, so 127.0.0.1 would be
        // sent to the proxy; fail with the reason instead of a confusing error.
        for var in [
            "ALL_PROXY",
            "all_proxy",
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
        ] {
            assert!(
                std::env::var_os(var).is_none(),
                "unset {var} to run these tests: ureq ignores NO_PROXY"
            );
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(Mutex::new(faults));
        let (thread_log, thread_stop, thread_faults) = (log.clone(), stop.clone(), faults.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            while !thread_stop.load(Ordering::SeqCst) && started.elapsed() < SERVER_LIFETIME {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = serve(stream, addr, &repos, &thread_log, &thread_faults);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => break,
                }
            }
        });
        FakeHub {
            addr,
            log,
            faults,
            stop,
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Content-derived ETag, standing in for the Hub's git / sha256 hashes.
fn etag(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}{:08x}", bytes.len())
}

fn serve(
    stream: TcpStream,
    addr: SocketAddr,
    repos: &[FakeRepo],
    log: &Mutex<Vec<Request>>,
    faults: &Mutex<Faults>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = HashMap::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let req = Request {
        method,
        target,
        headers,
    };
    log.lock().unwrap().push(req.clone());
    let mut faults = faults.lock().unwrap();
    if faults.unavailable > 0 {
        faults.unavailable -= 1;
        return write_response(stream, &req, respond(503, &[]), None);
    }
    let resp = route(&req, addr, repos);
    let cut = (faults.cut_next_body && resp.body.len() > 1).then(|| {
        faults.cut_next_body = false;
        resp.body.len() / 2
    });
    write_response(stream, &req, resp, cut)
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn respond(status: u16, headers: &[(&str, &str)]) -> Response {
    Response {
        status,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: Vec::new(),
    }
}

fn route(req: &Request, addr: SocketAddr, repos: &[FakeRepo]) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        return respond(405, &[]);
    }
    let all_files = || repos.iter().flat_map(|r| r.files.iter());
    // Stand-in for the CDN that LFS files redirect to: no auth, addressed by hash.
    if let Some(hash) = req.target.strip_prefix("/cdn/") {
        return match all_files().find(|(_, b)| etag(b) == hash) {
            Some((_, bytes)) => ranged(req, bytes, vec![]),
            None => respond(404, &[]),
        };
    }
    let Some((repo_id, rest)) = req.target.trim_start_matches('/').split_once("/resolve/") else {
        return respond(404, &[]);
    };
    let Some(repo) = repos.iter().find(|r| r.id == repo_id) else {
        return respond(404, &[("X-Error-Code", "RepoNotFound")]);
    };
    if let Some(token) = repo.token {
        if req.headers.get("authorization") != Some(&format!("Bearer {token}")) {
            return respond(401, &[("X-Error-Code", "GatedRepo")]);
        }
    }
    let (revision, file) = rest.split_once('/').unwrap_or((rest, ""));
    if revision != "main" && revision != COMMIT {
        return respond(404, &[("X-Error-Code", "RevisionNotFound")]);
    }
    let Some((name, bytes)) = repo.files.iter().find(|(n, _)| *n == file) else {
        return respond(
            404,
            &[("X-Error-Code", "EntryNotFound"), ("X-Repo-Commit", COMMIT)],
        );
    };
    let tag = format!("\"{}\"", etag(bytes));
    if name.ends_with(".safetensors") {
        // Like the Hub for LFS files: redirect to storage, metadata in x-linked-* headers.
        let location = format!("http://{addr}/cdn/{}", etag(bytes));
        let size = bytes.len().to_string();
        return respond(
            302,
            &[
                ("Location", &location),
                ("X-Repo-Commit", COMMIT),
                ("X-Linked-Etag", &tag),
                ("X-Linked-Size", &size),
                ("ETag", "\"not-the-content-hash\""),
            ],
        );
    }
    ranged(
        req,
        bytes,
        vec![
            ("X-Repo-Commit".into(), COMMIT.into()),
            ("ETag".into(), tag),
        ],
    )
}

/// 200, or 206 / 416 when the request has a `Range: bytes=a-[b]` header.
fn ranged(req: &Request, bytes: &[u8], mut headers: Vec<(String, String)>) -> Response {
    let len = bytes.len();
    headers.push(("Accept-Ranges".into(), "bytes".into()));
    let Some(range) = req.headers.get("range") else {
        return Response {
            status: 200,
            headers,
            body: bytes.to_vec(),
        };
    };
    let spec = range.strip_prefix("bytes=").unwrap_or("");
    let (a, b) = spec.split_once('-').unwrap_or(("", ""));
    let start: usize = a.parse().unwrap_or(usize::MAX);
    let end = if b.is_empty() {
        len.saturating_sub(1)
    } else {
        b.parse().unwrap_or(0).min(len.saturating_sub(1))
    };
    if start >= len || end < start {
        headers.push(("Content-Range".into(), format!("bytes */{len}")));
        return Response {
            status: 416,
            headers,
            body: Vec::new(),
        };
    }
    headers.push(("Content-Range".into(), format!("bytes {start}-{end}/{len}")));
    Response {
        status: 206,
        headers,
        body: bytes[start..=end].to_vec(),
    }
}

/// Writes `resp`; with `cut`, only that many bytes of the body before the connection closes.
fn write_response(
    mut stream: TcpStream,
    req: &Request,
    resp: Response,
    cut: Option<usize>,
) -> std::io::Result<()> {
    let reason = match resp.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        503 => "Service Unavailable",
        _ => "Other",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", resp.status);
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        resp.body.len()
    ));
    stream.write_all(head.as_bytes())?;
    if req.method != "HEAD" {
        stream.write_all(&resp.body[..cut.unwrap_or(resp.body.len())])?;
    }
    stream.flush()
}

fn opts(endpoint: &str, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: endpoint.to_string(),
        cache_dir: cache.to_path_buf(),
        token: None,
        offline: false,
        progress: false,
        patience: quick(Duration::from_secs(5)),
    }
}

/// Short timeouts and waits, so a fault costs the test milliseconds.
fn quick(timeout: Duration) -> Patience {
    Patience {
        etag_timeout: timeout,
        download_timeout: timeout,
        retries: 3,
        retry_wait: Duration::from_millis(10),
    }
}

const CONFIG: &[u8] = br#"{"architectures":["LlamaForCausalLM"],"hidden_size":8}"#;
const TOKENIZER: &[u8] = br#"{"version":"1.0","model":{"type":"BPE"}}"#;

fn sharded_repo(id: &'static str) -> FakeRepo {
    let index = br#"{"metadata":{"total_size":64},"weight_map":{
        "model.embed_tokens.weight":"model-00001-of-00002.safetensors",
        "model.norm.weight":"model-00001-of-00002.safetensors",
        "lm_head.weight":"model-00002-of-00002.safetensors"}}"#;
    FakeRepo {
        id,
        token: None,
        files: vec![
            ("config.json", CONFIG.to_vec()),
            ("tokenizer.json", TOKENIZER.to_vec()),
            ("model.safetensors.index.json", index.to_vec()),
            (
                "model-00001-of-00002.safetensors",
                b"shard one: dummy tensor bytes".to_vec(),
            ),
            (
                "model-00002-of-00002.safetensors",
                b"shard two: other dummy bytes!!".to_vec(),
            ),
        ],
    }
}

fn assert_has_files(dir: &Path, repo: &FakeRepo) {
    for (name, bytes) in &repo.files {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), bytes, "{name}");
    }
}

fn err_text(r: anyhow::Result<PathBuf>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

#[test]
fn sharded_public_model_lands_in_hf_layout_and_is_reused_from_cache() {
    let hub = FakeHub::start(vec![sharded_repo("acme/tiny-llama")]);
    let expected = sharded_repo("acme/tiny-llama");
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&hub.endpoint(), cache.path());

    let dir = fetch_model("acme/tiny-llama", "main", &o).unwrap();
    let repo_dir = cache.path().join("models--acme--tiny-llama");
    assert_eq!(dir, repo_dir.join("snapshots").join(COMMIT));
    assert_has_files(&dir, &expected);
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT
    );
    for (name, bytes) in &expected.files {
        assert!(
            repo_dir.join("blobs").join(etag(bytes)).is_file(),
            "blob of {name}"
        );
        #[cfg(unix)]
        assert!(dir
            .join(name)
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_symlink());
    }

    let reqs = hub.requests();
    assert!(reqs
        .iter()
        .all(|r| r.method == "GET" && r.headers.contains_key("range")));
    assert!(reqs
        .iter()
        .all(|r| !r.headers.contains_key("authorization")));
    let first = &reqs[0];
    assert_eq!(first.target, "/acme/tiny-llama/resolve/main/config.json");
    assert_eq!(first.headers["range"], "bytes=0-0");
    assert!(
        reqs.iter().any(|r| r.target.starts_with("/cdn/")),
        "LFS redirect followed"
    );

    // Everything is cached now: no request at all, online or offline.
    let before = hub.requests().len();
    assert_eq!(fetch_model("acme/tiny-llama", "main", &o).unwrap(), dir);
    assert_eq!(hub.requests().len(), before);
    let offline = HubOptions {
        offline: true,
        ..o.clone()
    };
    assert_eq!(
        fetch_model("acme/tiny-llama", "main", &offline).unwrap(),
        dir
    );
    // Pinning the commit finds the snapshot even without a refs/<commit> file.
    assert_eq!(
        fetch_model("acme/tiny-llama", COMMIT, &offline).unwrap(),
        dir
    );

    drop(hub);
    assert_eq!(fetch_model("acme/tiny-llama", "main", &o).unwrap(), dir);
    assert_has_files(&dir, &expected);
}

#[test]
fn gated_repo_needs_the_token() {
    let gated = || FakeRepo {
        id: "meta-llama/Tiny-gated",
        token: Some("hf_secret"),
        files: vec![
            ("config.json", CONFIG.to_vec()),
            ("model.safetensors", b"single-file dummy weights".to_vec()),
        ],
    };
    let hub = FakeHub::start(vec![gated()]);
    let ep = hub.endpoint();
    let cache = tempfile::tempdir().unwrap();
    let mut o = opts(&ep, cache.path());

    let msg = err_text(fetch_model("meta-llama/Tiny-gated", "main", &o));
    assert!(msg.contains("HTTP 401"), "{msg}");
    assert!(msg.contains("meta-llama/Tiny-gated"), "{msg}");
    assert!(msg.contains("HF_TOKEN"), "{msg}");
    assert!(
        msg.contains(&format!("{ep}/meta-llama/Tiny-gated")),
        "{msg}"
    );
    assert!(msg.contains(&format!("{ep}/settings/tokens")), "{msg}");

    o.token = Some("hf_wrong".into());
    let msg = err_text(fetch_model("meta-llama/Tiny-gated", "main", &o));
    assert!(
        msg.contains("HTTP 401") && msg.contains("no access"),
        "{msg}"
    );

    o.token = Some("hf_secret".into());
    let dir = fetch_model("meta-llama/Tiny-gated", "main", &o).unwrap();
    assert_has_files(&dir, &gated());
    assert!(
        !dir.join("tokenizer.json").exists(),
        "tokenizer.json is optional"
    );
    let reqs = hub.requests();
    let authed = reqs
        .iter()
        .filter(|r| r.headers.get("authorization").map(String::as_str) == Some("Bearer hf_secret"));
    assert!(authed.count() >= 2, "{reqs:?}");
}

#[test]
fn missing_weights_and_missing_repo_are_clear_404_errors() {
    let bin_only = FakeRepo {
        id: "acme/bin-only",
        token: None,
        files: vec![
            ("config.json", CONFIG.to_vec()),
            ("tokenizer.json", TOKENIZER.to_vec()),
            ("pytorch_model.bin", b"pickle".to_vec()),
        ],
    };
    let hub = FakeHub::start(vec![bin_only, sharded_repo("acme/tiny-llama")]);
    let ep = hub.endpoint();
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&ep, cache.path());

    let msg = err_text(fetch_model("acme/bin-only", "main", &o));
    assert!(
        msg.contains("acme/bin-only") && msg.contains("HTTP 404"),
        "{msg}"
    );
    assert!(
        msg.contains("neither model.safetensors nor model.safetensors.index.json"),
        "{msg}"
    );
    assert!(msg.contains(".bin"), "{msg}");

    let msg = err_text(fetch_model("acme/no-such-model", "main", &o));
    assert!(
        msg.contains("model repo acme/no-such-model (revision main) not found on"),
        "{msg}"
    );
    assert!(
        msg.contains(&ep) && msg.contains("HTTP 404") && msg.contains("check the id and revision"),
        "{msg}"
    );

    let msg = err_text(fetch_model("acme/tiny-llama", "no-such-branch", &o));
    assert!(
        msg.contains("(revision no-such-branch) not found") && msg.contains("HTTP 404"),
        "{msg}"
    );
}

#[test]
fn offline_mode_uses_only_the_cache_and_names_the_missing_file() {
    let cache = tempfile::tempdir().unwrap();
    // Nothing listens here: offline mode must not even try.
    let o = HubOptions {
        offline: true,
        ..opts("http://127.0.0.1:9", cache.path())
    };
    let msg = err_text(fetch_model("acme/tiny-llama", "main", &o));
    assert!(
        msg.contains("config.json") && msg.contains("acme/tiny-llama"),
        "{msg}"
    );
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");

    // A cache written by another tool that holds config.json but no weights.
    let repo_dir = cache.path().join("models--acme--tiny-llama");
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), COMMIT).unwrap();
    let snap = repo_dir.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(snap.join("config.json"), CONFIG).unwrap();
    let msg = err_text(fetch_model("acme/tiny-llama", "main", &o));
    assert!(
        msg.contains("model.safetensors") && msg.contains("not in the Hugging Face cache"),
        "{msg}"
    );

    std::fs::write(snap.join("model.safetensors"), b"w").unwrap();
    assert_eq!(fetch_model("acme/tiny-llama", "main", &o).unwrap(), snap);
}

#[test]
fn unreachable_endpoint_suggests_offline_mode() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ep = format!("http://127.0.0.1:{port}");
    let cache = tempfile::tempdir().unwrap();
    let msg = err_text(fetch_model(
        "acme/tiny-llama",
        "main",
        &opts(&ep, cache.path()),
    ));
    assert!(msg.contains(&format!("cannot reach {ep}")), "{msg}");
    assert!(
        msg.contains("HF_HUB_OFFLINE=1") && msg.contains("local model directory"),
        "{msg}"
    );
}

#[test]
fn branch_moved_since_an_earlier_partial_download_yields_one_snapshot() {
    let hub = FakeHub::start(vec![sharded_repo("acme/tiny-llama")]);
    let cache = tempfile::tempdir().unwrap();
    // An older commit of "main" whose config.json alone was downloaded before.
    let old = "fedcba9876543210fedcba9876543210fedcba98";
    let repo_dir = cache.path().join("models--acme--tiny-llama");
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), old).unwrap();
    std::fs::create_dir_all(repo_dir.join("snapshots").join(old)).unwrap();
    std::fs::write(
        repo_dir.join("snapshots").join(old).join("config.json"),
        b"{}",
    )
    .unwrap();

    let dir = fetch_model(
        "acme/tiny-llama",
        "main",
        &opts(&hub.endpoint(), cache.path()),
    )
    .unwrap();
    assert_eq!(dir, repo_dir.join("snapshots").join(COMMIT));
    assert_has_files(&dir, &sharded_repo("acme/tiny-llama"));
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT
    );
}

#[test]
fn repo_ids_versus_local_paths() {
    for id in [
        "meta-llama/Llama-2-7b-hf",
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "a/b",
        "src/not-here",
    ] {
        assert!(looks_like_repo_id(id), "{id}");
    }
    let not_ids = [
        "",
        "gpt2",
        "./models/llama",
        "../llama",
        "/abs/llama",
        "~/llama",
        "a/b/c",
        "org/",
        "/name",
        "org/-x",
        "org/x.",
        "org/a--b",
        "org name/x",
        r"C:\models\llama",
        "tests/hub.rs", // exists relative to the package root, where cargo runs tests
    ];
    for s in not_ids {
        assert!(!looks_like_repo_id(s), "{s:?}");
    }
}

/// The whole user path: `prolora eval --model org/name` downloads a gated model through the
/// Hub protocol (HF_ENDPOINT, HF_TOKEN from the environment) and evaluates it.
#[test]
fn cli_eval_downloads_a_gated_model_and_matches_pytorch() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft-lora");
    let file = |name: &str| std::fs::read(base.join("base").join(name)).unwrap();
    let hub = FakeHub::start(vec![FakeRepo {
        id: "acme/peft-base",
        token: Some("hf_cli_token"),
        files: vec![
            ("config.json", file("config.json")),
            ("tokenizer.json", file("tokenizer.json")),
            ("model.safetensors", file("model.safetensors")),
        ],
    }]);
    let cache = tempfile::tempdir().unwrap();
    let run = |token: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_prolora"));
        cmd.args(["eval", "--model", "acme/peft-base", "--adapter"])
            .arg(base.join("adapter"))
            .arg("--data")
            .arg(base.join("data.jsonl"))
            .args(["--max-seq-len", "64", "--json"])
            .env("HF_ENDPOINT", hub.endpoint())
            .env("HF_HOME", cache.path())
            .env("HF_HUB_CACHE", cache.path().join("hub"))
            .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_TOKEN");
        if let Some(t) = token {
            cmd.env("HF_TOKEN", t);
        }
        cmd.output().unwrap()
    };

    let denied = run(None);
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(!denied.status.success());
    assert!(
        err.contains("HTTP 401") && err.contains("HF_TOKEN") && !err.contains("panicked"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let ok = run(Some("hf_cli_token"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("expected.json")).unwrap())
            .unwrap();
    let (ours, want) = (
        out["loss"].as_f64().unwrap(),
        expected["loss"].as_f64().unwrap(),
    );
    assert!(((ours - want) / want).abs() < 1e-4, "loss {ours} vs {want}");
    assert!(cache
        .path()
        .join("hub/models--acme--peft-base/snapshots")
        .is_dir());
}

/// `prolora params` on a Hub id needs the shapes only: it fetches config.json and no weights.
#[test]
fn params_on_a_hub_id_fetches_only_the_config() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft-lora/base");
    let file = |name: &str| std::fs::read(base.join(name)).unwrap();
    let hub = FakeHub::start(vec![FakeRepo {
        id: "acme/shapes-only",
        token: None,
        files: vec![
            ("config.json", file("config.json")),
            ("tokenizer.json", file("tokenizer.json")),
            ("model.safetensors", file("model.safetensors")),
        ],
    }]);
    let cache = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args([
            "params",
            "--model",
            "acme/shapes-only",
            "--method",
            "lora",
            "--rank",
            "2",
            "--json",
        ])
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_HOME", cache.path())
        .env("HF_HUB_CACHE", cache.path().join("hub"))
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // hidden 32, kv 16, intermediate 64, r 2, per layer: q, o 2·(32+32); k, v 2·(32+16);
    // gate, up, down 2·(32+64) — 1024, times 2 layers.
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["params"], 2048, "{report}");
    let asked: Vec<String> = hub.requests().iter().map(|r| r.target.clone()).collect();
    assert!(
        asked.iter().all(|t| t.ends_with("/config.json")),
        "{asked:?}"
    );
}

/// Accepts connections and never answers; holds them until dropped.
struct SilentHub {
    addr: SocketAddr,
    _thread: JoinHandle<()>,
}

impl SilentHub {
    fn start() -> SilentHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut held = Vec::new();
            listener.set_nonblocking(true).unwrap();
            while started.elapsed() < SERVER_LIFETIME {
                if let Ok((stream, _)) = listener.accept() {
                    held.push(stream);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        SilentHub {
            addr,
            _thread: thread,
        }
    }
}

#[test]
fn a_hub_that_never_answers_fails_within_the_timeout() {
    let silent = SilentHub::start();
    let cache = tempfile::tempdir().unwrap();
    let o = HubOptions {
        patience: quick(Duration::from_secs(1)),
        ..opts(&format!("http://{}", silent.addr), cache.path())
    };
    let started = Instant::now();
    let msg = err_text(fetch_model("acme/tiny-llama", "main", &o));
    // Not a speed check: without a timeout this call never returns at all.
    assert!(started.elapsed() < Duration::from_secs(20), "{msg}");
    assert!(msg.contains("did not answer within 1 s"), "{msg}");
    assert!(msg.contains("HF_HUB_ETAG_TIMEOUT"), "{msg}");

    // The same through the binary, with huggingface_hub's environment variable.
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args(["params", "--model", "acme/tiny-llama", "--method", "lora"])
        .env("HF_ENDPOINT", format!("http://{}", silent.addr))
        .env("HF_HUB_ETAG_TIMEOUT", "1")
        .env("HF_HUB_CACHE", cache.path())
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(20), "{err}");
    assert!(err.contains("did not answer within 1 s"), "{err}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args(["params", "--model", "acme/tiny-llama", "--method", "lora"])
        .env("HF_ENDPOINT", format!("http://{}", silent.addr))
        .env("HF_HUB_DOWNLOAD_TIMEOUT", "soon")
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HF_HUB_DOWNLOAD_TIMEOUT=\"soon\" is not a timeout"),
        "{err}"
    );
}

#[test]
fn server_errors_are_retried_and_then_named() {
    let faults = Faults {
        unavailable: 2,
        ..Faults::default()
    };
    let hub = FakeHub::start_with(vec![sharded_repo("acme/tiny-llama")], faults);
    let cache = tempfile::tempdir().unwrap();
    let dir = fetch_model(
        "acme/tiny-llama",
        "main",
        &opts(&hub.endpoint(), cache.path()),
    )
    .unwrap();
    assert_has_files(&dir, &sharded_repo("acme/tiny-llama"));
    let reqs = hub.requests();
    assert_eq!(
        reqs[0].target, reqs[2].target,
        "the first request, tried three times"
    );

    hub.faults.lock().unwrap().unavailable = 100;
    let other = tempfile::tempdir().unwrap();
    let msg = err_text(fetch_model(
        "acme/tiny-llama",
        "main",
        &opts(&hub.endpoint(), other.path()),
    ));
    assert!(
        msg.contains("HTTP 503") && msg.contains("after 3 retries"),
        "{msg}"
    );
}

#[test]
fn a_connection_cut_mid_file_resumes_with_a_range_request() {
    let faults = Faults {
        cut_next_body: true,
        ..Faults::default()
    };
    let hub = FakeHub::start_with(vec![sharded_repo("acme/tiny-llama")], faults);
    let cache = tempfile::tempdir().unwrap();
    let dir = fetch_model(
        "acme/tiny-llama",
        "main",
        &opts(&hub.endpoint(), cache.path()),
    )
    .unwrap();
    assert_has_files(&dir, &sharded_repo("acme/tiny-llama"));
    let half = CONFIG.len() / 2;
    let config_ranges: Vec<String> = hub
        .requests()
        .iter()
        .filter(|r| r.target.ends_with("/config.json"))
        .map(|r| r.headers["range"].clone())
        .collect();
    assert_eq!(
        config_ranges,
        ["bytes=0-0", "bytes=0-", &format!("bytes={half}-")],
        "metadata, the cut transfer, its resumption"
    );
}

#[test]
fn a_partial_download_left_by_an_earlier_run_is_resumed() {
    let hub = FakeHub::start(vec![sharded_repo("acme/tiny-llama")]);
    let cache = tempfile::tempdir().unwrap();
    let blobs = cache.path().join("models--acme--tiny-llama/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    // What huggingface_hub or an interrupted prolora leaves: the first bytes, named by hash.
    std::fs::write(
        blobs.join(format!("{}.incomplete", etag(CONFIG))),
        &CONFIG[..10],
    )
    .unwrap();
    let dir = fetch_model(
        "acme/tiny-llama",
        "main",
        &opts(&hub.endpoint(), cache.path()),
    )
    .unwrap();
    assert_eq!(std::fs::read(dir.join("config.json")).unwrap(), CONFIG);
    let reqs = hub.requests();
    assert!(
        reqs.iter()
            .any(|r| r.target.ends_with("/config.json") && r.headers["range"] == "bytes=10-"),
        "{reqs:?}"
    );
    assert!(!blobs.join(format!("{}.incomplete", etag(CONFIG))).exists());
}

#[test]
fn credentials_in_the_endpoint_are_never_echoed() {
    let hub = FakeHub::start(vec![sharded_repo("acme/tiny-llama")]);
    let cache = tempfile::tempdir().unwrap();
    let with_secret = format!("http://user:s3cret@{}", hub.addr);
    let msg = err_text(fetch_model(
        "acme/no-such-model",
        "main",
        &opts(&with_secret, cache.path()),
    ));
    assert!(msg.contains(&format!("http://***@{}", hub.addr)), "{msg}");
    assert!(!msg.contains("s3cret"), "{msg}");

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let closed = format!("http://user:s3cret@127.0.0.1:{port}");
    let msg = err_text(fetch_model(
        "acme/tiny-llama",
        "main",
        &opts(&closed, cache.path()),
    ));
    assert!(msg.contains("cannot reach http://***@127.0.0.1"), "{msg}");
    assert!(!msg.contains("s3cret"), "{msg}");
}

/// An adapter trained on a downloaded model names the Hub id as its base, not the cache path.
#[test]
fn a_trained_adapter_records_the_hub_id_as_its_base() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft-lora");
    let file = |name: &str| std::fs::read(base.join("base").join(name)).unwrap();
    let hub = FakeHub::start(vec![FakeRepo {
        id: "acme/peft-base",
        token: None,
        files: vec![
            ("config.json", file("config.json")),
            ("tokenizer.json", file("tokenizer.json")),
            ("model.safetensors", file("model.safetensors")),
        ],
    }]);
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let data = base.join("data.jsonl");
    let set = |kv: String| ["--set".to_string(), kv];
    let mut args = vec![
        "train".to_string(),
        "--config".into(),
        "configs/demo.toml".into(),
    ];
    for kv in [
        format!("output_dir={}", run.display()),
        "model.source=acme/peft-base".into(),
        format!("data.train={}", data.display()),
        format!("data.eval={}", data.display()),
        "data.max_seq_len=64".into(),
        "train.steps=1".into(),
        "train.eval_every=0".into(),
    ] {
        args.extend(set(kv));
    }
    args.push("--quiet".into());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args(&args)
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_HUB_CACHE", tmp.path().join("hub"))
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let adapter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(adapter["base_model_name_or_path"], "acme/peft-base");
}

/// A download into a log (stderr not a terminal, as in a Slurm job) shows plain progress lines
/// in MiB with the rate and the time left, where a bar would show nothing.
#[test]
fn a_download_writes_progress_lines_into_a_log() {
    let tokenizer =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/llama2-tokenizer.json"))
            .unwrap();
    let config = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft-lora/base/config.json"),
    )
    .unwrap();
    let hub = FakeHub::start(vec![FakeRepo {
        id: "acme/tok",
        token: None,
        files: vec![
            ("config.json", config),
            ("tokenizer.json", tokenizer),
            ("model.safetensors", b"not read".to_vec()),
        ],
    }]);
    let cache = tempfile::tempdir().unwrap();
    let out = cache.path().join("encoded.jsonl");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args(["data", "encode", "--tokenizer", "acme/tok", "--data"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample_chat_eval.jsonl"))
        .arg("--out")
        .arg(&out)
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_HOME", cache.path())
        .env("HF_HUB_CACHE", cache.path().join("hub"))
        .env_remove("HF_HUB_DISABLE_PROGRESS_BARS")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains("tokenizer.json 1/1 MiB, ") && l.contains(" MiB/s eta ")),
        "{err}"
    );
}

/// The tokenizer's companions (special tokens, chat template, EOS ids) come with it when the repo
/// has them; the ones it lacks are remembered as huggingface_hub remembers them, so the cached
/// model makes no request.
#[test]
fn tokenizer_companions_are_fetched_and_absent_ones_remembered() {
    let mut repo = sharded_repo("acme/chat-llama");
    let config = br#"{"eos_token": "</s>", "chat_template": "{{ messages[0].content }}"}"#;
    repo.files.push(("tokenizer_config.json", config.to_vec()));
    let expected_files = repo.files.clone();
    let hub = FakeHub::start(vec![repo]);
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&hub.endpoint(), cache.path());

    let dir = fetch_model("acme/chat-llama", "main", &o).unwrap();
    for (name, bytes) in &expected_files {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), bytes, "{name}");
    }
    let no_exist = cache
        .path()
        .join("models--acme--chat-llama/.no_exist")
        .join(COMMIT);
    for absent in [
        "special_tokens_map.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        assert!(!dir.join(absent).exists(), "{absent}");
        assert!(
            no_exist.join(absent).is_file(),
            "{absent} remembered as absent"
        );
    }
    let before = hub.requests().len();
    assert_eq!(fetch_model("acme/chat-llama", "main", &o).unwrap(), dir);
    assert_eq!(hub.requests().len(), before, "no request once cached");
}
