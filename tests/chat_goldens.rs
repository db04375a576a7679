//! The chat encoding on the larger golden set made by open-instruct's encoder
//! (`scripts/reference/make_data_goldens.py chat`), and properties of the label mask on random
//! conversations: labels cover exactly the assistant answers, and truncation only cuts.

use std::sync::OnceLock;

use prolora::data::chat::{
    py_strip, ChatEncoder, ChatFormat, Encoded, Example, Message, Role, IGNORE_INDEX,
};
use prolora::source;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MORE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/chat-encoding/more_cases.jsonl"
);

fn encoder() -> &'static ChatEncoder {
    static ENC: OnceLock<ChatEncoder> = OnceLock::new();
    ENC.get_or_init(|| {
        ChatEncoder::new(
            source::tokenizer("llama2-7b", "main").unwrap(),
            ChatFormat::Tulu,
        )
        .unwrap()
    })
}

#[test]
fn more_golden_cases_match_open_instruct() {
    let text = std::fs::read_to_string(MORE).unwrap();
    let mut failures = Vec::new();
    let mut n = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let example: Example = serde_json::from_value(v.clone()).unwrap();
        let max = v["max_seq_length"].as_u64().unwrap() as usize;
        let want = Encoded {
            input_ids: serde_json::from_value(v["input_ids"].clone()).unwrap(),
            labels: serde_json::from_value(v["labels"].clone()).unwrap(),
        };
        if encoder().encode(&example, max).unwrap() != want {
            failures.push(v["name"].as_str().unwrap().to_string());
        }
        n += 1;
    }
    assert_eq!(n, 120);
    assert!(
        failures.is_empty(),
        "differ from open-instruct: {failures:?}"
    );
}

const PIECES: [&str; 10] = [
    "What is 2 + 2?",
    "Four.",
    "  padded with blanks \n",
    "línea\ncon\tTab",
    "東京は日本の首都です。",
    "emoji 🙂👍🏽",
    "def f(x):\n    return x * 2",
    "The quick brown fox jumps over the lazy dog.",
    "Sure",
    "ok",
];

/// System (sometimes), then user/assistant turns (sometimes two users in a row), sometimes a
/// trailing user; never two assistants in a row (their answers would form one labelled run).
fn conversation(rng: &mut StdRng) -> Vec<Message> {
    let mut m = Vec::new();
    let push = |m: &mut Vec<Message>, role, rng: &mut StdRng| {
        m.push(Message {
            role,
            content: PIECES[rng.random_range(0..PIECES.len())].to_string(),
        })
    };
    if rng.random_bool(0.3) {
        push(&mut m, Role::System, rng);
    }
    for _ in 0..rng.random_range(1..4) {
        push(&mut m, Role::User, rng);
        if rng.random_bool(0.2) {
            push(&mut m, Role::User, rng);
        }
        push(&mut m, Role::Assistant, rng);
    }
    if rng.random_bool(0.3) {
        push(&mut m, Role::User, rng);
    }
    m
}

/// Maximal runs of labelled positions.
fn labelled_runs(labels: &[i64]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut t = 0;
    while t < labels.len() {
        if labels[t] == IGNORE_INDEX {
            t += 1;
            continue;
        }
        let s = t;
        while t < labels.len() && labels[t] != IGNORE_INDEX {
            t += 1;
        }
        runs.push((s, t));
    }
    runs
}

#[test]
fn labels_cover_exactly_the_assistant_answers() {
    let tok = encoder().tokenizer();
    let decode = |ids: &[u32]| tok.decode(ids, false).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    for case in 0..200 {
        let messages = conversation(&mut rng);
        let e = encoder()
            .encode(
                &Example {
                    messages: messages.clone(),
                },
                4096,
            )
            .unwrap();
        // A labelled position carries its own id; every other is -100.
        for (t, (&id, &l)) in e.input_ids.iter().zip(&e.labels).enumerate() {
            assert!(l == IGNORE_INDEX || l == i64::from(id), "case {case} t {t}");
        }
        let answers: Vec<&Message> = messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .collect();
        let runs = labelled_runs(&e.labels);
        assert_eq!(
            runs.len(),
            answers.len(),
            "case {case}: one labelled run per answer"
        );
        let mut unlabelled = String::new();
        let mut prev_end = 0;
        for ((s, t), answer) in runs.iter().zip(&answers) {
            // The run's text: what decoding up to its end adds to decoding up to its start.
            let full = decode(&e.input_ids[..*t]);
            let before = decode(&e.input_ids[..*s]);
            let run = full
                .strip_prefix(before.as_str())
                .expect("prefix decodes stably");
            let want = format!("{}</s>", py_strip(&answer.content));
            // After the EOS only the newline (and its dummy-prefix space) that starts the
            // next message is labelled: the reference's mask leaves it between two spans.
            let rest = run.strip_prefix(want.as_str()).unwrap_or_else(|| {
                panic!("case {case}: labelled {run:?}, expected it to start with {want:?}")
            });
            assert!(
                rest.trim().is_empty(),
                "case {case}: labelled extra {rest:?}"
            );
            unlabelled.push_str(&decode(&e.input_ids[prev_end..*s]));
            prev_end = *t;
        }
        unlabelled.push_str(&decode(&e.input_ids[prev_end..]));
        // Every non-assistant message is in the unlabelled text.
        for m in messages.iter().filter(|m| m.role != Role::Assistant) {
            assert!(
                unlabelled.contains(py_strip(&m.content)),
                "case {case}: {m:?}"
            );
        }
    }
}

#[test]
fn truncation_only_cuts_the_untruncated_encoding() {
    let mut rng = StdRng::seed_from_u64(12);
    for case in 0..100 {
        let example = Example {
            messages: conversation(&mut rng),
        };
        let full = encoder().encode(&example, 4096).unwrap();
        for max in [1, 2, 5, 9, 17, 33, 64] {
            let cut = encoder().encode(&example, max).unwrap();
            let n = full.input_ids.len().min(max);
            assert_eq!(cut.input_ids, full.input_ids[..n], "case {case} max {max}");
            assert_eq!(cut.labels, full.labels[..n], "case {case} max {max}");
        }
    }
}
