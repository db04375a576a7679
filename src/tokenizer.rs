//! A model's tokenizer with what transformers reads beside it: the special tokens (BOS and EOS
//! as text, every id that ends a generation), and the chat template.
//!
//! Sources, as transformers 5 reads them: `tokenizer.json` (its post-processor decides whether
//! BOS is added: transformers ignores `add_bos_token` when a tokenizer.json exists),
//! `tokenizer_config.json` (`bos_token`, `eos_token`, `unk_token`, `pad_token` as strings or
//! AddedToken objects; `chat_template` as a string or a list of `{name, template}`),
//! `special_tokens_map.json` (older files), `chat_template.jinja` (before the config's
//! template), and `config.json` / `generation_config.json` (`eos_token_id`, an id or a list: each
//! ends a generation). A GGUF carries all of these in its metadata.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::gguf;

/// The tokenizer and its special tokens.
#[derive(Clone)]
pub struct ModelTokenizer {
    tokenizer: Tokenizer,
    bos: Option<String>,
    eos: Option<String>,
    unk: Option<String>,
    pad: Option<String>,
    /// Every id that ends a generation: the EOS token's, then the config files' `eos_token_id`s.
    eos_ids: Vec<u32>,
    chat_template: Option<String>,
    /// Where it was read from, for errors.
    origin: String,
}

/// The special tokens of a tokenizer that comes with no `tokenizer_config.json` (a GGUF):
/// ids, which are looked up in the vocabulary.
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Further ids that end a turn (a GGUF's `tokenizer.ggml.eot_token_id`).
    pub more_eos: Vec<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
}

impl ModelTokenizer {
    /// The files of a model or tokenizer directory (see the module doc); `tokenizer.json` is
    /// required.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            bail!(
                "{}: no tokenizer.json; pass one with --tokenizer (or model.tokenizer in the config)",
                dir.display()
            );
        }
        Self::from_file(&path)
    }

    /// A `tokenizer.json` and the files beside it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: not a usable tokenizer.json: {e}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let origin = path.display().to_string();
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let map = read_json(&dir.join("special_tokens_map.json"))?;
        let model_config = read_json(&dir.join("config.json"))?;
        let generation = read_json(&dir.join("generation_config.json"))?;
        // The name in tokenizer_config.json, else special_tokens_map.json, else the token of the
        // model config's id.
        let special = |name: &str, id_key: &str| -> Result<Option<String>> {
            for (file, v) in [
                ("tokenizer_config.json", &config),
                ("special_tokens_map.json", &map),
            ] {
                if let Some(text) = token_text(v, name)
                    .with_context(|| format!("{}: {name}", dir.join(file).display()))?
                {
                    return Ok(Some(text));
                }
            }
            let id = ids(&model_config, id_key).first().copied();
            Ok(id.and_then(|id| tokenizer.id_to_token(id)))
        };
        let bos = special("bos_token", "bos_token_id")?;
        let eos = special("eos_token", "eos_token_id")?;
        let unk = special("unk_token", "unk_token_id")?;
        let pad = special("pad_token", "pad_token_id")?;
        let mut chat_template = match &config {
            Some(v) => template_of(v).with_context(|| {
                format!(
                    "{}: chat_template",
                    dir.join("tokenizer_config.json").display()
                )
            })?,
            None => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            chat_template = Some(
                std::fs::read_to_string(&jinja)
                    .with_context(|| format!("cannot read {}", jinja.display()))?,
            );
        }
        let mut eos_ids: Vec<u32> = eos
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        eos_ids.extend(ids(&model_config, "eos_token_id"));
        eos_ids.extend(ids(&generation, "eos_token_id"));
        Ok(ModelTokenizer {
            tokenizer,
            bos,
            eos,
            unk,
            pad,
            eos_ids: dedup(eos_ids),
            chat_template,
            origin,
        }
        .checked()?)
    }

    /// A GGUF's tokenizer as transformers converts it (its post-processor adds BOS/EOS as
    /// `tokenizer.ggml.add_bos_token` / `add_eos_token` say), its special tokens (the EOS and
    /// any `eot_token_id` end a generation) and `tokenizer.chat_template`.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let file = gguf::GgufFile::open(path)?;
        let info = gguf::tokenizer::info(&file)?;
        let id = |t: &Option<gguf::tokenizer::SpecialToken>| t.as_ref().map(|t| t.id);
        let specials = SpecialIds {
            bos: id(&info.bos),
            eos: id(&info.eos),
            more_eos: id(&info.eot).into_iter().collect(),
            unk: id(&info.unk),
            pad: id(&info.pad),
        };
        let tokenizer = gguf::tokenizer::tokenizer(&file)?;
        let origin = path.display().to_string();
        Self::from_ids(tokenizer, specials, info.chat_template, &origin)
    }

    /// A tokenizer whose special tokens are known by id.
    pub fn from_ids(
        tokenizer: Tokenizer,
        specials: SpecialIds,
        chat_template: Option<String>,
        origin: &str,
    ) -> Result<Self> {
        let text = |id: Option<u32>, what: &str| -> Result<Option<String>> {
            id.map(|id| {
                tokenizer
                    .id_to_token(id)
                    .ok_or_else(|| anyhow!("{origin}: the {what} id {id} is not in the vocabulary"))
            })
            .transpose()
        };
        let bos = text(specials.bos, "BOS")?;
        let eos = text(specials.eos, "EOS")?;
        let unk = text(specials.unk, "unknown-token")?;
        let pad = text(specials.pad, "padding")?;
        let mut eos_ids: Vec<u32> = specials.eos.into_iter().collect();
        eos_ids.extend(specials.more_eos);
        Ok(ModelTokenizer {
            tokenizer,
            bos,
            eos,
            unk,
            pad,
            eos_ids: dedup(eos_ids),
            chat_template,
            origin: origin.to_string(),
        }
        .checked()?)
    }

    /// A built-in tokenizer.json whose special tokens are the model config's ids (a preset).
    pub fn from_builtin(json: &[u8], bos_id: u32, eos_id: u32, origin: &str) -> Result<Self> {
        let tokenizer = Tokenizer::from_bytes(json)
            .map_err(|e| anyhow!("{origin}: built-in tokenizer: {e}"))?;
        let name = |id: u32| tokenizer.id_to_token(id);
        Ok(ModelTokenizer {
            bos: name(bos_id),
            eos: name(eos_id),
            unk: None,
            pad: None,
            eos_ids: vec![eos_id],
            chat_template: None,
            origin: origin.to_string(),
            tokenizer,
        }
        .checked()?)
    }

    /// Refuses special tokens the tokenizer does not know as single tokens.
    fn checked(mut self) -> Result<Self> {
        for (what, token) in [("bos_token", &self.bos), ("eos_token", &self.eos)] {
            if let Some(t) = token {
                if self.tokenizer.token_to_id(t).is_none() {
                    bail!("{}: the {what} {t:?} is not in the vocabulary", self.origin);
                }
            }
        }
        // Truncation belongs to the encoders, padding to batching.
        self.tokenizer
            .with_truncation(None)
            .map_err(|e| anyhow!("clearing tokenizer truncation: {e}"))?;
        self.tokenizer.with_padding(None);
        Ok(self)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The BOS token's text, if the tokenizer has one.
    pub fn bos(&self) -> Option<&str> {
        self.bos.as_deref()
    }

    /// The EOS token's text (`tokenizer.eos_token`), if the tokenizer has one.
    pub fn eos(&self) -> Option<&str> {
        self.eos.as_deref()
    }

    /// Every id that ends a generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Where the tokenizer was read from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The template variables transformers passes from its `special_tokens_map`.
    pub fn template_specials(&self) -> Vec<(&'static str, String)> {
        [
            ("bos_token", &self.bos),
            ("eos_token", &self.eos),
            ("unk_token", &self.unk),
            ("pad_token", &self.pad),
        ]
        .into_iter()
        .filter_map(|(name, t)| t.clone().map(|t| (name, t)))
        .collect()
    }

    /// `tokenizer_config.json` and `generation_config.json` naming the special tokens and
    /// the ids that end a generation, for a directory written beside a tokenizer.json.
    pub fn configs(&self) -> (Value, Value) {
        let tokenizer_config: serde_json::Map<String, Value> = self
            .template_specials()
            .into_iter()
            .map(|(name, text)| (name.to_string(), Value::from(text)))
            .collect();
        let generation_config = serde_json::json!({ "eos_token_id": self.eos_ids });
        (Value::Object(tokenizer_config), generation_config)
    }

    /// One more id past the largest the tokenizer can produce.
    pub fn id_count(&self) -> usize {
        self.tokenizer
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1)
    }

    /// Refuses a tokenizer that is not the model's: one with ids the model has no embedding
    /// for, or one that uses less of the embedding than padding explains. The embeddings are
    /// frozen, so no training can make another vocabulary's ids mean the right tokens.
    pub fn check_fits(&self, vocab_size: usize) -> Result<()> {
        let n = self.id_count();
        let fix = "use the model's own tokenizer (drop --tokenizer / model.tokenizer, or name one \
                   that matches the model)";
        if n > vocab_size {
            bail!(
                "the tokenizer has {n} tokens but the model's vocab_size is {vocab_size} ({}): {fix}",
                self.origin
            );
        }
        for (what, token) in [("BOS", &self.bos), ("EOS", &self.eos)] {
            let id = token.as_deref().and_then(|t| self.tokenizer.token_to_id(t));
            if let Some(id) = id.filter(|&id| id as usize >= vocab_size) {
                bail!(
                    "the tokenizer's {what} id {id} is past the model's vocab_size {vocab_size}: {fix}"
                );
            }
        }
        // Models pad their embedding to a round size (at most ~2 % of rows in practice); a
        // tokenizer leaving a tenth of it unused is another model's (LLaMA-2's 32000 on
        // SmolLM2's 49152).
        if n * 10 < vocab_size * 9 {
            bail!(
                "the tokenizer has {n} tokens but the model's vocab_size is {vocab_size} ({}): it \
                 is another model's tokenizer, whose ids name other tokens; {fix}",
                self.origin
            );
        }
        Ok(())
    }
}

/// A JSON file, or `None` when it does not exist.
fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    Ok(Some(v))
}

/// A special token's text: a string, or an AddedToken object's `content`.
fn token_text(file: &Option<Value>, name: &str) -> Result<Option<String>> {
    match file.as_ref().and_then(|v| v.get(name)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => bail!("an AddedToken object needs a \"content\" string"),
        },
        Some(other) => bail!("must be a string or an AddedToken object, found {other}"),
    }
}

/// The ids under `key`: one id or a list of them.
fn ids(file: &Option<Value>, key: &str) -> Vec<u32> {
    let as_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match file.as_ref().and_then(|v| v.get(key)) {
        Some(Value::Array(list)) => list.iter().filter_map(as_id).collect(),
        Some(v) => as_id(v).into_iter().collect(),
        None => Vec::new(),
    }
}

/// tokenizer_config.json's `chat_template`: a string, or a list of `{name, template}` of which
/// the one named "default" is used (as transformers does without tools).
fn template_of(config: &Value) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
            };
            match named("default") {
                Some(t) => Ok(Some(t.to_string())),
                None => {
                    let names: Vec<&str> = list
                        .iter()
                        .filter_map(|t| t.get("name").and_then(Value::as_str))
                        .collect();
                    bail!("a list of templates with none named \"default\" (names: {names:?})")
                }
            }
        }
        Some(other) => bail!("must be a string or a list of {{name, template}}, found {other}"),
    }
}

fn dedup(ids: Vec<u32>) -> Vec<u32> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if !out.contains(&id) {
            out.push(id);
        }
    }
    out
}
