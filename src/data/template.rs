//! A model's own chat template (Jinja), rendered as transformers' `apply_chat_template` renders
//! it: `trim_blocks` and `lstrip_blocks` on, loop controls, Python's string methods, and the
//! globals transformers adds (`raise_exception`, `strftime_now`, a `tojson` that writes what
//! Python's `json.dumps` writes). The variables are `messages`, `add_generation_prompt`,
//! `tools` and `documents` (none), and the tokenizer's special tokens (`bos_token`, …).
//!
//! `{% generation %}…{% endgeneration %}` blocks are kept as transformers keeps them: the text
//! is rendered unchanged and the byte ranges of their bodies are returned.

use std::ops::Range;

use anyhow::{anyhow, bail, Result};
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

use crate::data::chat::Message;

const NAME: &str = "chat_template";
/// Noncharacters that mark where a generation block's body starts and ends in the rendered
/// text; they are removed from it and never occur in text a user means.
const OPEN: char = '\u{FDD0}';
const CLOSE: char = '\u{FDD1}';

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    has_generation: bool,
}

/// A rendered conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    /// Byte ranges of the text the template's `{% generation %}` blocks wrote, in order.
    pub generation: Vec<Range<usize>>,
}

impl ChatTemplate {
    /// Compiles `source`; `specials` are the tokenizer's special tokens by variable name
    /// (`bos_token`, `eos_token`, …), as transformers passes its `special_tokens_map`.
    pub fn new(source: &str, specials: &[(&str, String)]) -> Result<Self> {
        let (rewritten, has_generation) = rewrite_generation_blocks(source);
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        for (name, value) in specials {
            env.add_global(name.to_string(), Value::from(value.as_str()));
        }
        env.add_template_owned(NAME, rewritten)
            .map_err(|e| anyhow!("the chat template does not compile: {}", describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            has_generation,
        })
    }

    /// The template as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template marks the assistant's text with `{% generation %}` blocks.
    pub fn has_generation_blocks(&self) -> bool {
        self.has_generation
    }

    /// Renders `messages`, ending with the assistant's header when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Rendered> {
        if self.has_generation {
            if let Some(m) = messages.iter().find(|m| m.content.contains([OPEN, CLOSE])) {
                bail!(
                    "a {} message contains U+FDD0 or U+FDD1, which mark the template's generation \
                     blocks; remove them from the data",
                    m.role
                );
            }
        }
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                // A map in Python's dict order (preserve_order), for templates that iterate it.
                minijinja::context! { role => m.role.as_str(), content => m.content.as_str() }
            })
            .collect();
        let template = self.env.get_template(NAME).expect("added in new");
        let raw = template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                tools => Value::from(()),
                documents => Value::from(()),
            })
            .map_err(|e| anyhow!("rendering the chat template: {}", describe(&e)))?;
        if !self.has_generation {
            return Ok(Rendered {
                text: raw,
                generation: Vec::new(),
            });
        }
        let mut text = String::with_capacity(raw.len());
        let mut generation = Vec::new();
        let mut open = None;
        for c in raw.chars() {
            match c {
                OPEN => open = Some(text.len()),
                CLOSE => generation.push(open.take().expect("blocks nest as written")..text.len()),
                c => text.push(c),
            }
        }
        Ok(Rendered { text, generation })
    }
}

/// Replaces each `{% generation %}` / `{% endgeneration %}` tag by tags minijinja knows that
/// print a marker and keep the original whitespace control: `{%- generation -%}` becomes
/// `{%- if true %}OPEN{% if true -%}`, so what is trimmed before and after is what Jinja trims.
fn rewrite_generation_blocks(source: &str) -> (String, bool) {
    let tag = regex::Regex::new(r"\{%([-+]?)\s*(generation|endgeneration)\s*([-+]?)%\}")
        .expect("a valid regex");
    let mut found = false;
    let out = tag.replace_all(source, |c: &regex::Captures| {
        found = true;
        let (left, right) = (&c[1], &c[3]);
        if &c[2] == "generation" {
            format!("{{%{left} if true %}}{{{{ '{OPEN}' }}}}{{% if true {right}%}}")
        } else {
            format!("{{%{left} endif %}}{{{{ '{CLOSE}' }}}}{{% endif {right}%}}")
        }
    });
    (out.into_owned(), found)
}

/// minijinja's error with the template line it points at.
fn describe(e: &Error) -> String {
    match e.line() {
        Some(line) => format!("{e} (line {line})"),
        None => e.to_string(),
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `datetime.now().strftime(format)`, in UTC, for the directives chat templates use.
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?
        .as_secs() as i64;
    Ok(Value::from(strftime(&format, secs)?))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// `format` at `secs` after the Unix epoch (UTC).
fn strftime(format: &str, secs: i64) -> Result<String, Error> {
    let days = secs.div_euclid(86_400);
    let in_day = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][month as usize - 1];
    let yday = before + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let (hour, minute, second) = (in_day / 3600, in_day / 60 % 60, in_day % 60);
    let month_name = MONTHS[month as usize - 1];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let d = chars.next().unwrap_or('%');
        match d {
            'Y' => out.push_str(&year.to_string()),
            'y' => out.push_str(&format!("{:02}", year % 100)),
            'm' => out.push_str(&format!("{month:02}")),
            'd' => out.push_str(&format!("{day:02}")),
            'j' => out.push_str(&format!("{yday:03}")),
            'H' => out.push_str(&format!("{hour:02}")),
            'M' => out.push_str(&format!("{minute:02}")),
            'S' => out.push_str(&format!("{second:02}")),
            'B' => out.push_str(month_name),
            'b' => out.push_str(&month_name[..3]),
            'A' => out.push_str(DAYS[weekday]),
            'a' => out.push_str(&DAYS[weekday][..3]),
            '%' => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: %{other} is not supported"),
                ))
            }
        }
    }
    Ok(out)
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, the filter transformers installs (Jinja's own escapes HTML).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::Number => {
            Some(" ".repeat(usize::try_from(v).map_err(|_| bad("indent must be ≥ 0"))?))
        }
        Some(v) => Some(
            v.as_str()
                .ok_or_else(|| bad("indent must be a number or a string"))?
                .to_string(),
        ),
    };
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => return Err(bad("separators must be two strings")),
        // Python's defaults: no space at line ends when indenting.
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let json = Json {
        indent,
        item,
        key,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    json.write(value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn bad(what: &str) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("tojson: {what}"))
}

struct Json {
    indent: Option<String>,
    item: String,
    key: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl Json {
    fn write(&self, v: &Value, depth: usize, out: &mut String) -> Result<(), Error> {
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&v.to_string()),
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container(out, depth, '[', ']', &items, |item, out| {
                    self.write(item, depth + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.container(out, depth, '{', '}', &keys, |k, out| {
                    self.string(&k.to_string(), out);
                    out.push_str(&self.key);
                    self.write(&v.get_item(k)?, depth + 1, out)
                })?;
            }
            kind => return Err(bad(&format!("cannot serialize a value of kind {kind}"))),
        }
        Ok(())
    }

    fn container<T>(
        &self,
        out: &mut String,
        depth: usize,
        open: char,
        close: char,
        items: &[T],
        mut each: impl FnMut(&T, &mut String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        let newline = |out: &mut String, level: usize| {
            if let Some(unit) = &self.indent {
                out.push('\n');
                out.push_str(&unit.repeat(level));
            }
        };
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item);
            }
            newline(out, depth + 1);
            each(item, out)?;
        }
        newline(out, depth);
        out.push(close);
        Ok(())
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_matches_known_dates() {
        // 2024-07-26 13:05:09 UTC was a Friday, day 208 of a leap year.
        let t = 1_722_000_309;
        assert_eq!(
            strftime("%d %b %Y|%B %A %a|%y-%m %H:%M:%S %j %%", t).unwrap(),
            "26 Jul 2024|July Friday Fri|24-07 13:25:09 208 %"
        );
        assert_eq!(strftime("%Y-%m-%d", 0).unwrap(), "1970-01-01");
        assert_eq!(
            strftime("%Y-%m-%d %a", 951_782_400).unwrap(),
            "2000-02-29 Tue"
        );
        assert!(strftime("%Q", 0).is_err());
    }
}
