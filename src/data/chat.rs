//! Chat examples (`{"messages": [...]}`) → token ids and loss labels.
//!
//! Reproduces open-instruct's 2023 `encode_with_messages_format` (the encoder of the paper's
//! training code) exactly, including its quirks; see docs/methods.md §7 for the rules and
//! `tests/fixtures/chat-encoding/*.jsonl` for the golden cases.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokenizers::Tokenizer;

use crate::data::jsonl::{for_each_chunk, line_text};

/// Label of a position that is not trained on (PyTorch's `CrossEntropyLoss` default).
pub const IGNORE_INDEX: i64 = -100;

/// The EOS token as text. The reference appends `tokenizer.eos_token` to the *text*, and the
/// tokenizer then splits it out as a special token, so we do the same rather than pushing an id.
const EOS_TOKEN: &str = "</s>";
const SYSTEM_TAG: &str = "<|system|>\n";
const USER_TAG: &str = "<|user|>\n";
const ASSISTANT_TAG: &str = "<|assistant|>\n";

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
    fn new(messages: &[Message]) -> Self {
        let mut text = String::new();
        let mut ends = Vec::with_capacity(messages.len() + 1);
        ends.push(0);
        for m in messages {
            let content = py_strip(&m.content);
            match m.role {
                Role::System => text.extend([SYSTEM_TAG, content, "\n"]),
                Role::User => text.extend([USER_TAG, content, "\n"]),
                Role::Assistant => text.extend([ASSISTANT_TAG, content, EOS_TOKEN, "\n"]),
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

/// Encodes chat examples with a LLaMA-style tokenizer (BOS added by its post-processor,
/// `</s>` registered as a special added token).
pub struct ChatEncoder {
    tokenizer: Tokenizer,
    eos_id: u32,
}

impl ChatEncoder {
    /// Refuses a tokenizer with ids the model has no embedding for.
    pub fn check_fits(&self, vocab_size: usize) -> Result<()> {
        let n = self.tokenizer.get_vocab_size(true);
        if n > vocab_size {
            bail!(
                "the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}: use the \
                 model's own tokenizer (or --tokenizer / model.tokenizer naming a matching one)"
            );
        }
        Ok(())
    }

    /// Wraps `tokenizer`. Any truncation or padding configured on it is removed (truncation is
    /// done here, and padding belongs to batching). Errors if it has no `</s>` token or does not
    /// split `</s>` out of text as one token (the chat format relies on both).
    pub fn new(mut tokenizer: Tokenizer) -> Result<Self> {
        let eos_id = tokenizer.token_to_id(EOS_TOKEN).ok_or_else(|| {
            anyhow!("the tokenizer has no {EOS_TOKEN:?} token (a LLaMA tokenizer is needed)")
        })?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| anyhow!("clearing tokenizer truncation: {e}"))?;
        tokenizer.with_padding(None);
        // `</s>` must be an added special token: otherwise "…</s>" in the chat text would be
        // tokenised as the characters `<`, `/`, `s`, `>` and the examples would have no EOS.
        let probe = tokenizer
            .encode_fast(EOS_TOKEN, false)
            .map_err(|e| anyhow!("tokenizing {EOS_TOKEN:?}: {e}"))?;
        if probe.get_ids() != [eos_id] {
            bail!(
                "the tokenizer encodes the text {EOS_TOKEN:?} as {:?}, not as the single token {eos_id}; \
                 {EOS_TOKEN:?} must be registered as a special added token",
                probe.get_ids()
            );
        }
        Ok(ChatEncoder { tokenizer, eos_id })
    }

    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("loading tokenizer {}: {e}", path.display()))?;
        Self::new(tokenizer).with_context(|| format!("tokenizer {}", path.display()))
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The id of `</s>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Token ids of `text` with BOS (`tokenizer(text)` in the reference), untruncated.
    fn ids(&self, text: &str) -> Result<Vec<u32>> {
        // `encode_fast` skips char-offset bookkeeping; the ids are the same as `encode`'s.
        let enc = self
            .tokenizer
            .encode_fast(text, true)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token count of `text` with BOS, truncated to `max` (right truncation keeps BOS, so
    /// truncating to `max` tokens only caps the count).
    fn count(&self, text: &str, max: usize) -> Result<usize> {
        Ok(self.ids(text)?.len().min(max))
    }

    /// Encodes one example as the reference does: ids of the stripped chat text (BOS first,
    /// right-truncated to `max_seq_len`), labels = ids with every non-assistant message masked,
    /// span ends taken from separately tokenised message prefixes.
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
        let chat = ChatText::new(messages);

        let mut input_ids = self.ids(py_strip(&chat.text))?;
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

    /// The prompt for generation: the chat text of the messages followed by "<|assistant|>\n",
    /// tokenized with BOS (as open-instruct's generation prompt). Not truncated.
    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.ids(&self.prompt_text(messages)?)
    }

    /// The exact text [`Self::encode_prompt`] tokenizes: the chat, then the assistant's tag.
    pub fn prompt_text(&self, messages: &[Message]) -> Result<String> {
        let mut text = ChatText::new(messages).text;
        text.push_str(ASSISTANT_TAG);
        Ok(text)
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
