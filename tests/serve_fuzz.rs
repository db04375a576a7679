//! The server's parsers of network input, fuzzed as tests/fuzz.rs fuzzes the others: mutations
//! of a valid HTTP request and of valid completion and chat bodies answer with an error or a
//! value, never a panic; and the incremental text of any token sequence, with any stop
//! sequences, is handed out whole and in order (`PROLORA_FUZZ_CASES` for a long run).

use prolora::serve::{api, http, text::TextStream};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROLORA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// `base` with edits applied: 0 deletes, 1 inserts, 2 replaces the byte at a position.
fn mutate(base: &[u8], edits: &[(u8, usize, u8)]) -> Vec<u8> {
    let mut v = base.to_vec();
    for &(kind, pos, byte) in edits {
        let at = if v.is_empty() { 0 } else { pos % v.len() };
        match kind {
            0 if !v.is_empty() => {
                v.remove(at);
            }
            1 => v.insert(at, byte),
            _ if !v.is_empty() => v[at] = byte,
            _ => v.push(byte),
        }
    }
    v
}

fn edits() -> impl Strategy<Value = Vec<(u8, usize, u8)>> {
    prop::collection::vec((0u8..3, any::<usize>(), any::<u8>()), 1..8)
}

#[test]
fn http_requests_never_panic() {
    let base = b"POST /v1/completions?a=b HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k\r\nContent-Length: 11\r\n\r\n{\"a\": true}";
    proptest!(config(), |(e in edits())| {
        let raw = mutate(base, &e);
        if let Ok(r) = http::read_request(&mut std::io::Cursor::new(raw), 64) {
            prop_assert!(r.body.len() <= 64);
        }
    });
}

#[test]
fn completion_and_chat_bodies_never_panic() {
    let completion = br#"{"model": "a", "prompt": ["hi"], "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": -3, "stop": ["x", "y"], "stream": false, "n": 1}"#;
    let chat = br#"{"model": "a", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "t"}]}], "max_completion_tokens": 2, "logprobs": false}"#;
    proptest!(config(), |(e in edits())| {
        let _ = api::parse(&mutate(completion, &e), false);
        let _ = api::parse(&mutate(chat, &e), true);
    });
}

#[test]
fn streamed_text_is_the_whole_text_in_order() {
    let tokenizer =
        tokenizers::Tokenizer::from_bytes(prolora::model::preset::LLAMA2_TOKENIZER_JSON).unwrap();
    // Byte tokens (3..259) split characters across tokens; the rest are pieces.
    let ids = prop::collection::vec(prop_oneof![3u32..259, 259u32..32000], 0..24);
    let stops = prop::collection::vec("[a-e ]{1,3}", 0..3);
    proptest!(config(), |(ids in ids, stops in stops, prompt in prop::collection::vec(3u32..32000, 1..8))| {
        let mut stream = TextStream::new(&tokenizer, &prompt, stops.clone());
        let mut handed = String::new();
        for id in ids {
            let stopped = stream.push(id).unwrap();
            handed.push_str(&stream.take_ready());
            if stopped.is_some() {
                break;
            }
        }
        handed.push_str(&stream.take_rest().unwrap());
        prop_assert_eq!(&handed, stream.text());
        if stream.stopped().is_none() {
            for stop in &stops {
                prop_assert!(!handed.contains(stop.as_str()), "{handed:?} holds {stop:?}");
            }
        }
    });
}
