//! The HTTP/1.1 a local API server needs, over `std::net`: persistent connections (HTTP/1.1's
//! default; `Connection: close` honoured, HTTP/1.0 only with `Connection: keep-alive`; a
//! pipelined next request kept for its turn), bodies by `Content-Length` only, bounded head and
//! body, and responses either whole or as a server-sent event stream flushed event by event
//! (which ends the connection: the close is its end). (tiny_http, the lean
//! crate for this, buffers a streamed body in 8 KiB chunks, which holds back every event; a
//! tokio stack costs more to build than this whole server.)

use std::io::{Read, Write};

/// Longest request head (request line and headers) read.
pub const MAX_HEAD: usize = 16 << 10;
const MAX_HEADERS: usize = 64;

/// A parsed request.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// Names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the connection stays open after the response (the server may still close it).
    pub keep_alive: bool,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request could not be read: the status to answer (0: answer nothing, the client left).
#[derive(Debug, PartialEq)]
pub struct ReadError {
    pub status: u16,
    pub message: String,
}

fn bad(status: u16, message: impl Into<String>) -> ReadError {
    ReadError {
        status,
        message: message.into(),
    }
}

/// A request's method, path, headers and whether the client keeps the connection open.
pub type Head = (String, String, Vec<(String, String)>, bool);

/// The request line and headers of `head` (without the blank line).
pub fn parse_head(head: &[u8]) -> Result<Head, ReadError> {
    let head = std::str::from_utf8(head).map_err(|_| bad(400, "the request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(400, format!("malformed request line {line:?}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad(
            505,
            format!("{version} is not supported (HTTP/1.1 is)"),
        ));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad(400, format!("malformed method {method:?}")));
    }
    let path = target.split('?').next().unwrap_or_default();
    if !path.starts_with('/') {
        return Err(bad(400, format!("malformed request target {target:?}")));
    }
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad(400, format!("malformed header line {line:?}")));
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(bad(400, format!("malformed header name {name:?}")));
        }
        if headers.len() == MAX_HEADERS {
            return Err(bad(431, format!("more than {MAX_HEADERS} headers")));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let asks = |token: &str| {
        headers
            .iter()
            .filter(|(n, _)| n == "connection")
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let keep_alive = match version {
        "HTTP/1.0" => asks("keep-alive"),
        _ => !asks("close"),
    };
    Ok((method.to_string(), path.to_string(), headers, keep_alive))
}

/// The requests of one connection in turn: bytes a client sent past a request (its next one,
/// pipelined) wait here for their turn.
#[derive(Default)]
pub struct Requests {
    buffered: Vec<u8>,
}

impl Requests {
    /// The next request on `stream`: a head of at most [`MAX_HEAD`] bytes, then a body of its
    /// `Content-Length`, at most `max_body` bytes. Status 0: the client closed the connection,
    /// or sent nothing before the read timeout (an idle kept-alive connection).
    pub fn next(&mut self, stream: &mut impl Read, max_body: usize) -> Result<Request, ReadError> {
        let buf = &mut self.buffered;
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(at) = find(buf, b"\r\n\r\n") {
                break at;
            }
            if buf.len() > MAX_HEAD {
                return Err(bad(
                    431,
                    format!("the request head exceeds {MAX_HEAD} bytes"),
                ));
            }
            match stream.read(&mut chunk) {
                Ok(0) if buf.is_empty() => return Err(bad(0, "closed before a request")),
                Ok(0) => return Err(bad(400, "the connection closed inside the request head")),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if buf.is_empty() => return Err(bad(0, format!("no request: {e}"))),
                Err(e) => return Err(timeout_or_gone(e)),
            }
        };
        let (method, path, headers, keep_alive) = parse_head(&buf[..head_end])?;
        let find_header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
        if find_header("transfer-encoding").is_some() {
            return Err(bad(
                411,
                "chunked request bodies are not accepted; send Content-Length",
            ));
        }
        let length = match find_header("content-length") {
            None => 0,
            Some(v) => v
                .parse::<usize>()
                .map_err(|_| bad(400, format!("Content-Length {v:?} is not a number")))?,
        };
        if length > max_body {
            return Err(bad(
                413,
                format!("the body has {length} bytes; at most {max_body} are accepted"),
            ));
        }
        buf.drain(..head_end + 4);
        while buf.len() < length {
            let want = (length - buf.len()).min(chunk.len());
            match stream.read(&mut chunk[..want]) {
                Ok(0) => return Err(bad(400, "the connection closed inside the body")),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(timeout_or_gone(e)),
            }
        }
        let body = buf.drain(..length).collect();
        Ok(Request {
            method,
            path,
            headers,
            body,
            keep_alive,
        })
    }
}

/// One request from `stream` (a connection's first): [`Requests::next`].
pub fn read_request(stream: &mut impl Read, max_body: usize) -> Result<Request, ReadError> {
    Requests::default().next(stream, max_body)
}

fn timeout_or_gone(e: std::io::Error) -> ReadError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            bad(408, "the request was not sent in time")
        }
        _ => bad(0, format!("reading the request: {e}")),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// How long a kept-alive connection waits for its next request.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes a whole response and flushes it; `keep_alive`: the connection stays open after it.
pub fn respond(
    w: &mut impl Write,
    status: u16,
    content_type: &str,
    extra_headers: &[(&str, String)],
    body: &[u8],
    keep_alive: bool,
) -> std::io::Result<()> {
    let connection = match keep_alive {
        true => format!(
            "keep-alive\r\nKeep-Alive: timeout={}",
            IDLE_TIMEOUT.as_secs()
        ),
        false => "close".to_string(),
    };
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {connection}\r\n",
        reason(status),
        body.len()
    );
    for (name, value) in extra_headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    w.write_all(body)?;
    w.flush()
}

/// Starts a server-sent event stream (its end is the connection's close).
pub fn start_events(w: &mut impl Write) -> std::io::Result<()> {
    w.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
    )?;
    w.flush()
}

/// One event: `data: {data}` and a blank line, flushed.
pub fn send_event(w: &mut impl Write, data: &str) -> std::io::Result<()> {
    w.write_all(format!("data: {data}\n\n").as_bytes())?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(raw: &[u8], max_body: usize) -> Result<Request, ReadError> {
        read_request(&mut std::io::Cursor::new(raw.to_vec()), max_body)
    }

    #[test]
    fn reads_a_request_and_refuses_what_it_cannot_take() {
        let r = read(
            b"POST /v1/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nX-A:  b \r\n\r\nbodyEXTRA",
            10,
        )
        .unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", "/v1/completions")
        );
        assert_eq!(r.header("x-a"), Some("b"));
        assert_eq!(r.body, b"body");
        assert!(r.keep_alive);
        let status = |raw: &[u8]| read(raw, 10).unwrap_err().status;
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(status(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"),
            400
        );
        assert_eq!(status(b"GET / HTTP/2\r\n\r\n"), 505);
        assert_eq!(status(b"GET /\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nno colon\r\n\r\n"), 400);
        assert_eq!(status(b""), 0);
        assert_eq!(status(&vec![b'a'; MAX_HEAD + 10]), 431);
    }

    #[test]
    fn a_connection_carries_pipelined_requests_and_says_when_it_closes() {
        let raw = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\nConnection: Close\r\n\r\nGET /c HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /d HTTP/1.0\r\n\r\n";
        let mut stream = std::io::Cursor::new(raw.to_vec());
        let mut requests = Requests::default();
        let mut next = || requests.next(&mut stream, 10);
        let a = next().unwrap();
        assert_eq!(
            (a.path.as_str(), &a.body[..], a.keep_alive),
            ("/a", &b"abc"[..], true)
        );
        let b = next().unwrap();
        assert_eq!((b.path.as_str(), b.keep_alive), ("/b", false));
        let c = next().unwrap();
        assert_eq!((c.path.as_str(), c.keep_alive), ("/c", true));
        let d = next().unwrap();
        assert_eq!((d.path.as_str(), d.keep_alive), ("/d", false));
        assert_eq!(next().unwrap_err().status, 0);
    }
}
