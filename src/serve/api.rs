//! The OpenAI API's request bodies and answers: what `/v1/completions` and
//! `/v1/chat/completions` accept (each key checked for its type and range, options this server
//! does not implement refused rather than ignored), their answers and stream chunks, and errors
//! in OpenAI's shape.

use crate::data::chat::{Message, Role};
use serde_json::{json, Map, Value};

/// An error as OpenAI answers it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param),
            ..Self::new(400, message)
        }
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> String {
        let kind = match self.status {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param,
            "code": self.code}})
        .to_string()
    }
}

/// What the model is asked: raw text (completions) or a chat.
#[derive(Debug)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Chat(Vec<Message>),
}

/// A completion request, checked.
#[derive(Debug)]
pub struct Params {
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    /// vLLM's extra parameter: generate past the end-of-sequence ids, to `max_tokens`.
    pub ignore_eos: bool,
}

/// Parses the body of `/v1/completions` (`chat` false) or `/v1/chat/completions`.
pub fn parse(body: &[u8], chat: bool) -> Result<Params, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, format!("the body is not valid JSON: {e}")))?;
    let Value::Object(o) = value else {
        return Err(ApiError::new(400, "the body must be a JSON object"));
    };
    refuse_unsupported(&o)?;
    let model = match o.get("model") {
        Some(Value::String(s)) => s.clone(),
        None => return Err(ApiError::invalid("model", "\"model\" is required")),
        Some(_) => return Err(ApiError::invalid("model", "\"model\" must be a string")),
    };
    let prompt = if chat {
        Prompt::Chat(messages(o.get("messages"))?)
    } else {
        prompt(o.get("prompt"))?
    };
    let max_tokens = match (o.get("max_tokens"), o.get("max_completion_tokens")) {
        (Some(v), _) if !v.is_null() => Some(count(v, "max_tokens")?),
        (_, Some(v)) if !v.is_null() => Some(count(v, "max_completion_tokens")?),
        _ => None,
    };
    let temperature = number(&o, "temperature", 1.0)?;
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature = {temperature} must be in [0, 2]"),
        ));
    }
    let top_p = number(&o, "top_p", 1.0)?;
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p = {top_p} must be in (0, 1]"),
        ));
    }
    let seed = match o.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => match (v.as_u64(), v.as_i64()) {
            (Some(s), _) => Some(s),
            (None, Some(s)) => Some(s as u64),
            _ => return Err(ApiError::invalid("seed", "\"seed\" must be an integer")),
        },
    };
    let stop = match o.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 16 && a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|s| s.as_str().map(String::from))
            .collect(),
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "\"stop\" must be a string or a list of at most 16 strings",
            ))
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "a stop sequence is empty"));
    }
    let stream = match o.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(
                "stream",
                "\"stream\" must be true or false",
            ))
        }
    };
    let ignore_eos = match o.get("ignore_eos") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(
                "ignore_eos",
                "\"ignore_eos\" must be true or false",
            ))
        }
    };
    Ok(Params {
        model,
        prompt,
        max_tokens,
        temperature,
        top_p,
        seed,
        stop,
        stream,
        ignore_eos,
    })
}

/// An option, whether a value of it is its default, and why another is refused.
type Check<'a> = (&'static str, &'a dyn Fn(&Value) -> bool, &'static str);

/// Options that would change the answer and that this server does not implement: refused
/// unless they hold their default.
fn refuse_unsupported(o: &Map<String, Value>) -> Result<(), ApiError> {
    let default_ok = |key: &str, ok: &dyn Fn(&Value) -> bool| match o.get(key) {
        None | Some(Value::Null) => true,
        Some(v) => ok(v),
    };
    let one = |v: &Value| v.as_u64() == Some(1);
    let zero = |v: &Value| v.as_f64() == Some(0.0);
    let falsy = |v: &Value| v == &Value::Bool(false);
    let empty = |v: &Value| {
        v.as_object().is_some_and(Map::is_empty) || v.as_array().is_some_and(Vec::is_empty)
    };
    let text_format = |v: &Value| v.get("type").and_then(Value::as_str) == Some("text");
    let checks: [Check; 10] = [
        ("n", &one, "only n = 1 is supported"),
        ("best_of", &one, "only best_of = 1 is supported"),
        ("echo", &falsy, "echo is not supported"),
        ("logprobs", &falsy, "logprobs are not supported"),
        ("top_logprobs", &zero, "logprobs are not supported"),
        (
            "presence_penalty",
            &zero,
            "presence_penalty is not supported (0 only)",
        ),
        (
            "frequency_penalty",
            &zero,
            "frequency_penalty is not supported (0 only)",
        ),
        ("logit_bias", &empty, "logit_bias is not supported"),
        ("tools", &empty, "tools are not supported"),
        (
            "response_format",
            &text_format,
            "only the text response_format is supported",
        ),
    ];
    for (key, ok, why) in checks {
        if !default_ok(key, ok) {
            return Err(ApiError::invalid(key, why));
        }
    }
    if o.get("suffix").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid("suffix", "suffix is not supported"));
    }
    Ok(())
}

fn count(v: &Value, key: &'static str) -> Result<usize, ApiError> {
    match v.as_u64() {
        Some(n) if n >= 1 => Ok(n as usize),
        _ => Err(ApiError::invalid(
            key,
            format!("\"{key}\" must be an integer ≥ 1, got {v}"),
        )),
    }
}

fn number(o: &Map<String, Value>, key: &'static str, default: f64) -> Result<f64, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .ok_or_else(|| ApiError::invalid(key, format!("\"{key}\" must be a number, got {v}"))),
    }
}

fn prompt(v: Option<&Value>) -> Result<Prompt, ApiError> {
    let ids = |a: &[Value]| -> Option<Vec<u32>> {
        a.iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    match v {
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(Prompt::Text(a[0].as_str().unwrap_or_default().to_string()))
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_number) => ids(a)
            .map(Prompt::Ids)
            .ok_or_else(|| ApiError::invalid("prompt", "token ids must be integers ≥ 0")),
        Some(Value::Array(a)) if a.len() > 1 => Err(ApiError::invalid(
            "prompt",
            "one prompt per request (a list of several is not supported)",
        )),
        None => Err(ApiError::invalid("prompt", "\"prompt\" is required")),
        Some(_) => Err(ApiError::invalid(
            "prompt",
            "\"prompt\" must be a string or a list of token ids",
        )),
    }
}

fn messages(v: Option<&Value>) -> Result<Vec<Message>, ApiError> {
    let Some(Value::Array(list)) = v else {
        return Err(ApiError::invalid(
            "messages",
            "\"messages\" must be a list of {role, content}",
        ));
    };
    if list.is_empty() {
        return Err(ApiError::invalid("messages", "\"messages\" is empty"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.get("role").and_then(Value::as_str) {
                Some("system" | "developer") => Role::System,
                Some("user") => Role::User,
                Some("assistant") => Role::Assistant,
                Some(other) => {
                    return Err(ApiError::invalid(
                        "messages",
                        format!(
                        "messages[{i}]: role {other:?} is not supported (system, user, assistant)"
                    ),
                    ))
                }
                None => {
                    return Err(ApiError::invalid(
                        "messages",
                        format!("messages[{i}] has no \"role\""),
                    ))
                }
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                // The list form: its text parts, joined.
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| {
                        match (
                            p.get("type").and_then(Value::as_str),
                            p.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => Ok(t),
                            _ => Err(ApiError::invalid(
                                "messages",
                                format!("messages[{i}]: only text content parts are supported"),
                            )),
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
                _ => {
                    return Err(ApiError::invalid(
                        "messages",
                        format!("messages[{i}] has no text \"content\""),
                    ))
                }
            };
            Ok(Message { role, content })
        })
        .collect()
}

/// `finish_reason`: "stop" at the end-of-sequence token or a stop sequence, else "length".
pub fn finish_reason(stopped: bool) -> &'static str {
    if stopped {
        "stop"
    } else {
        "length"
    }
}

/// What every answer ends with.
pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion})
}

/// Identifies one answer: its id, creation time and model.
pub struct Answer<'a> {
    pub id: String,
    pub created: u64,
    pub model: &'a str,
    pub chat: bool,
}

impl Answer<'_> {
    /// The whole answer.
    pub fn complete(&self, text: &str, finish: &str, usage: Value) -> Value {
        let choice = if self.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
        };
        let object = if self.chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": usage})
    }

    /// A stream chunk: `text` (for chat, the delta's role on the first chunk), and on the
    /// last one the finish reason and the usage.
    pub fn chunk(&self, text: &str, first: bool, finish: Option<(&str, Value)>) -> Value {
        let last = finish.is_some();
        let (reason, usage) = match finish {
            Some((r, u)) => (json!(r), u),
            None => (Value::Null, Value::Null),
        };
        let choice = if self.chat {
            let delta = if first {
                json!({"role": "assistant", "content": text})
            } else if last && text.is_empty() {
                json!({})
            } else {
                json!({"content": text})
            };
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason})
        };
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut chunk = json!({"id": self.id, "object": object, "created": self.created,
            "model": self.model, "choices": [choice]});
        if !usage.is_null() {
            chunk["usage"] = usage;
        }
        chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_each_key_and_names_it() {
        let p = parse(
            br#"{"model": "m", "prompt": "hi", "stop": ["a", "b"], "seed": 3, "max_tokens": 5}"#,
            false,
        )
        .unwrap();
        assert_eq!(
            (p.model.as_str(), p.max_tokens, p.seed),
            ("m", Some(5), Some(3))
        );
        assert_eq!(p.stop, ["a", "b"]);
        assert!((p.temperature - 1.0).abs() < 1e-12);
        assert!(!p.ignore_eos);
        let p = parse(
            br#"{"model": "m", "prompt": "x", "ignore_eos": true}"#,
            false,
        )
        .unwrap();
        assert!(p.ignore_eos);
        let param = |body: &str, chat| parse(body.as_bytes(), chat).unwrap_err().param;
        assert_eq!(
            param(r#"{"model": "m", "prompt": "x", "ignore_eos": 1}"#, false),
            Some("ignore_eos")
        );
        assert_eq!(
            param(r#"{"model": "m", "prompt": "x", "n": 2}"#, false),
            Some("n")
        );
        assert_eq!(
            param(r#"{"model": 1, "prompt": "x"}"#, false),
            Some("model")
        );
        assert_eq!(
            param(r#"{"model": "m", "prompt": "x", "max_tokens": "5"}"#, false),
            Some("max_tokens")
        );
        assert_eq!(
            param(r#"{"model": "m", "prompt": "x", "temperature": 3}"#, false),
            Some("temperature")
        );
        assert_eq!(
            param(r#"{"model": "m", "prompt": "x", "stop": [""]}"#, false),
            Some("stop")
        );
        assert_eq!(
            param(r#"{"model": "m", "messages": []}"#, true),
            Some("messages")
        );
        assert_eq!(
            param(
                r#"{"model": "m", "messages": [{"role": "tool", "content": "x"}]}"#,
                true
            ),
            Some("messages")
        );
        assert_eq!(parse(b"{", false).unwrap_err().status, 400);
        let chat = parse(br#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "n": 1, "logprobs": false}"#, true).unwrap();
        match chat.prompt {
            Prompt::Chat(m) => assert_eq!(m[0].content, "ab"),
            other => panic!("{other:?}"),
        }
    }
}
