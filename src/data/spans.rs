//! The loss mask of a conversation rendered as one text (chat formats `model` and `none`): the
//! byte ranges of the answers in the text, mapped to the tokens that overlap them by the
//! tokenizer's offsets — the mapping transformers (5.25) applies to a template's
//! `{% generation %}` ranges for `return_assistant_tokens_mask`.
//!
//! An answer is the assistant message's content through the first end-of-turn token after it:
//! the first special token the template writes after the content (`<|im_end|>`, `<|eot_id|>`,
//! `</s>`), nothing the template writes before it. Where the template has `{% generation %}`
//! blocks, their ranges are the answers, as in transformers; where it has none, each answer is
//! found by rendering prefixes: the conversation before the answer with the generation prompt
//! (where the answer starts), then through the answer (what the template wrote for it).

use std::ops::Range;

use anyhow::{anyhow, bail, Result};
use tokenizers::Tokenizer;

use crate::data::chat::{py_strip, Encoded, Message, Role, IGNORE_INDEX};
use crate::data::template::ChatTemplate;
use crate::tokenizer::ModelTokenizer;

/// The rendered conversation and the byte ranges of its answers.
/// `specials`: [`special_texts`] of the tokenizer.
pub fn template_answers(
    template: &ChatTemplate,
    specials: &[String],
    messages: &[Message],
) -> Result<(String, Vec<Range<usize>>)> {
    let full = template.render(messages, false)?;
    if template.has_generation_blocks() {
        return Ok((full.text, full.generation));
    }
    let mut answers = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != Role::Assistant {
            continue;
        }
        let before = template.render(&messages[..i], true)?.text;
        let through = template.render(&messages[..=i], false)?.text;
        if !through.starts_with(&before) || !full.text.starts_with(&through) {
            bail!(
                "the chat template renders messages[{i}] (an answer) so that the conversation \
                 before it, with the generation prompt, is not a prefix of the conversation \
                 through it, so the answer cannot be told apart; add {{% generation %}} blocks \
                 around the answers to the template, or use --chat-format tulu"
            );
        }
        answers.push(answer(&through, before.len(), &m.content, specials).span);
    }
    Ok((full.text, answers))
}

/// Format `none`: the contents one after another, `eos` after each answer.
pub fn plain_answers(messages: &[Message], eos: &str) -> (String, Vec<Range<usize>>) {
    let mut text = String::new();
    let mut answers = Vec::new();
    for m in messages {
        let start = text.len();
        text.push_str(&m.content);
        if m.role == Role::Assistant {
            text.push_str(eos);
            answers.push(start..text.len());
        }
    }
    (text, answers)
}

/// Tokenizes `text` (`specials`: with what the post-processor adds) and labels the tokens that
/// overlap an answer; right-truncated to `max_seq_len`. Also the untruncated length.
pub fn encode(
    tokenizer: &Tokenizer,
    text: &str,
    answers: &[Range<usize>],
    specials: bool,
    max_seq_len: usize,
) -> Result<(Encoded, usize)> {
    let enc = tokenizer
        .encode(text, specials)
        .map_err(|e| anyhow!("tokenizing: {e}"))?;
    let mut input_ids = enc.get_ids().to_vec();
    let mut labels = vec![IGNORE_INDEX; input_ids.len()];
    // Answers and token offsets are both in order: one pass, as transformers does.
    let mut a = 0;
    for (t, &(start, end)) in enc.get_offsets().iter().enumerate() {
        while a < answers.len() && start >= answers[a].end {
            a += 1;
        }
        if a == answers.len() {
            break;
        }
        if end > answers[a].start {
            labels[t] = i64::from(input_ids[t]);
        }
    }
    let full_len = input_ids.len();
    input_ids.truncate(max_seq_len);
    labels.truncate(max_seq_len);
    Ok((Encoded { input_ids, labels }, full_len))
}

/// The id of the token that ends the template's assistant turns, found on a probe
/// conversation; none if the template writes none, or refuses the probe (a template that
/// demands a system message: the EOS ids still end a generation).
pub fn end_of_turn(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    specials: &[String],
) -> Option<u32> {
    let probe = [
        Message {
            role: Role::User,
            content: "Hi".into(),
        },
        Message {
            role: Role::Assistant,
            content: "Hello".into(),
        },
    ];
    let before = template.render(&probe[..1], true).ok()?.text;
    let through = template.render(&probe, false).ok()?.text;
    if !through.starts_with(&before) {
        return None;
    }
    let found = answer(&through, before.len(), &probe[1].content, specials);
    found.terminator.and_then(|t| tokenizer.token_to_id(t))
}

struct Answer<'a> {
    span: Range<usize>,
    terminator: Option<&'a str>,
}

/// The answer `content` in `through` (a conversation rendered through it), after byte `from`
/// (the end of the generation prompt): the content as written (or stripped, for templates that
/// trim it), through the first special token after it; the content alone if none follows.
fn answer<'a>(through: &str, from: usize, content: &str, specials: &'a [String]) -> Answer<'a> {
    let rest = &through[from..];
    let (start, content_end) = [content, py_strip(content)]
        .into_iter()
        .find_map(|c| rest.find(c).map(|at| (from + at, from + at + c.len())))
        .unwrap_or((from, from));
    let first = specials
        .iter()
        .filter_map(|s| {
            through[content_end..]
                .find(s.as_str())
                .map(|at| (at, s.as_str()))
        })
        .min_by_key(|&(at, s)| (at, std::cmp::Reverse(s.len())));
    match first {
        Some((at, s)) => Answer {
            span: start..content_end + at + s.len(),
            terminator: Some(s),
        },
        None => Answer {
            span: start..content_end,
            terminator: None,
        },
    }
}

/// The texts of the tokenizer's special added tokens and its EOS: what can end a turn.
pub fn special_texts(tokenizer: &ModelTokenizer) -> Vec<String> {
    let decoder = tokenizer.tokenizer().get_added_tokens_decoder();
    let mut texts: Vec<String> = decoder
        .values()
        .filter(|t| t.special && !t.content.is_empty())
        .map(|t| t.content.clone())
        .collect();
    texts.extend(tokenizer.eos().map(String::from));
    texts.sort();
    texts.dedup();
    texts
}
