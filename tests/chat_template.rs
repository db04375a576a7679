//! The chat formats on a real model's tokenizer (SmolLM2-135M-Instruct, from its GGUF) against
//! transformers (`scripts/reference/make_template_goldens.py`): the model's template rendered
//! and tokenized as `apply_chat_template` does, the loss mask equal to
//! `return_assistant_tokens_mask` (found by rendering prefixes, and from `{% generation %}`
//! blocks), generation prompts, and open-instruct's tulu encoding with `<|im_end|>` as the EOS.
//! Also the template features chat templates use, rendered by transformers' Jinja setup.

mod common;

use std::sync::OnceLock;

use prolora::data::chat::{ChatEncoder, ChatFormat, Encoded, Example, Message, IGNORE_INDEX};
use prolora::data::spans;
use prolora::data::template::ChatTemplate;
use prolora::tokenizer::ModelTokenizer;
use serde_json::Value;

fn golden(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/chat-template/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// SmolLM2's tokenizer, special tokens and chat template as its GGUF gives them (what
/// `--tokenizer model.gguf` reads).
fn smollm2() -> &'static ModelTokenizer {
    static TOKENIZER: OnceLock<ModelTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let gguf = common::smollm2::smollm2_gguf();
        prolora::source::tokenizer(gguf.to_str().unwrap(), "main").unwrap()
    })
}

fn encoder(format: ChatFormat) -> ChatEncoder {
    ChatEncoder::new(smollm2().clone(), format).unwrap()
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Labels from ids and a 0/1 mask.
fn masked(ids: &[u32], mask: &Value) -> Vec<i64> {
    let mask: Vec<u8> = serde_json::from_value(mask.clone()).unwrap();
    assert_eq!(mask.len(), ids.len());
    ids.iter()
        .zip(mask)
        .map(|(&id, m)| if m == 1 { i64::from(id) } else { IGNORE_INDEX })
        .collect()
}

#[test]
fn the_gguf_gives_the_reference_specials_and_template() {
    let g = golden("smollm2");
    let t = smollm2();
    assert_eq!(t.bos(), g["bos_token"].as_str());
    assert_eq!(t.eos(), g["eos_token"].as_str());
    assert_eq!(t.chat_template(), g["template"].as_str());
    assert_eq!(t.eos_ids(), [2]);
    // The template ends turns with <|im_end|>, the EOS: generation stops there.
    assert_eq!(encoder(ChatFormat::Model).stop_ids(), [2]);
}

#[test]
fn the_model_template_encodes_as_apply_chat_template() {
    let g = golden("smollm2");
    let enc = encoder(ChatFormat::Model);
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 11);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let example = Example {
            messages: messages(&c["messages"]),
        };
        assert_eq!(
            enc.prompt_text(
                &example.messages[..c["prompt"]["messages"].as_u64().unwrap() as usize]
            )
            .unwrap(),
            c["prompt"]["text"].as_str().unwrap(),
            "{name}: generation prompt text"
        );
        let want_ids = ids(&c["input_ids"]);
        let (got, full_len) = enc.encode_with_length(&example, 4096).unwrap();
        assert_eq!(full_len, want_ids.len(), "{name}");
        assert_eq!(got.input_ids, want_ids, "{name}: ids");
        // Found by rendering prefixes of the plain template, equal to transformers' mask on the
        // copy with {% generation %} blocks.
        assert_eq!(
            got.labels,
            masked(&want_ids, &c["assistant_masks"]),
            "{name}: labels"
        );
        let max = c["max_seq_length"].as_u64().unwrap() as usize;
        if let Some(cut) = c.get("truncated") {
            let want_ids = ids(&cut["input_ids"]);
            let want = Encoded {
                labels: masked(&want_ids, &cut["assistant_masks"]),
                input_ids: want_ids,
            };
            assert_eq!(
                enc.encode(&example, max).unwrap(),
                want,
                "{name}: truncated"
            );
        }
    }
}

#[test]
fn generation_blocks_give_transformers_assistant_masks() {
    let g = golden("smollm2");
    let t = smollm2();
    let template = ChatTemplate::new(
        g["generation_template"].as_str().unwrap(),
        &t.template_specials(),
    )
    .unwrap();
    assert!(template.has_generation_blocks());
    for c in g["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let (text, answers) =
            spans::template_answers(&template, &[], &messages(&c["messages"])).unwrap();
        assert_eq!(text, c["rendered"].as_str().unwrap(), "{name}");
        let (got, _) = spans::encode(t.tokenizer(), &text, &answers, false, 4096).unwrap();
        let want_ids = ids(&c["input_ids"]);
        assert_eq!(got.input_ids, want_ids, "{name}");
        assert_eq!(
            got.labels,
            masked(&want_ids, &c["assistant_masks"]),
            "{name}"
        );
    }
}

#[test]
fn generation_prompts_are_the_reference_ids() {
    let g = golden("smollm2");
    let enc = encoder(ChatFormat::Model);
    for c in g["cases"].as_array().unwrap() {
        let all = messages(&c["messages"]);
        let k = c["prompt"]["messages"].as_u64().unwrap() as usize;
        assert_eq!(
            enc.encode_prompt(&all[..k]).unwrap(),
            ids(&c["prompt"]["input_ids"]),
            "{}",
            c["name"]
        );
    }
}

#[test]
fn tulu_appends_the_tokenizers_own_eos_as_open_instruct_does() {
    let g = golden("smollm2");
    let enc = encoder(ChatFormat::Tulu);
    for c in g["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let example = Example {
            messages: messages(&c["messages"]),
        };
        let want = Encoded {
            input_ids: ids(&c["open_instruct"]["input_ids"]),
            labels: serde_json::from_value(c["open_instruct"]["labels"].clone()).unwrap(),
        };
        let max = c["max_seq_length"].as_u64().unwrap() as usize;
        assert_eq!(enc.encode(&example, max).unwrap(), want, "{name}");
        // SmolLM2's tokenizer adds no BOS, so neither does the prompt.
        assert_ne!(want.input_ids[0], 1, "{name}");
    }
}

#[test]
fn another_models_tokenizer_is_refused_naming_both_sizes() {
    let llama2 = prolora::source::tokenizer("llama2-7b", "main").unwrap();
    let err = llama2.check_fits(49152).unwrap_err().to_string();
    assert!(err.contains("32000") && err.contains("49152"), "{err}");
    let err = smollm2().check_fits(32000).unwrap_err().to_string();
    assert!(err.contains("49152") && err.contains("32000"), "{err}");
    smollm2().check_fits(49152).unwrap();
    // Padding rows past the vocabulary are fine.
    smollm2().check_fits(49152 + 64).unwrap();
}

#[test]
fn prompts_get_bos_only_where_the_tokenizer_adds_it() {
    let llama2 = prolora::source::tokenizer("llama2-7b", "main").unwrap();
    let tulu = ChatEncoder::new(llama2, ChatFormat::Tulu).unwrap();
    assert_eq!(tulu.prompt_ids("Hi").unwrap()[0], 1);
    let smol = encoder(ChatFormat::Tulu);
    assert_eq!(
        smol.prompt_ids("Hi").unwrap(),
        smol.ids("Hi", false).unwrap()
    );
    // A template's text holds its own specials: nothing is added to it.
    let model = encoder(ChatFormat::Model);
    let text = "<|im_start|>user\nHi<|im_end|>\n";
    assert_eq!(model.prompt_ids(text).unwrap()[0], 1);
    assert_eq!(
        model.prompt_ids(text).unwrap(),
        model.ids(text, false).unwrap()
    );
}

#[test]
fn format_none_trains_on_the_answers_and_their_eos() {
    let enc = encoder(ChatFormat::None);
    let turn = |role: &str, content: &str| -> Message {
        serde_json::from_value(serde_json::json!({"role": role, "content": content})).unwrap()
    };
    let example = Example {
        messages: vec![
            turn("user", "2+2 ="),
            turn("assistant", " 4"),
            turn("user", "\n3+3 ="),
            turn("assistant", " 6"),
        ],
    };
    let e = enc.encode(&example, 512).unwrap();
    let tok = smollm2().tokenizer();
    assert_eq!(
        tok.decode(&e.input_ids, false).unwrap(),
        "2+2 = 4<|im_end|>\n3+3 = 6<|im_end|>"
    );
    let trained: Vec<u32> = e
        .input_ids
        .iter()
        .zip(&e.labels)
        .filter(|(_, &l)| l != IGNORE_INDEX)
        .map(|(&id, _)| id)
        .collect();
    assert_eq!(
        tok.decode(&trained, false).unwrap(),
        " 4<|im_end|> 6<|im_end|>"
    );
    assert_eq!(
        enc.prompt_text(&example.messages[..3]).unwrap(),
        "2+2 = 4<|im_end|>\n3+3 ="
    );
}

#[test]
fn template_features_render_as_transformers_renders_them() {
    let g = golden("features");
    let msgs = messages(&g["messages"]);
    let specials = [
        ("bos_token", "<s>".to_string()),
        ("eos_token", "</s>".to_string()),
    ];
    for c in g["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let template =
            ChatTemplate::new(g["templates"][name].as_str().unwrap(), &specials).unwrap();
        let agp = c["add_generation_prompt"].as_bool().unwrap();
        let r = template.render(&msgs, agp).unwrap();
        assert_eq!(r.text, c["rendered"].as_str().unwrap(), "{name} {agp}");
        let blocks: Vec<&str> = r.generation.iter().map(|s| &r.text[s.clone()]).collect();
        let want: Vec<&str> = c["generation"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap())
            .collect();
        assert_eq!(blocks, want, "{name} {agp}");
    }
}

#[test]
fn template_errors_are_one_clear_line() {
    let t = ChatTemplate::new(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message is required') }}{% endif %}",
        &[],
    )
    .unwrap();
    let user: Message =
        serde_json::from_value(serde_json::json!({"role": "user", "content": "hi"})).unwrap();
    let err = format!("{:#}", t.render(&[user], false).unwrap_err());
    assert!(err.contains("a system message is required"), "{err}");
    let err = ChatTemplate::new("{% for %}", &[])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("does not compile"), "{err}");
}

/// `quantize` keeps what the tokenizer reads beside tokenizer.json: the chat template too.
#[test]
fn quantize_keeps_the_chat_template_and_the_tokenizer_configs() {
    let src = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(common::fixture("llama-gqa")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, src.path().join(path.file_name().unwrap())).unwrap();
    }
    let extras = [
        ("chat_template.jinja", "{{ messages[0]['content'] }}"),
        ("tokenizer_config.json", r#"{"eos_token": "</s>"}"#),
        ("generation_config.json", r#"{"eos_token_id": [2, 7]}"#),
    ];
    for (name, text) in extras {
        std::fs::write(src.path().join(name), text).unwrap();
    }
    let source =
        prolora::source::ModelSource::resolve(src.path().to_str().unwrap(), "main").unwrap();
    let out = tempfile::tempdir().unwrap();
    prolora::quantize::quantize_model(&source, out.path(), true).unwrap();
    for (name, text) in extras {
        assert_eq!(
            std::fs::read_to_string(out.path().join(name)).unwrap(),
            text,
            "{name}"
        );
    }
}

/// What `quantize` writes beside the tokenizer.json of a GGUF model reads back as the same
/// special tokens, stop ids and template.
#[test]
fn a_gguf_tokenizer_written_as_files_reads_back_the_same() {
    let t = smollm2();
    let dir = tempfile::tempdir().unwrap();
    t.tokenizer()
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();
    let (tokenizer_config, generation_config) = t.configs();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        generation_config.to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        t.chat_template().unwrap(),
    )
    .unwrap();
    let back = ModelTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(back.template_specials(), t.template_specials());
    assert_eq!(back.eos_ids(), t.eos_ids());
    assert_eq!(back.chat_template(), t.chat_template());
}

/// SmolLM2 itself in its own template (f32, from the GGUF): the loss over the answers and the
/// greedy answers to generation prompts equal transformers' (its GGUF loader, f32).
#[test]
fn smollm2_in_its_template_gives_transformers_loss_and_greedy_answers() {
    // Decoding steps on a team, as the CLI runs them.
    common::in_a_pool_of_two(smollm2_in_its_template);
}

fn smollm2_in_its_template() {
    use prolora::generate::{generate, Ended, Settings};
    let g = golden("smollm2_model");
    let conversations = golden("smollm2");
    let case = |name: &str| -> Vec<Message> {
        let c = conversations["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap();
        messages(&c["messages"])
    };
    let gguf = common::smollm2::smollm2_gguf();
    let source = prolora::source::ModelSource::resolve(gguf.to_str().unwrap(), "main").unwrap();
    let model = source
        .load(candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    let enc = encoder(ChatFormat::Model);
    let examples: Vec<Encoded> = g["per_case"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let messages = case(c["name"].as_str().unwrap());
            enc.encode(&Example { messages }, 4096).unwrap()
        })
        .collect();
    let (loss, tokens) = prolora::eval::evaluate(&model, &examples, 3).unwrap();
    assert_eq!(tokens as u64, g["tokens"].as_u64().unwrap());
    let want = g["loss"].as_f64().unwrap();
    assert!(
        (loss - want).abs() < 1e-4,
        "loss {loss} vs transformers' {want}"
    );
    let n = g["max_new_tokens"].as_u64().unwrap() as usize;
    for greedy in g["greedy"].as_array().unwrap() {
        let name = greedy["name"].as_str().unwrap();
        let messages = case(name);
        let k = messages
            .iter()
            .rposition(|m| m.role == prolora::data::chat::Role::User)
            .unwrap();
        let c = generate(&model, &enc, &messages[..=k], &Settings::greedy(n)).unwrap();
        assert_eq!(c.ids, ids(&greedy["new_ids"]), "{name}");
        let ended = if greedy["ended"] == "eos" {
            Ended::Eos
        } else {
            Ended::MaxNewTokens
        };
        assert_eq!(c.ended, ended, "{name}");
    }
}
