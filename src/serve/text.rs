//! A completion's text as its tokens arrive: each token decoded in the context of the few
//! before it (so a leading space or a character split over byte tokens comes out right; the
//! incremental decoding of text-generation-inference and vLLM), cut before the first stop
//! sequence, and what may still become a stop sequence held back from the stream.

use anyhow::Result;
use tokenizers::Tokenizer;

/// Prompt tokens kept as the first token's context.
const CONTEXT: usize = 6;

pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    /// The prompt's last tokens, then the generated ones.
    ids: Vec<u32>,
    /// `ids[prefix..read]` is the decoded context of the next token; `ids[read..]` the tokens
    /// not yet turned into text (the bytes of an unfinished character).
    prefix: usize,
    read: usize,
    text: String,
    /// Bytes of `text` handed out.
    sent: usize,
    stops: Vec<String>,
    stopped: Option<String>,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t Tokenizer, prompt: &[u32], stops: Vec<String>) -> Self {
        let ids = prompt[prompt.len().saturating_sub(CONTEXT)..].to_vec();
        let read = ids.len();
        TextStream {
            tokenizer,
            ids,
            prefix: 0,
            read,
            text: String::new(),
            sent: 0,
            stops,
            stopped: None,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("cannot decode the generated tokens: {e}"))
    }

    /// Adds a generated token; returns the stop sequence it completed, if any (the text then
    /// ends before it, and later tokens are ignored).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        if self.stopped.is_some() {
            return Ok(self.stopped.clone());
        }
        self.ids.push(id);
        let before = self.decode(&self.ids[self.prefix..self.read])?;
        let now = self.decode(&self.ids[self.prefix..])?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let Some(new) = now.get(before.len()..) else {
            return Ok(None);
        };
        let searched_from = self.text.len();
        self.text.push_str(new);
        (self.prefix, self.read) = (self.read, self.ids.len());
        Ok(self.find_stop(searched_from))
    }

    /// Cuts the text before the earliest stop sequence that ends after byte `from`.
    fn find_stop(&mut self, from: usize) -> Option<String> {
        let longest = self.stops.iter().map(String::len).max()?;
        let mut start = from.saturating_sub(longest);
        while !self.text.is_char_boundary(start) {
            start -= 1;
        }
        let (at, stop) = self
            .stops
            .iter()
            .filter_map(|s| {
                self.text[start..]
                    .find(s.as_str())
                    .map(|at| (start + at, s))
            })
            .min_by_key(|(at, _)| *at)?;
        let stop = stop.clone();
        self.text.truncate(at);
        self.sent = self.sent.min(at);
        self.stopped = Some(stop.clone());
        Some(stop)
    }

    /// The text not handed out yet that no later token can take back: all of it once
    /// stopped, else all but a tail that could be the start of a stop sequence.
    pub fn take_ready(&mut self) -> String {
        let mut end = self.text.len();
        if self.stopped.is_none() {
            let hold = self
                .stops
                .iter()
                .flat_map(|s| {
                    (1..s.len())
                        .filter(move |&k| s.is_char_boundary(k))
                        .map(move |k| &s[..k])
                })
                .filter(|prefix| self.text.ends_with(prefix))
                .map(str::len)
                .max()
                .unwrap_or(0);
            end -= hold;
        }
        let ready = self.text[self.sent.min(end)..end].to_string();
        self.sent = self.sent.max(end);
        ready
    }

    /// At the end of the completion: everything not handed out (an unfinished character's
    /// bytes decoded as they are).
    pub fn take_rest(&mut self) -> Result<String> {
        if self.stopped.is_none() && self.read < self.ids.len() {
            let before = self.decode(&self.ids[self.prefix..self.read])?;
            let now = self.decode(&self.ids[self.prefix..])?;
            if let Some(new) = now.get(before.len()..) {
                self.text.push_str(new);
            }
            self.read = self.ids.len();
        }
        let rest = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        Ok(rest)
    }

    /// The whole text so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }
}
