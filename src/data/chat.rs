//! Chat examples (`{"messages": [...]}`) → token ids and loss labels, in one of three formats.
//!
//! `tulu` reproduces open-instruct's 2023 `encode_with_messages_format` (the encoder of the
//! paper's training code) exactly, including its quirks, with the tokenizer's own EOS; see
//! docs/methods.md §7 and `tests/fixtures/chat-encoding/*.jsonl`. `model` renders the model's
//! chat template as transformers does and `none` uses the plain texts; both take the loss on the
//! answers as `spans.rs` finds them (docs/methods.md §7a, `tests/fixtures/chat-template/`).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokenizers::Tokenizer;

use crate::data::jsonl::{for_each_chunk, line_text};
use crate::data::spans;
use crate::data::template::ChatTemplate;
use crate::tokenizer::ModelTokenizer;

/// Label of a position that is not trained on (PyTorch's `CrossEntropyLoss` default).
pub const IGNORE_INDEX: i64 = -100;

const SYSTEM_TAG: &str = "<|system|>\n";
const USER_TAG: &str = "<|user|>\n";
const ASSISTANT_TAG: &str = "<|assistant|>\n";

crate::choice::named_enum! {
/// How a conversation becomes text (`--chat-format`, `data.chat_format`).
pub enum ChatFormat {
    /// open-instruct's tulu format, the paper's: `<|user|>\n…` turns, the EOS after each answer.
    Tulu = "tulu",
    /// The model's own chat template (chat_template.jinja, tokenizer_config.json or the GGUF).
    Model = "model",
    /// No template, for a base model: the messages' texts one after another, the EOS after
    /// each answer.
    None = "none",
}
}
/// Who speaks a message. Serialized as `"system"`, `"user"` or `"assistant"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The roles in the order used in error messages.
    pub const ALL: [Role; 3] = [Role::System, Role::User, Role::Assistant];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// Parses a role name; the error names the bad role and the allowed ones.
    pub fn parse(s: &str) -> Result<Role> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| anyhow!("unknown role {s:?} (allowed: {})", allowed_roles()))
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn allowed_roles() -> String {
    Role::ALL.map(Role::as_str).join(", ")
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// One training example. Deserializes from `{"messages": [...]}`; other top-level keys
/// (`id`, `dataset`, …) are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub messages: Vec<Message>,
}

/// An encoded example: `labels[i]` is `input_ids[i]` where the loss is taken, else [`IGNORE_INDEX`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Encoded {
    /// Number of positions that are trained on.
    pub fn num_trained(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Python's `str.strip()`: strips what `str.isspace()` calls whitespace, which is Rust's
/// `char::is_whitespace` plus the ASCII separators U+001C..=U+001F.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// The reference's `_concat_messages`, with the byte offset where each message's text ends,
/// so every message prefix is a slice of one string.
struct ChatText {
    text: String,
    /// `ends[k]` = length of the concatenation of messages `0..k` (`ends[0] == 0`).
    ends: Vec<usize>,
}

impl ChatText {
    /// `eos` is the tokenizer's EOS text, which the reference appends after each answer.
    fn new(messages: &[Message], eos: &str) -> Self {
        let mut text = String::new();
        let mut ends = Vec::with_capacity(messages.len() + 1);
        ends.push(0);
        for m in messages {
            let content = py_strip(&m.content);
            match m.role {
                Role::System => text.extend([SYSTEM_TAG, content, "\n"]),
                Role::User => text.extend([USER_TAG, content, "\n"]),
                Role::Assistant => text.extend([ASSISTANT_TAG, content, eos, "\n"]),
            }
            ends.push(text.len());
        }
        ChatText { text, ends }
    }

    /// Messages `0..k`.
    fn prefix(&self, k: usize) -> &str {
        &self.text[..self.ends[k]]
    }
}

/// Encodes chat examples in one [`ChatFormat`] with a model's tokenizer.
pub struct ChatEncoder {
    tokenizer: ModelTokenizer,
    format: ChatFormat,
    /// The compiled template (format `model`).
    template: Option<ChatTemplate>,
    /// The ids that end an answer in generation: every EOS id, and the template's end-of-turn.
    stop_ids: Vec<u32>,
    /// The texts that can end a turn (format `model`).
    specials: Vec<String>,
}

impl ChatEncoder {
    /// The encoder of `format`. `tulu` and `none` need the tokenizer's EOS token, split out of
    /// text as one token; `model` needs a chat template.
    pub fn new(tokenizer: ModelTokenizer, format: ChatFormat) -> Result<Self> {
        let origin = tokenizer.origin().to_string();
        let mut stop_ids = tokenizer.eos_ids().to_vec();
        let specials = spans::special_texts(&tokenizer);
        let template = match format {
            ChatFormat::Model => {
                let source = tokenizer.chat_template().ok_or_else(|| {
                    anyhow!(
                        "{origin}: the model has no chat template (no chat_template.jinja, no \
                         chat_template in tokenizer_config.json or the GGUF); use --chat-format \
                         tulu or none (data.chat_format)"
                    )
                })?;
                let template = ChatTemplate::new(source, &tokenizer.template_specials())
                    .with_context(|| origin.clone())?;
                if let Some(id) = spans::end_of_turn(&template, tokenizer.tokenizer(), &specials) {
                    if !stop_ids.contains(&id) {
                        stop_ids.push(id);
                    }
                }
                Some(template)
            }
            ChatFormat::Tulu | ChatFormat::None => {
                let eos = tokenizer.eos().ok_or_else(|| {
                    anyhow!(
                        "{origin}: the tokenizer has no EOS token, which --chat-format {format} \
                         appends to each answer; put the model's tokenizer_config.json (with \
                         eos_token) beside its tokenizer.json"
                    )
                })?;
                // It must be split out of text as one token: otherwise "…<eos>" in the chat
                // text would be tokenized as its characters and the examples would have no EOS.
                let probe = tokenizer
                    .tokenizer()
                    .encode_fast(eos, false)
                    .map_err(|e| anyhow!("tokenizing {eos:?}: {e}"))?;
                let id = tokenizer.tokenizer().token_to_id(eos);
                if id.is_none() || probe.get_ids() != id.as_slice() {
                    bail!(
                        "{origin}: the tokenizer encodes its EOS text {eos:?} as {:?}, not as one \
                         token; it must be registered as a special added token",
                        probe.get_ids()
                    );
                }
                None
            }
        };
        Ok(ChatEncoder {
            tokenizer,
            format,
            template,
            stop_ids,
            specials,
        })
    }

    /// Refuses a tokenizer that is not the model's (see [`ModelTokenizer::check_fits`]).
    pub fn check_fits(&self, vocab_size: usize) -> Result<()> {
        self.tokenizer.check_fits(vocab_size)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        self.tokenizer.tokenizer()
    }

    pub fn model_tokenizer(&self) -> &ModelTokenizer {
        &self.tokenizer
    }

    pub fn format(&self) -> ChatFormat {
        self.format
    }

    /// The ids that end a generated answer: every EOS id of the model, and with the model's
    /// template the token that ends its turns.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// What the encoding depends on besides the tokenizer.json, for cache keys.
    pub fn identity(&self) -> String {
        format!(
            "format {}\neos {:?}\ntemplate {:?}\n",
            self.format,
            self.tokenizer.eos(),
            self.template.as_ref().map(ChatTemplate::source)
        )
    }

    /// The EOS text (present for tulu and none, checked in `new`).
    fn eos(&self) -> &str {
        self.tokenizer.eos().expect("checked in new")
    }

    fn template(&self) -> &ChatTemplate {
        self.template.as_ref().expect("format model has a template")
    }

    /// Token ids of `text`; `specials`: with what the tokenizer's post-processor adds (BOS for
    /// a LLaMA tokenizer), as `tokenizer(text)` does in the reference.
    pub fn ids(&self, text: &str, specials: bool) -> Result<Vec<u32>> {
        // `encode_fast` skips char-offset bookkeeping; the ids are the same as `encode`'s.
        let enc = self
            .tokenizer()
            .encode_fast(text, specials)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token count of `text` with BOS, truncated to `max` (right truncation keeps BOS, so
    /// truncating to `max` tokens only caps the count).
    fn count(&self, text: &str, max: usize) -> Result<usize> {
        Ok(self.ids(text, true)?.len().min(max))
    }

    /// Encodes one example (see [`ChatFormat`]), right-truncated to `max_seq_len`; labels are
    /// the ids where the loss is taken, else [`IGNORE_INDEX`].
    pub fn encode(&self, example: &Example, max_seq_len: usize) -> Result<Encoded> {
        Ok(self.encode_with_length(example, max_seq_len)?.0)
    }

    /// [`Self::encode`], and the untruncated token count (to count truncated examples).
    pub fn encode_with_length(
        &self,
        example: &Example,
        max_seq_len: usize,
    ) -> Result<(Encoded, usize)> {
        let messages = &example.messages;
        if max_seq_len == 0 {
            bail!("max_seq_len must be at least 1");
        }
        // The reference would return a lone BOS labelled as a target; that is never intended.
        if messages.is_empty() {
            bail!("the example has no messages");
        }
        check_order(messages).map_err(|e| anyhow!(e))?;
        match self.format {
            ChatFormat::Tulu => self.encode_tulu(messages, max_seq_len),
            ChatFormat::Model => {
                let (text, answers) =
                    spans::template_answers(self.template(), &self.specials, messages)?;
                spans::encode(self.tokenizer(), &text, &answers, false, max_seq_len)
            }
            ChatFormat::None => {
                let (text, answers) = spans::plain_answers(messages, self.eos());
                spans::encode(self.tokenizer(), &text, &answers, true, max_seq_len)
            }
        }
    }

    /// open-instruct's encoding: ids of the stripped chat text (BOS first, right-truncated to
    /// `max_seq_len`), labels = ids with every non-assistant message masked, span ends taken
    /// from separately tokenised message prefixes.
    fn encode_tulu(&self, messages: &[Message], max_seq_len: usize) -> Result<(Encoded, usize)> {
        let chat = ChatText::new(messages, self.eos());

        let mut input_ids = self.ids(py_strip(&chat.text), true)?;
        let full_len = input_ids.len();
        input_ids.truncate(max_seq_len);
        let mut labels: Vec<i64> = input_ids.iter().map(|&id| i64::from(id)).collect();
        let n = input_ids.len();

        // Token counts of the prefixes `messages[..k]`, computed at most once each: the end of
        // one non-assistant message is the start of the next when no assistant lies between.
        let mut prefix_counts: Vec<Option<usize>> = vec![None; messages.len() + 1];
        let mut prefix_count = |k: usize| -> Result<usize> {
            if let Some(c) = prefix_counts[k] {
                return Ok(c);
            }
            let c = self.count(chat.prefix(k), max_seq_len)?;
            prefix_counts[k] = Some(c);
            Ok(c)
        };

        for (i, message) in messages.iter().enumerate() {
            if message.role == Role::Assistant {
                continue;
            }
            let start = if i == 0 { 0 } else { prefix_count(i)? };
            let end = if messages
                .get(i + 1)
                .is_some_and(|m| m.role == Role::Assistant)
            {
                // Messages 0..=i plus "<|assistant|>\n", which is how message i+1's text begins.
                let upto = chat.ends[i + 1] + ASSISTANT_TAG.len();
                debug_assert!(chat.text[chat.ends[i + 1]..].starts_with(ASSISTANT_TAG));
                self.count(&chat.text[..upto], max_seq_len)?
            } else {
                prefix_count(i + 1)?
            };
            // PyTorch slicing clamps to the length and is empty when start >= end.
            let (s, e) = (start.min(n), end.min(n));
            if s < e {
                labels[s..e].fill(IGNORE_INDEX);
            }
            if end >= max_seq_len {
                break;
            }
        }
        Ok((Encoded { input_ids, labels }, full_len))
    }

    /// The prompt for generation, tokenized: the conversation and the assistant's header (tulu:
    /// "<|assistant|>\n" with BOS, as open-instruct's generation prompt; model: the template's
    /// `add_generation_prompt`, tokenized as `apply_chat_template(tokenize=True)`, which adds no
    /// specials; none: the texts with the tokenizer's specials). Not truncated.
    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.prompt_text(messages)?;
        self.prompt_ids(&text)
    }

    /// The ids of a prompt text of this format (one [`Self::prompt_text`] or
    /// [`Self::wrap_user`] made): the template's text holds its specials itself.
    pub fn prompt_ids(&self, text: &str) -> Result<Vec<u32>> {
        self.ids(text, self.format != ChatFormat::Model)
    }

    /// The exact text [`Self::encode_prompt`] tokenizes.
    pub fn prompt_text(&self, messages: &[Message]) -> Result<String> {
        Ok(match self.format {
            ChatFormat::Tulu => {
                let mut text = ChatText::new(messages, self.eos()).text;
                text.push_str(ASSISTANT_TAG);
                text
            }
            ChatFormat::Model => self.template().render(messages, true)?.text,
            ChatFormat::None => spans::plain_answers(messages, self.eos()).0,
        })
    }

    /// One user message as a prompt, followed by `answer_prefix` (the reference appends it with
    /// no space, the tulu text ending in a newline): what the benchmarks ask.
    pub fn wrap_user(&self, user: &str, answer_prefix: &str) -> Result<String> {
        Ok(match self.format {
            ChatFormat::Tulu => format!("<|user|>\n{user}\n{ASSISTANT_TAG}{answer_prefix}"),
            ChatFormat::Model => {
                let user = Message {
                    role: Role::User,
                    content: user.to_string(),
                };
                self.template().render(&[user], true)?.text + answer_prefix
            }
            ChatFormat::None => user.to_string(),
        })
    }
}

/// Reads a `{"messages": …}` jsonl file. Blank lines are skipped. Any bad line (not JSON, no
/// "messages", a message without role/content, an unknown role, empty messages list, not UTF-8)
/// gives an error `"{path}:{line}: {what is wrong}"` (one line, says the fix where possible).
/// For training-size files use the streaming loader (`data::dataset::load`).
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let mut examples = Vec::new();
    for_each_chunk(path, 1024, |chunk| {
        for (lineno, raw) in chunk {
            let parsed = line_text(lineno, &raw)
                .and_then(|t| t.map(parse_line).transpose())
                .map_err(|what| anyhow!("{}:{lineno}: {what}", path.display()))?;
            examples.extend(parsed);
        }
        Ok(())
    })?;
    Ok(examples)
}

/// The one role order the template cannot express: an assistant turn that does not follow a
/// user or system turn (first, or right after another assistant turn). The reference masks
/// `<|assistant|>\n` only as the end of the preceding non-assistant span, so that tag would be
/// trained on.
fn check_order(messages: &[Message]) -> std::result::Result<(), String> {
    for (j, m) in messages.iter().enumerate() {
        let after_assistant = j == 0 || messages[j - 1].role == Role::Assistant;
        if m.role == Role::Assistant && after_assistant {
            let place = if j == 0 {
                "comes first"
            } else {
                "follows another assistant turn"
            };
            return Err(format!(
                "messages[{j}] is an assistant turn that {place}: the chat template would train on \
                 its <|assistant|> tag; put a user turn before it (or merge consecutive answers)"
            ));
        }
    }
    Ok(())
}

/// Validates one jsonl line by hand so that errors say what is wrong and where.
pub fn parse_line(line: &str) -> std::result::Result<Example, String> {
    const SHAPE: &str = r#"{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}"#;
    let value: Value = serde_json::from_str(line).map_err(|e| {
        format!("not valid JSON ({e}); each line must be one JSON object like {SHAPE}")
    })?;
    let Value::Object(mut obj) = value else {
        return Err(format!(
            "expected a JSON object like {SHAPE}, found {}",
            kind(&value)
        ));
    };
    let Some(messages) = obj.remove("messages") else {
        let keys: Vec<String> = obj.keys().take(8).map(|k| format!("{k:?}")).collect();
        return Err(format!(
            "no \"messages\" key (keys: {}); convert the data to the chat format {SHAPE} first",
            if keys.is_empty() {
                "none".to_string()
            } else {
                keys.join(", ")
            }
        ));
    };
    let Value::Array(messages) = messages else {
        return Err(format!(
            "\"messages\" must be a list, found {}",
            kind(&messages)
        ));
    };
    if messages.is_empty() {
        return Err("\"messages\" is empty; an example needs at least one message".to_string());
    }
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(j, m)| parse_message(j, m))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    check_order(&messages)?;
    Ok(Example { messages })
}

fn parse_message(j: usize, m: Value) -> std::result::Result<Message, String> {
    let Value::Object(mut m) = m else {
        return Err(format!(
            "messages[{j}] must be an object with \"role\" and \"content\", found {}",
            kind(&m)
        ));
    };
    let role = match take_string(&mut m, "role") {
        Ok(r) => Role::parse(&r).map_err(|e| format!("messages[{j}]: {e}"))?,
        Err(None) => {
            return Err(format!(
                "messages[{j}] has no \"role\" (allowed: {})",
                allowed_roles()
            ))
        }
        Err(Some(k)) => return Err(format!("messages[{j}].role must be a string, found {k}")),
    };
    let content = match take_string(&mut m, "content") {
        Ok(c) => c,
        Err(None) => return Err(format!("messages[{j}] ({role}) has no \"content\"")),
        Err(Some(k)) => return Err(format!("messages[{j}].content must be a string, found {k}")),
    };
    Ok(Message { role, content })
}

/// The string at `key`; `Err(None)` if absent, `Err(Some(kind))` if not a string.
fn take_string(
    obj: &mut Map<String, Value>,
    key: &str,
) -> std::result::Result<String, Option<&'static str>> {
    match obj.remove(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(Some(kind(&other))),
        None => Err(None),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Encodes every example; drops the ones whose labels are all -100 (returns how many were
/// dropped, as the reference training pipeline drops them).
pub fn encode_all(
    enc: &ChatEncoder,
    examples: &[Example],
    max_seq_len: usize,
) -> Result<(Vec<Encoded>, usize)> {
    let mut kept = Vec::with_capacity(examples.len());
    let mut dropped = 0;
    for (i, example) in examples.iter().enumerate() {
        let e = enc
            .encode(example, max_seq_len)
            .with_context(|| format!("example {i}"))?;
        if e.labels.iter().all(|&l| l == IGNORE_INDEX) {
            dropped += 1;
        } else {
            kept.push(e);
        }
    }
    Ok((kept, dropped))
}
