//! Chat encoding against the golden cases of `tests/fixtures/chat-encoding/` (open-instruct's
//! `encode_with_messages_format`) and the LLaMA-2 tokenizer goldens.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use prolora::data::chat::{
    encode_all, py_strip, read_jsonl, ChatEncoder, ChatFormat, Encoded, Example, Message, Role,
    IGNORE_INDEX,
};
use prolora::source;
use prolora::tokenizer::{ModelTokenizer, SpecialIds};

const CASES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/chat-encoding/cases.jsonl"
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

struct Case {
    name: String,
    example: Example,
    max_seq_length: usize,
    expected: Encoded,
}

fn cases() -> Vec<Case> {
    std::fs::read_to_string(CASES)
        .expect("read cases.jsonl")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Case {
                name: v["name"].as_str().unwrap().to_string(),
                example: serde_json::from_value(v.clone()).unwrap(),
                max_seq_length: v["max_seq_length"].as_u64().unwrap() as usize,
                expected: Encoded {
                    input_ids: serde_json::from_value(v["input_ids"].clone()).unwrap(),
                    labels: serde_json::from_value(v["labels"].clone()).unwrap(),
                },
            }
        })
        .collect()
}

fn case(name: &str) -> Case {
    cases().into_iter().find(|c| c.name == name).unwrap()
}

#[test]
fn golden_cases_match_exactly() {
    let cases = cases();
    assert_eq!(cases.len(), 12);
    let mut failures = Vec::new();
    for c in &cases {
        let got = encoder().encode(&c.example, c.max_seq_length).unwrap();
        if got.input_ids != c.expected.input_ids {
            failures.push(format!(
                "{}: input_ids\n  got  {:?}\n  want {:?}",
                c.name, got.input_ids, c.expected.input_ids
            ));
        }
        if got.labels != c.expected.labels {
            failures.push(format!(
                "{}: labels\n  got  {:?}\n  want {:?}",
                c.name, got.labels, c.expected.labels
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn golden_case_label_counts() {
    // The summary table of the fixture README, as a cross-check on the fixture itself.
    let table = [
        ("single_turn", 49, 19),
        ("multi_turn_4", 54, 12),
        ("system_message", 38, 4),
        ("unicode_cjk_emoji", 68, 20),
        ("whitespace_strip", 26, 4),
        ("long_truncated_64", 64, 44),
        ("truncated_inside_assistant_tag", 73, 0),
        ("empty_assistant", 20, 1),
        ("ends_with_user", 40, 10),
        ("code_newlines_tabs", 50, 27),
        ("system_multi_turn_truncated_64", 64, 10),
        ("two_users_then_assistant", 42, 5),
    ];
    for (name, tokens, trained) in table {
        let c = case(name);
        let got = encoder().encode(&c.example, c.max_seq_length).unwrap();
        assert_eq!(
            (got.input_ids.len(), got.num_trained()),
            (tokens, trained),
            "{name}"
        );
    }
}

fn ids(text: &str) -> Vec<u32> {
    encoder()
        .tokenizer()
        .encode(text, true)
        .unwrap()
        .get_ids()
        .to_vec()
}

#[test]
fn tokenizer_goldens() {
    // golden.json of the llama2-tokenizer fixture.
    assert_eq!(
        ids("Hello, my dog is cute"),
        [1, 15043, 29892, 590, 11203, 338, 274, 1082]
    );
    assert_eq!(
        ids("<|user|>\nWhat is 2+2?\n<|assistant|>\n"),
        [
            1, 529, 29989, 1792, 29989, 29958, 13, 5618, 338, 29871, 29906, 29974, 29906, 29973,
            13, 29966, 29989, 465, 22137, 29989, 29958, 13
        ]
    );
    assert_eq!(
        ids("naïve café — 日本語 🤖 x²"),
        [
            1, 1055, 30085, 345, 274, 28059, 813, 29871, 30325, 30346, 30968, 29871, 243, 162, 167,
            153, 921, 30088
        ]
    );
}

#[test]
fn special_tokens_split_with_own_dummy_prefix() {
    assert_eq!(ids("a</s>b"), [1, 263, 2, 289]);
    assert_eq!(ids("</s>\n"), [1, 2, 29871, 13]);
    assert_eq!(ids(""), [1]);
    assert_eq!(encoder().model_tokenizer().eos(), Some("</s>"));
    assert_eq!(encoder().stop_ids(), [2]);
}

#[test]
fn python_strip() {
    assert_eq!(py_strip("\x1c hi \u{3000}"), "hi");
    assert_eq!(
        py_strip("\u{1f}\u{1d}\t\r\n\u{0b}\u{0c}\u{85}\u{a0}x y\u{2028}\u{202f}\u{1e}"),
        "x y"
    );
    // Not whitespace for Python: zero-width space, BOM.
    assert_eq!(py_strip("\u{200b}a\u{feff}"), "\u{200b}a\u{feff}");
    assert_eq!(py_strip(" \n "), "");
}

#[test]
fn prompt_is_the_masked_prefix_of_training() {
    // The generation prompt of a one-turn chat is exactly the masked part of its training ids.
    let c = case("single_turn");
    let prompt = encoder().encode_prompt(&c.example.messages[..1]).unwrap();
    let masked = c
        .expected
        .labels
        .iter()
        .take_while(|&&l| l == IGNORE_INDEX)
        .count();
    assert_eq!(prompt, c.expected.input_ids[..masked]);
}

#[test]
fn encode_rejects_degenerate_input() {
    let ex = Example {
        messages: vec![Message {
            role: Role::User,
            content: "hi".into(),
        }],
    };
    assert!(encoder().encode(&ex, 0).is_err());
    assert!(encoder()
        .encode(&Example { messages: vec![] }, 512)
        .is_err());
    // An assistant turn with no user/system turn before it: its tag would be trained on.
    let turn = |role, content: &str| Message {
        role,
        content: content.into(),
    };
    for messages in [
        vec![turn(Role::Assistant, "a")],
        vec![
            turn(Role::User, "q"),
            turn(Role::Assistant, "a"),
            turn(Role::Assistant, "b"),
        ],
    ] {
        let err = format!(
            "{:#}",
            encoder().encode(&Example { messages }, 512).unwrap_err()
        );
        assert!(err.contains("<|assistant|> tag"), "{err}");
    }
    // max 1: only BOS, nothing trained.
    let e = encoder().encode(&ex, 1).unwrap();
    assert_eq!((e.input_ids, e.labels), (vec![1], vec![IGNORE_INDEX]));
}

#[test]
fn encode_all_drops_examples_without_labels() {
    let single = case("single_turn");
    let cut = case("truncated_inside_assistant_tag");
    assert_eq!(cut.max_seq_length, 73);
    let examples = [single.example.clone(), cut.example, single.example];
    let (kept, dropped) = encode_all(encoder(), &examples, 73).unwrap();
    assert_eq!(dropped, 1);
    assert_eq!(kept, [single.expected.clone(), single.expected]);
}

#[test]
fn tokenizer_without_eos_is_rejected() {
    let t = tokenizers::Tokenizer::new(tokenizers::models::bpe::BPE::default());
    let none = SpecialIds {
        bos: None,
        eos: None,
        more_eos: Vec::new(),
        unk: None,
        pad: None,
    };
    let t = ModelTokenizer::from_ids(t, none, None, "empty").unwrap();
    for format in [ChatFormat::Tulu, ChatFormat::None] {
        let err = ChatEncoder::new(t.clone(), format)
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains("no EOS token"), "{err}");
    }
    let err = ChatEncoder::new(t, ChatFormat::Model)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("no chat template"), "{err}");
    let missing = Path::new("/nonexistent/tok.json");
    let err = format!(
        "{:#}",
        ModelTokenizer::from_file(missing).err().expect("must fail")
    );
    assert!(err.contains("/nonexistent/tok.json"), "{err}");
}

#[test]
fn serde_example_ignores_extra_keys_and_names_bad_role() {
    let ex: Example = serde_json::from_str(
        r#"{"dataset": "oasst1", "id": "x1", "messages": [{"role": "user", "content": "hi"}]}"#,
    )
    .unwrap();
    assert_eq!(
        ex.messages,
        [Message {
            role: Role::User,
            content: "hi".into()
        }]
    );
    let err = serde_json::from_str::<Example>(r#"{"messages": [{"role": "bot", "content": "x"}]}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bot") && err.contains("assistant"), "{err}");
}

// ---- read_jsonl ----

fn write_file(test: &str, bytes: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("chat")
        .join(test);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("file.jsonl");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn read_err(test: &str, content: &[u8]) -> String {
    let path = write_file(test, content);
    let msg = format!("{:#}", read_jsonl(&path).expect_err("must fail"));
    assert!(!msg.contains('\n'), "error is not one line: {msg}");
    msg
}

const GOOD: &str = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;

#[test]
fn read_jsonl_reads_and_skips_blank_lines() {
    let text = format!(
        "{GOOD}\n\n  \r\n{}\n",
        r#"{"id": 7, "dataset": "d", "messages": [{"role": "system", "content": "s", "extra": 1}]}"#
    );
    let path = write_file("good", text.as_bytes());
    let exs = read_jsonl(&path).unwrap();
    assert_eq!(exs.len(), 2);
    assert_eq!(
        exs[0].messages[1],
        Message {
            role: Role::Assistant,
            content: "hello".into()
        }
    );
    assert_eq!(
        exs[1].messages,
        [Message {
            role: Role::System,
            content: "s".into()
        }]
    );
}

#[test]
fn read_jsonl_not_json() {
    let msg = read_err(
        "not_json",
        format!("{GOOD}\n\n{{\"messages\": [\n{GOOD}\n").as_bytes(),
    );
    assert!(msg.contains("file.jsonl:3:"), "{msg}");
    assert!(msg.contains("not valid JSON"), "{msg}");
}

#[test]
fn read_jsonl_missing_messages() {
    let msg = read_err("no_messages", br#"{"instruction": "a", "output": "b"}"#);
    assert!(msg.contains("file.jsonl:1:"), "{msg}");
    assert!(msg.contains("no \"messages\""), "{msg}");
    assert!(msg.contains("instruction"), "{msg}");
}

#[test]
fn read_jsonl_unknown_role() {
    let line =
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}"#;
    let msg = read_err("bad_role", format!("{GOOD}\n{line}\n").as_bytes());
    assert!(msg.contains("file.jsonl:2:"), "{msg}");
    assert!(msg.contains("\"bot\""), "{msg}");
    assert!(msg.contains("system, user, assistant"), "{msg}");
}

#[test]
fn read_jsonl_other_errors() {
    let msg = read_err("empty", br#"{"messages": []}"#);
    assert!(
        msg.contains("file.jsonl:1:") && msg.contains("empty"),
        "{msg}"
    );
    let msg = read_err("no_content", br#"{"messages": [{"role": "user"}]}"#);
    assert!(
        msg.contains("file.jsonl:1:") && msg.contains("content"),
        "{msg}"
    );
    let msg = read_err("no_role", br#"{"messages": [{"content": "x"}]}"#);
    assert!(
        msg.contains("file.jsonl:1:") && msg.contains("role"),
        "{msg}"
    );
    let msg = read_err(
        "null_content",
        br#"{"messages": [{"role": "user", "content": null}]}"#,
    );
    assert!(msg.contains("content must be a string"), "{msg}");
    let msg = read_err("array_line", b"[1, 2]");
    assert!(
        msg.contains("file.jsonl:1:") && msg.contains("a list"),
        "{msg}"
    );
    let mut bytes = format!("{GOOD}\n").into_bytes();
    bytes.extend_from_slice(b"{\"messages\": \"\xff\"}\n");
    let msg = read_err("not_utf8", &bytes);
    assert!(
        msg.contains("file.jsonl:2:") && msg.contains("UTF-8"),
        "{msg}"
    );
    let missing = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chat/absent.jsonl");
    let msg = format!("{:#}", read_jsonl(&missing).unwrap_err());
    assert!(msg.contains("absent.jsonl"), "{msg}");
}
