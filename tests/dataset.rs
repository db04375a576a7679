//! The streaming, parallel, cached loader: same encodings as the one-example encoder, bad lines
//! named or skipped and counted, the cache hit only when nothing it depends on changed.

use std::path::{Path, PathBuf};

use prolora::data::chat::{encode_all, read_jsonl, ChatEncoder, ChatFormat};
use prolora::data::dataset::{load, LoadOptions};
use prolora::source;

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample_chat.jsonl");

fn encoder() -> ChatEncoder {
    ChatEncoder::new(
        source::tokenizer("llama2-7b", "main").unwrap(),
        ChatFormat::Tulu,
    )
    .unwrap()
}

fn opts(max_seq_len: usize, skip_invalid: bool, cache_dir: Option<PathBuf>) -> LoadOptions {
    LoadOptions {
        max_seq_len,
        skip_invalid,
        cache_dir,
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

const GOOD: &str = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}"#;

#[test]
fn streamed_parallel_load_equals_the_plain_encoder_across_chunks() {
    // 4800 lines: past the first 4096-line chunk.
    let dir = tempfile::tempdir().unwrap();
    let sample = std::fs::read_to_string(SAMPLE).unwrap();
    let path = write(dir.path(), "big.jsonl", sample.repeat(12).as_bytes());
    let enc = encoder();
    let (got, report) = load(&enc, &path, &opts(48, false, None)).unwrap();
    let (want, dropped) = encode_all(&enc, &read_jsonl(&path).unwrap(), 48).unwrap();
    assert_eq!(got, want);
    assert_eq!(report.examples, 4800);
    assert_eq!(report.dropped, dropped);
    assert!(report.truncated > 0 && report.truncated <= report.examples);
    assert!(!report.from_cache);
}

#[test]
fn first_bad_line_stops_the_load_even_past_the_first_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = format!("{GOOD}\n").repeat(4500);
    text.push_str("{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n");
    text.push_str("not json\n");
    let path = write(dir.path(), "bad.jsonl", text.as_bytes());
    let err = format!(
        "{:#}",
        load(&encoder(), &path, &opts(64, false, None)).unwrap_err()
    );
    assert!(
        err.starts_with(&format!("{}:4501: ", path.display())),
        "{err}"
    );
    assert!(err.contains("unknown role \"robot\""), "{err}");
}

#[test]
fn skip_invalid_counts_every_bad_line_with_its_number() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = Vec::new();
    bytes.extend_from_slice(format!("{GOOD}\n").as_bytes());
    bytes.extend_from_slice(b"{not json\n");
    bytes.extend_from_slice(b"{\"messages\": [{\"role\": \"user\"}]}\n");
    bytes.extend_from_slice(b"\n");
    bytes.extend_from_slice(b"{\"messages\": [{\"role\": \"user\", \"content\": \"caf\xe9\"}]}\n");
    bytes.extend_from_slice(b"{\"messages\": [{\"role\": \"assistant\", \"content\": \"a\"}]}\n");
    bytes.extend_from_slice(format!("{GOOD}\n").as_bytes());
    let path = write(dir.path(), "mixed.jsonl", &bytes);
    let (examples, report) = load(&encoder(), &path, &opts(64, true, None)).unwrap();
    assert_eq!(examples.len(), 2);
    let lines: Vec<usize> = report.skipped.iter().map(|s| s.line).collect();
    assert_eq!(lines, vec![2, 3, 5, 6]);
    assert!(report.skipped[0].error.contains("not valid JSON"));
    assert!(report.skipped[1].error.contains("has no \"content\""));
    assert!(report.skipped[2].error.contains("UTF-8"));
    assert!(report.skipped[3]
        .error
        .contains("assistant turn that comes first"));
    assert!(report.summary().contains("4 invalid lines skipped"));
}

#[test]
fn nothing_left_after_filtering_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let only_user = r#"{"messages": [{"role": "user", "content": "nobody answers"}]}"#;
    let path = write(
        dir.path(),
        "nolabels.jsonl",
        format!("{only_user}\n{only_user}\n").as_bytes(),
    );
    let err = format!(
        "{:#}",
        load(&encoder(), &path, &opts(64, false, None)).unwrap_err()
    );
    assert!(err.contains("no example left to train on"), "{err}");
    assert!(err.contains("2 dropped"), "{err}");
    let path = write(dir.path(), "allbad.jsonl", b"x\ny\n");
    let err = format!(
        "{:#}",
        load(&encoder(), &path, &opts(64, true, None)).unwrap_err()
    );
    assert!(err.contains("2 invalid lines skipped"), "{err}");
}

#[test]
fn cache_hits_only_for_the_same_file_tokenizer_and_length() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let path = write(
        dir.path(),
        "d.jsonl",
        std::fs::read(SAMPLE).unwrap().as_slice(),
    );
    let enc = encoder();
    let (first, r1) = load(&enc, &path, &opts(64, false, Some(cache.clone()))).unwrap();
    assert!(!r1.from_cache);
    let (second, r2) = load(&enc, &path, &opts(64, false, Some(cache.clone()))).unwrap();
    assert!(r2.from_cache);
    assert_eq!(first, second);
    assert_eq!(
        (r1.examples, r1.dropped, r1.truncated),
        (r2.examples, r2.dropped, r2.truncated)
    );
    // Another max length, or another byte in the file: recomputed.
    let (_, r3) = load(&enc, &path, &opts(65, false, Some(cache.clone()))).unwrap();
    assert!(!r3.from_cache);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(GOOD);
    std::fs::write(&path, text).unwrap();
    let (third, r4) = load(&enc, &path, &opts(64, false, Some(cache.clone()))).unwrap();
    assert!(!r4.from_cache);
    assert_eq!(third.len(), first.len() + 1);
}

#[test]
fn a_cache_made_with_skipped_lines_still_stops_a_strict_run() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let path = write(dir.path(), "d.jsonl", format!("{GOOD}\noops\n").as_bytes());
    let enc = encoder();
    load(&enc, &path, &opts(64, true, Some(cache.clone()))).unwrap();
    let err = format!(
        "{:#}",
        load(&enc, &path, &opts(64, false, Some(cache))).unwrap_err()
    );
    assert!(
        err.starts_with(&format!("{}:2: not valid JSON", path.display())),
        "{err}"
    );
    assert!(err.contains("--skip-invalid"), "{err}");
}
