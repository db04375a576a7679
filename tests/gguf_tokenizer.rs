//! The tokenizer built from a GGUF's vocabulary against transformers' GGUF conversion: ids,
//! character offsets and decoded text on a mixed-script corpus (English, code, CJK, emoji,
//! Arabic, accents, whitespace runs, special tokens in the text), for SmolLM2's byte-level BPE
//! and a SentencePiece vocabulary (scripts/reference/make_gguf_tokenizer_goldens.py).

mod common;

use prolora::gguf::tokenizer::{info, tokenizer, SpecialToken};
use prolora::gguf::GgufFile;
use serde_json::Value;
use std::path::Path;

fn goldens(which: &str) -> Value {
    let text = std::fs::read_to_string(common::fixture("gguf/tokenizer.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()[which].clone()
}

fn check(path: &Path, which: &str) {
    let file = GgufFile::open(path).unwrap();
    let tok = tokenizer(&file).unwrap();
    let want = goldens(which);
    assert_eq!(
        tok.get_vocab_size(true) as u64,
        want["vocab_size"].as_u64().unwrap()
    );
    for case in want["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let enc = tok.encode_char_offsets(text, true).unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(enc.get_ids(), ids, "{which}: ids of {text:?}");
        let offsets: Vec<(usize, usize)> = serde_json::from_value(case["offsets"].clone()).unwrap();
        assert_eq!(enc.get_offsets(), offsets, "{which}: offsets of {text:?}");
        let decoded = tok.decode(&ids, false).unwrap();
        assert_eq!(
            decoded,
            case["decoded"].as_str().unwrap(),
            "{which}: decoding {text:?}"
        );
    }
    let info = info(&file).unwrap();
    let named = |t: &Option<SpecialToken>| t.as_ref().map(|t| t.content.clone());
    let golden = |k: &str| want[k].as_str().map(String::from);
    assert_eq!(named(&info.bos), golden("bos_token"));
    assert_eq!(named(&info.eos), golden("eos_token"));
    assert_eq!(named(&info.unk), golden("unk_token"));
    assert_eq!(named(&info.pad), golden("pad_token"));
}

#[test]
fn smollm2_byte_level_bpe_equals_transformers() {
    check(&common::smollm2::smollm2_gguf(), "smollm2");
    let info = info(&GgufFile::open(&common::smollm2::smollm2_gguf()).unwrap()).unwrap();
    assert!(!info.add_bos && !info.add_eos);
    assert!(info.chat_template.unwrap().contains("<|im_start|>"));
}

#[test]
fn sentencepiece_equals_transformers() {
    let path = common::fixture("gguf/spm-tokenizer.gguf");
    check(&path, "spm");
    let info = info(&GgufFile::open(&path).unwrap()).unwrap();
    // No add_bos_token in the file: a SentencePiece vocabulary adds BOS.
    assert!(info.add_bos && !info.add_eos);
    assert_eq!(info.eot, None);
    assert!(info
        .chat_template
        .unwrap()
        .starts_with("{% for m in messages %}"));
}

/// `--tokenizer file.gguf` reads the same tokenizer.
#[test]
fn tokenizer_spec_accepts_a_gguf_file() {
    let path = common::fixture("gguf/spm-tokenizer.gguf");
    let tok = prolora::source::tokenizer(path.to_str().unwrap(), "main").unwrap();
    let ids = tok
        .tokenizer()
        .encode("Hello, world!", true)
        .unwrap()
        .get_ids()
        .to_vec();
    let want = goldens("spm")["cases"][0]["ids"].clone();
    let want: Vec<u32> = serde_json::from_value(want).unwrap();
    assert_eq!(ids, want[..ids.len()]);
}
