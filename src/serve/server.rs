//! The server: a thread per connection in front of the engine's thread (which owns the model).
//! Connections parse, check and tokenize a request, queue it, and turn the engine's tokens into
//! the answer or its event stream; a client that goes away drops its channel, which frees its
//! row. SIGTERM/SIGINT stop accepting, let the requests in flight finish within
//! `drain_timeout`, and return (exit 0).

use super::api::{self, Answer, ApiError, Params, Prompt};
use super::engine::{Command, Engine, Event, Finish, Job, Sampling};
use super::http::{self, Request};
use super::metrics::Metrics;
use super::text::TextStream;
use crate::adapters::peft;
use crate::data::chat::ChatEncoder;
use crate::model::Llama;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub struct Options {
    pub host: String,
    /// 0: any free port (the one bound is printed).
    pub port: u16,
    pub api_key: Option<String>,
    pub max_batch: usize,
    pub max_queue: usize,
    pub max_loaded: Option<usize>,
    /// Positions a request may reach (prompt + completion); None: the model's.
    pub max_model_len: Option<usize>,
    pub max_body: usize,
    /// Adapters served from the start, by name.
    pub adapters: Vec<(String, PathBuf)>,
    /// Where adapters may be loaded from at run time.
    pub adapter_root: Option<PathBuf>,
    /// The base model's name in the API (`model` naming no adapter).
    pub base_name: String,
    pub drain_timeout: Duration,
}

/// Loads the base model and its tokenizer, on the engine's thread.
pub type Loader = Box<dyn FnOnce() -> Result<(Llama, ChatEncoder)> + Send>;

/// Connections held at once; past this one is closed unanswered.
const MAX_CONNECTIONS: usize = 1024;

struct State {
    options: Options,
    encoder: ChatEncoder,
    vocab_size: usize,
    max_len: usize,
    commands: Mutex<Sender<Command>>,
    names: Arc<Mutex<Vec<String>>>,
    metrics: Arc<Metrics>,
    /// Requests in the engine (running or waiting).
    pending: AtomicUsize,
    connections: AtomicUsize,
    next_id: AtomicU64,
    root: Option<PathBuf>,
}

impl State {
    /// Hands `command` to the engine thread; an error once it has stopped.
    fn send(&self, command: Command) -> Result<(), std::sync::mpsc::SendError<Command>> {
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(command)
    }
}

/// Serves until a stop signal; returns once the requests in flight are answered (or the
/// drain deadline passed).
pub fn serve(options: Options, load: Loader) -> Result<()> {
    let _signals = crate::signals::catch_stop_signals();
    let root = match &options.adapter_root {
        Some(root) => Some(
            root.canonicalize()
                .with_context(|| format!("--adapter-root {}", root.display()))?,
        ),
        None => None,
    };
    let metrics = Arc::new(Metrics::default());
    let (commands, received) = channel();
    let (ready, started) = channel();
    let engine_metrics = metrics.clone();
    let (max_batch, max_loaded, max_model_len) =
        (options.max_batch, options.max_loaded, options.max_model_len);
    let adapters = options.adapters.clone();
    quiet_elementwise_pool();
    std::thread::Builder::new()
        .name("engine".into())
        // The engine runs as a job of rayon's pool, not beside it: a parallel op it starts
        // then runs its first part on the engine's own thread while a worker takes the
        // rest, instead of handing all of it to the pool and sleeping until woken (two
        // context switches per op, hundreds of ops a decoding step).
        .spawn(move || rayon::scope(move |_| {
            let start = || -> Result<_> {
                let (model, encoder) = load()?;
                let positions = model.cfg.max_position_embeddings;
                let max_len = max_model_len.unwrap_or(positions);
                if max_len > positions || max_len < 2 {
                    bail!("--max-model-len {max_len} must be in 2..={positions} (the model's max_position_embeddings)");
                }
                let vocab = model.cfg.vocab_size;
                let mut engine = Engine::new(model, max_batch, max_len, max_loaded, engine_metrics)
                    .with_stop_ids(encoder.stop_ids());
                for (name, dir) in &adapters {
                    engine.add_adapter(name, dir)?;
                }
                Ok((engine, encoder, vocab, max_len))
            };
            match start() {
                Ok((engine, encoder, vocab, max_len)) => {
                    let _ = ready.send(Ok((encoder, engine.names(), vocab, max_len)));
                    engine.run(received);
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            }
        }))?;
    let (encoder, names, vocab_size, max_len) = started
        .recv()
        .context("the engine thread stopped while loading")??;
    let listener = TcpListener::bind((options.host.as_str(), options.port))
        .with_context(|| format!("cannot listen on {}:{}", options.host, options.port))?;
    let address = listener.local_addr()?;
    let adapter_count = names.lock().unwrap_or_else(|p| p.into_inner()).len();
    crate::to_stderr!(
        "serving {} with {adapter_count} adapters on http://{address} (max batch {}, queue {}, {max_len} positions)",
        options.base_name,
        options.max_batch,
        options.max_queue
    );
    let drain_timeout = options.drain_timeout;
    let state = Arc::new(State {
        options,
        encoder,
        vocab_size,
        max_len,
        commands: Mutex::new(commands),
        names,
        metrics,
        pending: AtomicUsize::new(0),
        connections: AtomicUsize::new(0),
        next_id: AtomicU64::new(0),
        root,
    });
    listener.set_nonblocking(true)?;
    let signal = loop {
        if let Some(signal) = crate::signals::requested() {
            break signal;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if state.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    state.connections.fetch_sub(1, Ordering::SeqCst);
                    continue;
                }
                let state = state.clone();
                let spawned = std::thread::Builder::new().spawn(move || {
                    connection(stream, &state);
                    state.connections.fetch_sub(1, Ordering::SeqCst);
                });
                if spawned.is_err() {
                    crate::to_stderr!("serve: cannot start a connection thread");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_readable(&listener),
            Err(e) => {
                crate::to_stderr!("serve: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    drop(listener);
    let deadline = Instant::now() + drain_timeout;
    let open = state.connections.load(Ordering::SeqCst);
    crate::to_stderr!(
        "{}: stopped accepting; finishing {open} open connections (at most {} s)",
        crate::signals::name(signal),
        drain_timeout.as_secs()
    );
    while state.connections.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = state.connections.load(Ordering::SeqCst);
    if left > 0 {
        crate::to_stderr!("the drain deadline passed with {left} connections open; exiting");
    }
    Ok(())
}

/// Runs candle's elementwise ops on the calling thread (unless the user set
/// `CANDLE_NUM_THREADS`). Its own pool splits every op of 64 Ki elements or more with a
/// worker that parks between ops: the engine's thread then spun in candle's barrier while the
/// worker woke, about a tenth of a load's wall time in profiles (8 distinct adapters), for ops
/// of tens of microseconds. Called before the first op creates that pool.
fn quiet_elementwise_pool() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Sleeps until the listener has a connection or 200 ms passed (a signal cuts it short).
fn wait_readable(listener: &TcpListener) {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, 200) };
}

/// The label of a path in the metrics (a fixed set).
fn endpoint(path: &str) -> &'static str {
    match path {
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/v1/models" => "/v1/models",
        "/v1/completions" => "/v1/completions",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/load_lora_adapter" => "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter" => "/v1/unload_lora_adapter",
        _ => "other",
    }
}

/// Answers the requests of one connection until the client closes it or asks to, a response
/// is an event stream, it idles past [`http::IDLE_TIMEOUT`], or the server is stopping.
fn connection(stream: TcpStream, state: &State) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    let mut requests = http::Requests::default();
    loop {
        let mut request = match requests.next(&mut &stream, state.options.max_body) {
            Ok(r) => r,
            Err(e) if e.status == 0 => return,
            Err(e) => {
                let status = send_error(&stream, &ApiError::new(e.status, e.message), false);
                state.metrics.answered("other", status);
                return;
            }
        };
        // An event stream's end is the connection's close.
        request.keep_alive &= !asks_for_stream(&request) && crate::signals::requested().is_none();
        let label = endpoint(&request.path);
        let status = match route(&stream, state, &request) {
            Ok(status) => status,
            Err(e) => send_error(&stream, &e, request.keep_alive),
        };
        if status != 0 {
            state.metrics.answered(label, status);
        }
        if status == 0 || !request.keep_alive {
            return;
        }
        let _ = stream.set_read_timeout(Some(http::IDLE_TIMEOUT));
    }
}

/// Whether the body asks for an event stream (`"stream": true`).
fn asks_for_stream(request: &Request) -> bool {
    serde_json::from_slice::<Value>(&request.body)
        .ok()
        .and_then(|body| body.get("stream")?.as_bool())
        == Some(true)
}

fn send_error(mut stream: &TcpStream, e: &ApiError, keep_alive: bool) -> u16 {
    let mut headers = Vec::new();
    if e.status == 429 {
        headers.push(("Retry-After", "1".to_string()));
    }
    if e.status == 401 {
        headers.push(("WWW-Authenticate", "Bearer".to_string()));
    }
    let _ = http::respond(
        &mut stream,
        e.status,
        "application/json",
        &headers,
        e.body().as_bytes(),
        keep_alive,
    );
    e.status
}

fn send_json(mut stream: &TcpStream, value: &Value, keep_alive: bool) -> u16 {
    let _ = http::respond(
        &mut stream,
        200,
        "application/json",
        &[],
        value.to_string().as_bytes(),
        keep_alive,
    );
    200
}

/// Answers `request`; returns the status sent (0: the client left before an answer).
fn route(stream: &TcpStream, state: &State, request: &Request) -> Result<u16, ApiError> {
    let path = request.path.as_str();
    if path != "/health" && !authorized(request, state.options.api_key.as_deref()) {
        return Err(ApiError::new(
            401,
            "Incorrect or missing API key: send Authorization: Bearer <key>",
        )
        .code("invalid_api_key"));
    }
    let keep = request.keep_alive;
    let post = |f: &dyn Fn() -> Result<u16, ApiError>| match request.method.as_str() {
        "POST" => f(),
        m => Err(ApiError::new(405, format!("{m} {path}: use POST"))),
    };
    let get = |f: &dyn Fn() -> Result<u16, ApiError>| match request.method.as_str() {
        "GET" => f(),
        m => Err(ApiError::new(405, format!("{m} {path}: use GET"))),
    };
    match path {
        "/health" => get(&|| Ok(send_json(stream, &json!({"status": "ok"}), keep))),
        "/metrics" => get(&|| {
            let text = state.metrics.render();
            let _ = http::respond(
                &mut &*stream,
                200,
                "text/plain; version=0.0.4",
                &[],
                text.as_bytes(),
                keep,
            );
            Ok(200)
        }),
        "/v1/models" => get(&|| Ok(send_json(stream, &models(state), keep))),
        "/v1/completions" => post(&|| completion(stream, state, request, false)),
        "/v1/chat/completions" => post(&|| completion(stream, state, request, true)),
        "/v1/load_lora_adapter" => post(&|| load_adapter(stream, state, request)),
        "/v1/unload_lora_adapter" => post(&|| unload_adapter(stream, state, request)),
        _ => Err(ApiError::new(404, format!("no endpoint {path}"))),
    }
}

/// The bearer token, compared in constant time.
fn authorized(request: &Request, key: Option<&str>) -> bool {
    let Some(key) = key else { return true };
    let given = request
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or_default();
    given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn names(state: &State) -> Vec<String> {
    state
        .names
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

fn models(state: &State) -> Value {
    let created = now();
    let base = &state.options.base_name;
    let mut data = vec![json!({"id": base, "object": "model", "created": created,
        "owned_by": "prolora", "root": base, "parent": null})];
    for name in names(state) {
        data.push(json!({"id": name, "object": "model", "created": created,
            "owned_by": "prolora", "root": name, "parent": base}));
    }
    json!({"object": "list", "data": data})
}

/// A place in the engine, given back when the request ends.
struct Place<'a>(&'a AtomicUsize);

impl<'a> Place<'a> {
    fn take(counter: &'a AtomicUsize, max: usize) -> Option<Self> {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Place(counter))
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether the client has closed its side (checked while waiting for tokens).
fn client_gone(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut byte = [0u8; 1];
    let gone = match stream.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    gone
}

/// The prompt's token ids, checked against the model.
fn prompt_ids(state: &State, prompt: &Prompt) -> Result<Vec<u32>, ApiError> {
    let (ids, param) = match prompt {
        Prompt::Text(text) => {
            let encoding = state
                .encoder
                .tokenizer()
                .encode_fast(text.as_str(), true)
                .map_err(|e| {
                    ApiError::invalid("prompt", format!("cannot tokenize the prompt: {e}"))
                })?;
            (encoding.get_ids().to_vec(), "prompt")
        }
        Prompt::Ids(ids) => {
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= state.vocab_size) {
                return Err(ApiError::invalid(
                    "prompt",
                    format!(
                        "token id {bad} is not below the vocabulary size {}",
                        state.vocab_size
                    ),
                ));
            }
            (ids.clone(), "prompt")
        }
        // In the chat format of --chat-format.
        Prompt::Chat(messages) => (
            state
                .encoder
                .encode_prompt(messages)
                .map_err(|e| ApiError::invalid("messages", format!("{e:#}")))?,
            "messages",
        ),
    };
    if ids.is_empty() {
        return Err(ApiError::invalid(param, "the prompt has no tokens"));
    }
    if ids.len() >= state.max_len {
        return Err(ApiError::invalid(param, format!(
            "This model's maximum context length is {} tokens; the prompt has {} tokens (at most {} leave room for one new token)",
            state.max_len, ids.len(), state.max_len - 1
        )).code("context_length_exceeded"));
    }
    Ok(ids)
}

fn completion(
    stream: &TcpStream,
    state: &State,
    request: &Request,
    chat: bool,
) -> Result<u16, ApiError> {
    let params: Params = api::parse(&request.body, chat)?;
    let adapter = if params.model == state.options.base_name {
        None
    } else if names(state).contains(&params.model) {
        Some(params.model.clone())
    } else {
        return Err(unknown_model(&params.model));
    };
    let ids = prompt_ids(state, &params.prompt)?;
    let room = state.max_len - ids.len();
    let max_tokens = match params.max_tokens {
        Some(m) if m > room => {
            return Err(ApiError::invalid("max_tokens", format!(
                "This model's maximum context length is {} tokens; the prompt has {} and max_tokens asks for {m} more (at most {room})",
                state.max_len, ids.len()
            )).code("context_length_exceeded"))
        }
        Some(m) => m,
        // OpenAI's defaults: 16 for completions, the rest of the context for chat.
        None if chat => room,
        None => room.min(16),
    };
    // In the engine at once: a row each for --max-batch, then --max-queue waiting.
    let capacity = state.options.max_batch + state.options.max_queue;
    let Some(place) = Place::take(&state.pending, capacity) else {
        return Err(ApiError::new(
            429,
            format!(
                "the queue is full ({} requests waiting); retry later",
                state.options.max_queue
            ),
        ));
    };
    let (events, heard) = channel();
    let job = Job {
        prompt: ids.clone(),
        adapter,
        sampling: Sampling {
            max_tokens,
            ignore_eos: params.ignore_eos,
            temperature: params.temperature,
            top_p: params.top_p,
            seed: params.seed.unwrap_or_else(|| {
                crate::ctx::mix_seed(now(), state.next_id.load(Ordering::Relaxed))
            }),
        },
        events,
        record_logits: false,
        submitted: Instant::now(),
    };
    let sent = state.send(Command::Submit(job));
    if sent.is_err() {
        return Err(ApiError::new(503, "the engine has stopped"));
    }
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let answer = Answer {
        id: format!("{}-{n}", if chat { "chatcmpl" } else { "cmpl" }),
        created: now(),
        model: &params.model,
        chat,
    };
    let mut text = TextStream::new(state.encoder.tokenizer(), &ids, params.stop.clone());
    let mut completion_tokens = 0;
    let mut streaming = false;
    let mut writer = stream;
    let finish = loop {
        let event = match heard.recv_timeout(Duration::from_millis(200)) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) if client_gone(stream) => return Ok(0),
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                return Err(ApiError::new(500, "the engine dropped the request"))
            }
        };
        let token = match event {
            Event::Token(t) => t,
            Event::Done(Finish::Eos) => break "stop",
            Event::Done(_) => break "length",
            Event::UnknownAdapter(name) if !streaming => return Err(unknown_model(&name)),
            Event::Failed(why) if !streaming => return Err(ApiError::new(500, why)),
            Event::UnknownAdapter(why) | Event::Failed(why) => {
                let _ = http::send_event(&mut writer, &ApiError::new(500, why).body());
                return Ok(200);
            }
            Event::Logits(_) => continue,
        };
        completion_tokens += 1;
        let stopped = text
            .push(token)
            .map_err(|e| ApiError::new(500, format!("{e:#}")))?;
        if params.stream {
            let first = !streaming;
            if first {
                if http::start_events(&mut writer).is_err() {
                    return Ok(0);
                }
                streaming = true;
            }
            let ready = text.take_ready();
            if (first && chat) || !ready.is_empty() {
                let chunk = answer.chunk(&ready, first, None);
                if http::send_event(&mut writer, &chunk.to_string()).is_err() {
                    return Ok(0);
                }
            }
        }
        if stopped.is_some() {
            break "stop";
        }
    };
    // Dropping the channel frees the row if the engine is still on it (a stop sequence); the
    // place is free before the client reads the answer and sends its next request.
    drop(heard);
    drop(place);
    let rest = text
        .take_rest()
        .map_err(|e| ApiError::new(500, format!("{e:#}")))?;
    let usage = api::usage(ids.len(), completion_tokens);
    if !params.stream {
        return Ok(send_json(
            stream,
            &answer.complete(text.text(), finish, usage),
            request.keep_alive,
        ));
    }
    let first = !streaming;
    if first && http::start_events(&mut writer).is_err() {
        return Ok(0);
    }
    let last = answer.chunk(&rest, first, Some((finish, usage)));
    if http::send_event(&mut writer, &last.to_string()).is_err()
        || http::send_event(&mut writer, "[DONE]").is_err()
    {
        return Ok(0);
    }
    Ok(200)
}

fn unknown_model(name: &str) -> ApiError {
    ApiError {
        param: Some("model"),
        ..ApiError::new(
            404,
            format!("The model `{name}` does not exist (GET /v1/models lists them)"),
        )
    }
    .code("model_not_found")
}

fn string_field(body: &Value, key: &'static str) -> Result<String, ApiError> {
    match body.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(ApiError::invalid(
            key,
            format!("\"{key}\" must be a non-empty string"),
        )),
    }
}

fn json_body(request: &Request) -> Result<Value, ApiError> {
    serde_json::from_slice(&request.body)
        .map_err(|e| ApiError::new(400, format!("the body is not valid JSON: {e}")))
}

/// The adapter directory `path` names, if it lies below `root` (symbolic links resolved, its
/// two files included).
fn below_root(root: &Path, path: &str) -> Result<PathBuf, ApiError> {
    let dir = root.join(path);
    let outside = || {
        ApiError::new(
            403,
            format!("lora_path {path:?} is not an adapter directory below --adapter-root"),
        )
        .code("forbidden_path")
    };
    let dir = dir.canonicalize().map_err(|_| outside())?;
    if dir == root || !dir.starts_with(root) {
        return Err(outside());
    }
    for file in [peft::CONFIG_FILE, peft::WEIGHTS_FILE] {
        match dir.join(file).canonicalize() {
            Ok(f) if f.starts_with(root) => {}
            _ => return Err(outside()),
        }
    }
    Ok(dir)
}

fn load_adapter(stream: &TcpStream, state: &State, request: &Request) -> Result<u16, ApiError> {
    let body = json_body(request)?;
    let name = string_field(&body, "lora_name")?;
    let path = string_field(&body, "lora_path")?;
    let Some(root) = &state.root else {
        return Err(ApiError::new(
            403,
            "loading adapters at run time needs --adapter-root",
        ));
    };
    let dir = below_root(root, &path)?;
    if name == state.options.base_name || names(state).contains(&name) {
        return Err(ApiError::invalid(
            "lora_name",
            format!("the adapter {name:?} is already loaded"),
        ));
    }
    let (reply, answer) = channel();
    let command = Command::Load {
        name: name.clone(),
        dir,
        reply,
    };
    let _ = state.send(command);
    match answer.recv() {
        Ok(Ok(bytes)) => {
            let text = format!(
                "Success: LoRA adapter '{name}' added successfully ({bytes} bytes resident)."
            );
            let _ = http::respond(
                &mut &*stream,
                200,
                "text/plain",
                &[],
                text.as_bytes(),
                request.keep_alive,
            );
            Ok(200)
        }
        Ok(Err(why)) => Err(ApiError::invalid("lora_path", why)),
        Err(_) => Err(ApiError::new(503, "the engine has stopped")),
    }
}

fn unload_adapter(stream: &TcpStream, state: &State, request: &Request) -> Result<u16, ApiError> {
    let body = json_body(request)?;
    let name = string_field(&body, "lora_name")?;
    let (reply, answer) = channel();
    let command = Command::Unload {
        name: name.clone(),
        reply,
    };
    let _ = state.send(command);
    match answer.recv() {
        Ok(true) => {
            let text = format!("Success: LoRA adapter '{name}' removed successfully.");
            let _ = http::respond(
                &mut &*stream,
                200,
                "text/plain",
                &[],
                text.as_bytes(),
                request.keep_alive,
            );
            Ok(200)
        }
        Ok(false) => Err(
            ApiError::new(404, format!("the adapter {name:?} is not loaded"))
                .code("model_not_found"),
        ),
        Err(_) => Err(ApiError::new(503, "the engine has stopped")),
    }
}
