//! The tokenizer a GGUF file describes, built as transformers' GGUF conversion builds it
//! (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`): `gpt2` byte-level BPE from
//! the tokens and merges, `llama` SentencePiece BPE from the tokens, with merges recovered
//! from the scores; control tokens special, user-defined tokens added whole; BOS/EOS added as
//! `tokenizer.ggml.add_bos_token` / `add_eos_token` say.

use super::read::{GgufFile, Metadata};
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Map, Value as Json};
use std::collections::{HashMap, HashSet};
use tokenizers::Tokenizer;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// A token the tokenizer treats specially (BOS, EOS, end of turn…).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialToken {
    pub id: u32,
    pub content: String,
}

/// What a GGUF file says about its tokenizer besides the vocabulary.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizerInfo {
    pub bos: Option<SpecialToken>,
    pub eos: Option<SpecialToken>,
    /// End of turn (`tokenizer.ggml.eot_token_id`), where the file names one.
    pub eot: Option<SpecialToken>,
    pub unk: Option<SpecialToken>,
    pub pad: Option<SpecialToken>,
    /// Whether encoding puts BOS first (`tokenizer.ggml.add_bos_token`; absent: true for a
    /// SentencePiece vocabulary, as llama.cpp and transformers assume, else false).
    pub add_bos: bool,
    /// Whether encoding puts EOS last (`tokenizer.ggml.add_eos_token`, absent: false).
    pub add_eos: bool,
    /// `tokenizer.chat_template`: the Jinja template the model was tuned with.
    pub chat_template: Option<String>,
}

/// The tokenizer of `file`.
pub fn tokenizer(file: &GgufFile) -> Result<Tokenizer> {
    let json = tokenizer_json(file)?;
    Tokenizer::from_bytes(serde_json::to_vec(&json)?).map_err(|e| {
        anyhow!(
            "{}: the tokenizer it describes cannot be built: {e}",
            file.path().display()
        )
    })
}

/// The special tokens, BOS/EOS flags and chat template of `file`.
pub fn info(file: &GgufFile) -> Result<TokenizerInfo> {
    let meta = file.metadata();
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let special = |key: &str| -> Result<Option<SpecialToken>> {
        let key = format!("tokenizer.ggml.{key}");
        let Some(id) = meta.opt_u64(&key)? else {
            return Ok(None);
        };
        let content = tokens.get(id as usize).ok_or_else(|| {
            anyhow!(
                "{}: {key} is {id}, beyond the {} tokens of tokenizer.ggml.tokens",
                file.path().display(),
                tokens.len()
            )
        })?;
        Ok(Some(SpecialToken {
            id: id as u32,
            content: content.to_string(),
        }))
    };
    let kind = meta.str("tokenizer.ggml.model")?;
    Ok(TokenizerInfo {
        bos: special("bos_token_id")?,
        eos: special("eos_token_id")?,
        eot: special("eot_token_id")?,
        unk: special("unknown_token_id")?,
        pad: special("padding_token_id")?,
        add_bos: meta
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(kind == "llama"),
        add_eos: meta
            .opt_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false),
        chat_template: meta.opt_str("tokenizer.chat_template")?.map(String::from),
    })
}

/// The tokenizer as `tokenizer.json` (the `tokenizers` library's serialization).
pub fn tokenizer_json(file: &GgufFile) -> Result<Json> {
    let meta = file.metadata();
    let path = file.path().display();
    let arch = meta.str("general.architecture")?;
    let kind = meta.str("tokenizer.ggml.model")?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types = match meta.get("tokenizer.ggml.token_type") {
        Some(_) => meta.i64s("tokenizer.ggml.token_type")?,
        None => Vec::new(),
    };
    let (model, pre_tokenizer, decoder, byte_level) = match kind {
        "gpt2" => {
            let model = byte_level_model(meta, &tokens)?;
            let pre = match meta.opt_str("tokenizer.ggml.pre")?.and_then(split_regex) {
                Some(regex) => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated",
                     "invert": false},
                    byte_level(false),
                ]}),
                None => byte_level(true),
            };
            (model, pre, byte_level(true), true)
        }
        // Gemma and Phi-3 files say "llama" too, but transformers builds theirs differently.
        "llama" if matches!(arch, "gemma" | "gemma2" | "gemma3" | "phi3") => bail!(
            "{path}: the SentencePiece tokenizer of a {arch} GGUF is not supported; pass the \
             model's tokenizer.json with --tokenizer"
        ),
        "llama" => {
            let model = sentencepiece_model(meta, &tokens)?;
            let pre = json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                             "split": false});
            let decoder = json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ]});
            (model, pre, decoder, false)
        }
        other => bail!(
            "{path}: tokenizer.ggml.model is {other:?}; GGUF tokenizers of type \"gpt2\" and \
             \"llama\" are supported (pass a tokenizer.json with --tokenizer)"
        ),
    };
    let vocab = model["vocab"].as_object().expect("the model has a vocab");
    let info = info(file)?;
    let added = added_tokens(vocab, &tokens, &types, byte_level, &info);
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor(&info),
        "decoder": decoder,
        "model": model,
    }))
}

/// The `ByteLevel` pre-tokenizer (GPT-2's split regex or none) and decoder.
fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
           "use_regex": use_regex})
}

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the others for
/// the characters from U+0100 on.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        *slot = if printable {
            char::from(b as u8)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below the surrogates")
        };
    }
    table
}

/// Byte-level BPE: tokens spelled in the byte alphabet as stored, others respelled byte by
/// byte; the file's merges.
fn byte_level_model(meta: &Metadata, tokens: &[&str]) -> Result<Json> {
    let spelling = bytes_to_unicode();
    let alphabet: HashSet<char> = spelling.iter().copied().collect();
    let mut vocab = Map::new();
    for (id, t) in tokens.iter().enumerate() {
        let key = if t.chars().all(|c| alphabet.contains(&c)) {
            t.to_string()
        } else {
            t.bytes().map(|b| spelling[b as usize]).collect()
        };
        vocab.insert(key, json!(id));
    }
    let merges: Vec<Json> = meta
        .strings("tokenizer.ggml.merges")?
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => bail!("tokenizer.ggml.merges holds {m:?}, not two tokens"),
        })
        .collect::<Result<_>>()?;
    Ok(json!({"type": "BPE", "dropout": null, "unk_token": null,
              "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
              "byte_fallback": false, "ignore_merges": false, "vocab": vocab,
              "merges": merges}))
}

/// SentencePiece BPE with byte fallback: the tokens as stored, the merges the file gives or
/// the ones its scores imply.
fn sentencepiece_model(meta: &Metadata, tokens: &[&str]) -> Result<Json> {
    let mut vocab = Map::new();
    for (id, t) in tokens.iter().enumerate() {
        vocab.insert(t.to_string(), json!(id));
    }
    let merges: Vec<(String, String)> = match meta.get("tokenizer.ggml.merges") {
        Some(_) => meta
            .strings("tokenizer.ggml.merges")?
            .iter()
            .filter_map(|m| m.split_once(' '))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        None => {
            let scores = meta.f64s("tokenizer.ggml.scores")?;
            if scores.len() != tokens.len() {
                bail!(
                    "tokenizer.ggml.scores has {} entries for {} tokens",
                    scores.len(),
                    tokens.len()
                );
            }
            merges_from_scores(tokens, &scores)
        }
    };
    let merges: Vec<Json> = merges.into_iter().map(|(a, b)| json!([a, b])).collect();
    Ok(json!({"type": "BPE", "dropout": null, "unk_token": null,
              "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
              "byte_fallback": true, "ignore_merges": false, "vocab": vocab,
              "merges": merges}))
}

/// transformers' `generate_merges(vocab, vocab_scores)`: every split of every token into two
/// tokens of the vocabulary, best score first, then the longer left and right parts; ties in
/// vocabulary order.
pub fn merges_from_scores(tokens: &[&str], scores: &[f64]) -> Vec<(String, String)> {
    // Python dicts: a repeated token keeps its first place and its last id and score.
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut score_of: HashMap<&str, f64> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for (id, (&t, &s)) in tokens.iter().zip(scores).enumerate() {
        if ids.insert(t, id).is_none() {
            order.push(t);
        }
        score_of.insert(t, s);
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for &token in &order {
        let mut local: Vec<(&str, &str, f64)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
            .map(|(l, r)| (l, r, score_of[token]))
            .collect();
        local.sort_by_key(|&(l, r, _)| (ids[l], ids[r]));
        merges.extend(local);
    }
    let key = |m: &(&str, &str, f64)| (m.2, m.0.chars().count(), m.1.chars().count());
    merges.sort_by(|a, b| {
        let (a, b) = (key(a), key(b));
        b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

/// The tokens matched whole before the model sees the text: control tokens (special; in a
/// byte-level vocabulary only those spelled in its alphabet), user-defined tokens (not
/// special), and the named special tokens not among them.
fn added_tokens(
    vocab: &Map<String, Json>,
    tokens: &[&str],
    types: &[i64],
    byte_level: bool,
    info: &TokenizerInfo,
) -> Vec<Json> {
    let alphabet: HashSet<char> = bytes_to_unicode().iter().copied().collect();
    let spelled = |t: &str| !byte_level || t.chars().all(|c| alphabet.contains(&c));
    let control = tokens
        .iter()
        .zip(types)
        .filter(|(t, &ty)| ty == CONTROL && spelled(t))
        .map(|(t, _)| (*t, true));
    let user_defined = tokens
        .iter()
        .zip(types)
        .filter(|(_, &ty)| ty == USER_DEFINED)
        .map(|(t, _)| (*t, false));
    let named = [&info.bos, &info.eos, &info.unk, &info.pad]
        .into_iter()
        .flatten()
        .map(|s| (s.content.as_str(), true));
    let mut added: Vec<(u64, &str, bool)> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for (content, special) in control.chain(user_defined).chain(named) {
        if let Some(id) = vocab.get(content).and_then(Json::as_u64) {
            if seen.insert(content) {
                added.push((id, content, special));
            }
        }
    }
    added.sort_by_key(|&(id, ..)| id);
    added
        .into_iter()
        .map(|(id, content, special)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": special})
        })
        .collect()
}

/// transformers' `update_post_processor`: BOS before and EOS after each sequence where the
/// file asks for them.
fn post_processor(info: &TokenizerInfo) -> Json {
    let bos = info.bos.as_ref().filter(|_| info.add_bos);
    let eos = info.eos.as_ref().filter(|_| info.add_eos);
    let special = |t: &SpecialToken, type_id: u32| json!({"SpecialToken": {"id": t.content, "type_id": type_id}});
    let sequence = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (seq, type_id) in [("A", 0), ("B", 1)] {
        let target = if seq == "A" { &mut single } else { &mut pair };
        if let Some(b) = bos {
            target.push(special(b, type_id));
        }
        target.push(sequence(seq, type_id));
        if let Some(e) = eos {
            target.push(special(e, type_id));
        }
    }
    let pair: Vec<Json> = single.iter().cloned().chain(pair).collect();
    let mut specials = Map::new();
    for t in [bos, eos].into_iter().flatten() {
        specials.insert(
            t.content.clone(),
            json!({"id": t.content, "ids": [t.id], "tokens": [t.content]}),
        );
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair,
           "special_tokens": specials})
}

/// transformers' split regex for a `tokenizer.ggml.pre` (`GGUF_PRE_TOKENIZER_SPLITS`); None:
/// GPT-2's own.
fn split_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

/// Writes the tokenizer of the GGUF at `path` into the model directory `out` as transformers
/// keeps one: `tokenizer.json`, and `chat_template.jinja` where the file has a template.
pub fn write_files(path: &std::path::Path, out: &std::path::Path) -> Result<()> {
    let file = GgufFile::open(path)?;
    crate::atomic::write(
        &out.join("tokenizer.json"),
        serde_json::to_string(&tokenizer_json(&file)?)?.as_bytes(),
    )?;
    if let Some(template) = info(&file)?.chat_template {
        crate::atomic::write(&out.join("chat_template.jinja"), template.as_bytes())?;
    }
    Ok(())
}
