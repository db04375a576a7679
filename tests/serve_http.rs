//! `prolora serve` driven over 127.0.0.1 by raw HTTP (and curl for the event stream where it
//! is installed): answers equal `prolora generate` with the same adapter alone; adapters of all
//! four methods in one batch; stop, seed, streaming; errors with their status and OpenAI's
//! shape; the API key; the queue limit; adapters loaded only from below --adapter-root; a client
//! leaving mid-stream frees its row; SIGTERM lets the stream in flight finish and exits 0.

use prolora::model::preset;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

const KEY: &str = "sk-test-key";

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the server on a free port and waits for its "serving" line.
fn start(args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args(["serve", "--model", "tiny", "--port", "0", "--api-key", KEY])
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines.next().expect("a line").unwrap();
    let port = line
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("not the serving line: {line}"))
        .parse()
        .unwrap();
    // Keep draining stderr so the server never blocks on it.
    std::thread::spawn(move || lines.for_each(drop));
    Server { child, port }
}

/// One request; the status, the headers (lower-case names) and the body.
fn http(
    port: u16,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn post(port: u16, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, body) = http(port, "POST", path, Some(KEY), &body.to_string());
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

fn chat(port: u16, model: &str, content: &str, extra: Value) -> (u16, Value) {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": content}],
        "max_tokens": 12, "temperature": 0});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    post(port, "/v1/chat/completions", &body)
}

fn text_of(answer: &Value) -> String {
    let c = &answer["choices"][0];
    c["message"]["content"]
        .as_str()
        .or(c["text"].as_str())
        .unwrap()
        .to_string()
}

/// The adapters of the tests for the `tiny` preset, one per method, in `root`.
fn write_adapters(root: &Path) {
    let cfg = preset::preset("tiny").unwrap();
    for (i, kind) in ["lora", "prolora", "vera", "tied-lora"].iter().enumerate() {
        let mut method = common::serve::method_config(kind);
        if *kind == "prolora" {
            // The paper's shape: r 8, u 1, m = n = 7.
            method.rank = 8;
            method.method = (prolora::adapters::registry::by_kind("prolora")
                .unwrap()
                .from_toml)(toml::Table::new())
            .unwrap();
        }
        common::serve::write_adapter(&root.join(kind), &method, &cfg, 60 + i as u64, 0.3);
    }
}

/// `prolora generate` of `prompt` with `adapter` alone, greedy, 12 tokens.
fn generate_alone(adapter: &Path, prompt: &str) -> String {
    let out = common::prolora(&[
        "generate",
        "--model",
        "tiny",
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "12",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').unwrap().to_string()
}

/// The `data:` payloads of an event stream.
fn events(raw: &str) -> Vec<String> {
    raw.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(String::from)
        .collect()
}

#[test]
fn the_server_answers_as_generate_does_and_keeps_its_limits() {
    let tmp = tempfile::tempdir().unwrap();
    // Adapters served from the start by name, and a root (below which run-time loads may read)
    // whose adapters are served by their path under it.
    let boot = tmp.path().join("boot");
    let root = tmp.path().join("root");
    write_adapters(&boot);
    write_adapters(&root.join("team"));
    let server = start(&[
        "--adapter",
        &format!("lora={}", boot.join("lora").display()),
        "--adapter",
        &format!("prolora={}", boot.join("prolora").display()),
        "--adapter",
        &format!("vera={}", boot.join("vera").display()),
        "--adapter",
        &format!("tied={}", boot.join("tied-lora").display()),
        "--adapter-root",
        root.to_str().unwrap(),
        "--max-batch",
        "4",
        "--max-queue",
        "2",
        "--max-model-len",
        "96",
    ]);
    let port = server.port;

    // The key: everything but /health needs it.
    assert_eq!(http(port, "GET", "/health", None, "").0, 200);
    let (status, _, body) = http(port, "GET", "/v1/models", None, "");
    assert_eq!(status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["code"],
        "invalid_api_key"
    );
    assert_eq!(
        http(port, "GET", "/v1/models", Some("sk-wrong-key"), "").0,
        401
    );
    let (status, _, body) = http(port, "GET", "/v1/models", Some(KEY), "");
    assert_eq!(status, 200);
    let ids: Vec<String> = serde_json::from_str::<Value>(&body).unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    // --adapter-root's adapters are served too, named by their path under it.
    for want in [
        "tiny",
        "lora",
        "prolora",
        "vera",
        "tied",
        "team/lora",
        "team/tied-lora",
    ] {
        assert!(ids.iter().any(|id| id == want), "{want} in {ids:?}");
    }

    // Four adapters of four methods and the base, all at once: each answer is what `prolora
    // generate` gives with that adapter alone.
    let prompt = "Write a haiku about the sea.";
    let cases = [
        ("lora", "lora"),
        ("prolora", "prolora"),
        ("vera", "vera"),
        ("tied", "tied-lora"),
    ];
    let answers: Vec<(String, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(name, _)| {
                s.spawn(move || (name.to_string(), chat(port, name, prompt, json!({}))))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let (name, (status, answer)) = h.join().unwrap();
                assert_eq!(status, 200, "{name}: {answer}");
                (name, answer)
            })
            .collect()
    });
    let mut texts = Vec::new();
    for ((name, answer), (_, dir)) in answers.iter().zip(cases) {
        let want = generate_alone(&boot.join(dir), prompt);
        assert_eq!(text_of(answer), want, "{name}");
        assert_eq!(answer["object"], "chat.completion");
        assert_eq!(answer["usage"]["completion_tokens"], 12);
        assert_eq!(answer["choices"][0]["finish_reason"], "length");
        texts.push(want);
    }
    texts.dedup();
    assert_eq!(texts.len(), 4, "each adapter changes the answer");

    // A stop sequence cuts the text before it; a seed repeats a sample.
    let full = text_of(&chat(port, "prolora", prompt, json!({})).1);
    let word = full.split_whitespace().nth(2).unwrap().to_string();
    let (_, stopped) = chat(port, "prolora", prompt, json!({"stop": [word.clone()]}));
    assert_eq!(text_of(&stopped), full[..full.find(&word).unwrap()]);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    let sampled = |seed: u64| {
        text_of(
            &chat(
                port,
                "vera",
                prompt,
                json!({"temperature": 1.0, "seed": seed}),
            )
            .1,
        )
    };
    assert_eq!(sampled(5), sampled(5));
    assert_ne!(sampled(5), sampled(6));

    // The stream: its deltas add up to the answer, then [DONE]; raw completions too.
    let body = json!({"model": "lora", "prompt": "Once upon a time", "max_tokens": 10,
        "temperature": 0, "stream": true});
    let (status, head, raw) = http(
        port,
        "POST",
        "/v1/completions",
        Some(KEY),
        &body.to_string(),
    );
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/event-stream"));
    let data = events(&raw);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["usage"]["completion_tokens"], 10);
    let whole = post(
        port,
        "/v1/completions",
        &json!({"model": "lora", "prompt": "Once upon a time",
        "max_tokens": 10, "temperature": 0}),
    )
    .1;
    assert_eq!(streamed, text_of(&whole));
    assert_eq!(whole["object"], "text_completion");
    // curl reads the same stream.
    if let Ok(out) = Command::new("curl")
        .args([
            "-sN",
            "-H",
            &format!("Authorization: Bearer {KEY}"),
            "-d",
            &body.to_string(),
        ])
        .arg(format!("http://127.0.0.1:{port}/v1/completions"))
        .output()
    {
        let data = events(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let curl_text: String = data[..data.len() - 1]
            .iter()
            .map(|d| {
                serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(curl_text, streamed);
    }

    // Errors: status, OpenAI's shape, the parameter named.
    let err = |body: Value, path: &str| post(port, path, &body);
    let (s, e) = err(
        json!({"model": "lora", "prompt": "x", "n": 2}),
        "/v1/completions",
    );
    assert_eq!((s, e["error"]["param"].as_str()), (400, Some("n")));
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let (s, e) = err(json!({"model": "nope", "prompt": "x"}), "/v1/completions");
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let (s, e) = err(
        json!({"model": "lora", "prompt": "x", "max_tokens": "9"}),
        "/v1/completions",
    );
    assert_eq!((s, e["error"]["param"].as_str()), (400, Some("max_tokens")));
    let long = "word ".repeat(200);
    let (s, e) = err(json!({"model": "lora", "prompt": long}), "/v1/completions");
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("context_length_exceeded"))
    );
    assert!(
        e["error"]["message"].as_str().unwrap().contains("96"),
        "{e}"
    );
    let (s, e) = err(
        json!({"model": "lora", "prompt": "x", "max_tokens": 500}),
        "/v1/completions",
    );
    assert_eq!((s, e["error"]["param"].as_str()), (400, Some("max_tokens")));
    let (s, _, body) = http(port, "POST", "/v1/completions", Some(KEY), "{not json");
    assert_eq!(s, 400);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"]["message"].is_string());
    assert_eq!(http(port, "GET", "/v1/completions", Some(KEY), "").0, 405);
    assert_eq!(http(port, "GET", "/v2/nothing", Some(KEY), "").0, 404);
    // A body past the limit is refused from its Content-Length alone.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");

    // Run-time adapters: only from below --adapter-root.
    let load = |name: &str, path: &str| {
        post(
            port,
            "/v1/load_lora_adapter",
            &json!({"lora_name": name, "lora_path": path}),
        )
    };
    let outside = boot.join("lora");
    assert_eq!(load("x", outside.to_str().unwrap()).0, 403);
    assert_eq!(load("x", "../boot/lora").0, 403);
    assert_eq!(load("x", "/etc").0, 403);
    assert_eq!(load("lora", "team/lora").0, 400, "a name in use");
    let (s, msg) = load("fresh", "team/vera");
    assert_eq!(s, 200, "{msg}");
    assert_eq!(chat(port, "fresh", prompt, json!({})).0, 200);
    assert_eq!(
        post(
            port,
            "/v1/unload_lora_adapter",
            &json!({"lora_name": "fresh"})
        )
        .0,
        200
    );
    assert_eq!(chat(port, "fresh", prompt, json!({})).0, 404);
    assert_eq!(
        post(
            port,
            "/v1/unload_lora_adapter",
            &json!({"lora_name": "fresh"})
        )
        .0,
        404
    );

    // A full queue: 4 rows run, 2 wait, the rest are told to retry.
    let statuses: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..14)
            .map(|i| {
                let name = ["lora", "prolora", "vera", "tied"][i % 4];
                s.spawn(move || {
                    let body =
                        json!({"model": name, "prompt": "a", "max_tokens": 90, "temperature": 0});
                    let (status, head, _) = http(
                        port,
                        "POST",
                        "/v1/completions",
                        Some(KEY),
                        &body.to_string(),
                    );
                    (status, head)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        statuses.iter().all(|(s, _)| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    let refused: Vec<_> = statuses.iter().filter(|(s, _)| *s == 429).collect();
    assert!(
        !refused.is_empty() && refused.len() <= 14 - 6,
        "{}",
        refused.len()
    );
    assert!(refused
        .iter()
        .all(|(_, head)| head.contains("retry-after: 1")));

    // A client that leaves mid-stream frees its row.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body =
        json!({"model": "prolora", "prompt": "a", "max_tokens": 90, "stream": true}).to_string();
    write!(s, "POST /v1/completions HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut first = [0u8; 64];
    s.read_exact(&mut first).unwrap();
    drop(s);
    let metric = |name: &str| -> f64 {
        let (_, _, text) = http(port, "GET", "/metrics", Some(KEY), "");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    let since = Instant::now();
    while metric("prolora_running_rows ") > 0.0 {
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "a row stayed after its client left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(metric("prolora_generation_tokens_total ") > 100.0);
    let (_, _, text) = http(port, "GET", "/metrics", Some(KEY), "");
    assert!(text.contains("prolora_requests_total{endpoint=\"/v1/completions\",status=\"429\"}"));
    assert!(text.contains("prolora_time_to_first_token_seconds_count"));
    assert!(metric("prolora_adapter_bytes ") > 0.0);

    // Keep-alive: two requests sent at once on one connection, both answered on it in order;
    // the second's `Connection: close` is honoured (the server closes after it).
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body =
        json!({"model": "lora", "prompt": "a", "max_tokens": 3, "temperature": 0}).to_string();
    write!(
        s,
        "GET /v1/models HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n\r\nPOST /v1/completions HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(s);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        assert!(reader.read_line(&mut head).unwrap() > 0, "{head}");
    }
    let head = head.to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 200") && head.contains("connection: keep-alive"),
        "{head}"
    );
    let length: usize = head
        .split("content-length: ")
        .nth(1)
        .and_then(|v| v.split("\r\n").next())
        .unwrap()
        .parse()
        .unwrap();
    let mut models = vec![0u8; length];
    reader.read_exact(&mut models).unwrap();
    let models: Value = serde_json::from_slice(&models).unwrap();
    assert!(models["data"].as_array().unwrap().len() > 4, "{models}");
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    let (head, answer) = rest.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 200") && head.contains("connection: close"),
        "{head}"
    );
    let answer: Value = serde_json::from_str(answer).unwrap();
    assert!(
        answer["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{answer}"
    );

    // SIGTERM: the stream in flight finishes, new connections are refused, exit 0.
    let mut server = server;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // `ignore_eos`: a sampled end of sequence would end the stream early with "stop".
    let body = json!({"model": "tied", "prompt": "a", "max_tokens": 80, "stream": true,
                      "ignore_eos": true})
    .to_string();
    write!(s, "POST /v1/completions HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut first = [0u8; 16];
    s.read_exact(&mut first).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    assert!(rest.contains("\"finish_reason\":\"length\""));
    let status = server.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}
