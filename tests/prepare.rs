//! `prolora data prepare` against open-instruct's reformatting functions run on the sample raw
//! files of `data/raw/` (goldens by `scripts/reference/make_data_goldens.py prepare`), and the
//! round trip prepare → encode on every sample.

use std::path::{Path, PathBuf};

use prolora::data::chat::{ChatEncoder, ChatFormat};
use prolora::data::convert::{prepare, Format};
use prolora::data::dataset::{load, LoadOptions};
use prolora::source;
use serde_json::Value;

mod common;
use common::root;

fn ours(format: Format, input: &str, seed: u64) -> Vec<Value> {
    let mut out = Vec::new();
    prepare(format, &root().join(input), &mut out, seed, false).unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn golden(name: &str) -> Vec<Value> {
    std::fs::read_to_string(root().join("tests/fixtures/prepare").join(name))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn assert_same(got: &[Value], want: &[Value], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: example count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g, w, "{what}: example {i}");
    }
}

#[test]
fn superni_equals_open_instruct_for_two_seeds() {
    for seed in [42, 7] {
        let got = ours(Format::Superni, "data/raw/superni", seed);
        assert_same(
            &got,
            &golden(&format!("superni_seed{seed}.jsonl")),
            "superni",
        );
    }
    // 80 sampled from 300 and from 100, all 70 of the third task, the _mmmlu_ task left out.
    assert_eq!(ours(Format::Superni, "data/raw/superni", 42).len(), 230);
}

#[test]
fn alpaca_and_code_alpaca_equal_open_instruct_for_two_seeds() {
    for seed in [42, 7] {
        let got = ours(Format::CodeAlpaca, "data/raw", seed);
        assert_same(
            &got,
            &golden(&format!("code_alpaca_seed{seed}.jsonl")),
            "code_alpaca",
        );
        let got = ours(Format::Alpaca, "data/raw/alpaca_data.json", seed);
        assert_same(&got, &golden(&format!("alpaca_seed{seed}.jsonl")), "alpaca");
    }
}

#[test]
fn flan_v2_and_cot_equal_open_instruct() {
    let got = ours(Format::FlanV2, "data/raw/flan_v2.jsonl", 42);
    assert_same(&got, &golden("flan_v2_seed42.jsonl"), "flan_v2");
    let got = ours(Format::Cot, "data/raw/cot", 42);
    assert_same(&got, &golden("cot_seed42.jsonl"), "cot");
}

#[test]
fn another_seed_changes_the_templates() {
    assert_ne!(
        ours(Format::CodeAlpaca, "data/raw", 42),
        ours(Format::CodeAlpaca, "data/raw", 43)
    );
}

#[test]
fn prepare_then_encode_round_trips_every_sample() {
    let enc = ChatEncoder::new(
        source::tokenizer("llama2-7b", "main").unwrap(),
        ChatFormat::Tulu,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let samples = [
        (Format::Superni, "data/raw/superni"),
        (Format::FlanV2, "data/raw/flan_v2.jsonl"),
        (Format::Cot, "data/raw/cot"),
        (Format::CodeAlpaca, "data/raw/code_alpaca_20k.json"),
        (Format::Alpaca, "data/raw"),
        (Format::Messages, "data/raw/messages.jsonl"),
        (Format::PromptCompletion, "data/raw/prompt_completion.jsonl"),
    ];
    for (format, input) in samples {
        let out = dir.path().join(format!("{format:?}.jsonl"));
        let mut bytes = Vec::new();
        let report = prepare(format, &root().join(input), &mut bytes, 42, false).unwrap();
        std::fs::write(&out, &bytes).unwrap();
        let opts = LoadOptions {
            max_seq_len: 4096,
            skip_invalid: false,
            cache_dir: None,
        };
        let (encoded, data) = load(&enc, &out, &opts).unwrap();
        // Nothing lost between the two steps, and every example trains on its answer.
        assert_eq!(data.examples, report.written, "{format:?}");
        assert_eq!(encoded.len(), report.written, "{format:?}");
        assert_eq!((data.dropped, data.truncated), (0, 0), "{format:?}");
        assert!(encoded.iter().all(|e| e.num_trained() > 0), "{format:?}");
    }
}

#[test]
fn messages_pass_through_unchanged_and_prompt_completion_become_two_turns() {
    let mut out = Vec::new();
    prepare(
        Format::Messages,
        &root().join("data/raw/messages.jsonl"),
        &mut out,
        42,
        false,
    )
    .unwrap();
    let raw = std::fs::read(root().join("data/raw/messages.jsonl")).unwrap();
    assert_eq!(out, raw);
    let pc = ours(
        Format::PromptCompletion,
        "data/raw/prompt_completion.jsonl",
        42,
    );
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(root().join("data/raw/prompt_completion.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(pc[0]["messages"][0]["content"], first["prompt"]);
    assert_eq!(pc[0]["messages"][1]["content"], first["completion"]);
    assert_eq!(pc[0]["messages"][1]["role"], "assistant");
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn bad_records_name_their_place_or_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let flan = write(
        dir.path(),
        "flan.jsonl",
        "{\"inputs\": \"a\", \"targets\": \"b\"}\n{\"inputs\": \"a\"}\n{\"inputs\": \"c\", \"targets\": \"d\"}\n",
    );
    let err = format!(
        "{:#}",
        prepare(Format::FlanV2, &flan, &mut Vec::new(), 42, false).unwrap_err()
    );
    assert!(
        err.starts_with(&format!("{}:2: no \"targets\"", flan.display())),
        "{err}"
    );
    let mut out = Vec::new();
    let report = prepare(Format::FlanV2, &flan, &mut out, 42, true).unwrap();
    assert_eq!(report.written, 2);
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].line, 2);
    // ids count the examples written, as the reference's enumerate over its examples.
    assert!(String::from_utf8(out)
        .unwrap()
        .contains("\"id\":\"flan_v2_1\""));

    let alpaca = write(
        dir.path(),
        "a.json",
        "[{\"instruction\": \"x\", \"output\": 3}]",
    );
    let err = format!(
        "{:#}",
        prepare(Format::Alpaca, &alpaca, &mut Vec::new(), 42, false).unwrap_err()
    );
    assert!(err.contains("[0].output must be a string"), "{err}");
    let broken = write(dir.path(), "b.json", "[{\"instruction\": ");
    let err = format!(
        "{:#}",
        prepare(Format::Alpaca, &broken, &mut Vec::new(), 42, false).unwrap_err()
    );
    assert!(
        err.starts_with(&format!("{}:1:", broken.display())),
        "{err}"
    );

    let task = write(
        dir.path(),
        "task.json",
        "{\"Definition\": [\"d\"], \"Instances\": []}",
    );
    let err = format!(
        "{:#}",
        prepare(Format::Superni, &task, &mut Vec::new(), 42, false).unwrap_err()
    );
    assert!(err.contains("Positive Examples"), "{err}");
    let empty = write(dir.path(), "empty.jsonl", "\n");
    let err = format!(
        "{:#}",
        prepare(Format::FlanV2, &empty, &mut Vec::new(), 42, false).unwrap_err()
    );
    assert!(err.contains("no example written"), "{err}");
}
