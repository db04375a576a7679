//! The generation engine: a prompt computed once into a KV cache, then one position per new
//! token, greedy or sampled (temperature, nucleus top-p, a seed), until EOS, a stop sequence
//! in the decoded text, `max_new_tokens` or the model's positions.

use crate::ctx::Ctx;
use crate::data::chat::ChatEncoder;
use crate::data::chat::Message;
use crate::kernels::team;
use crate::model::kv_cache::KvCache;
use crate::model::Llama;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenizers::Tokenizer;

/// How tokens are chosen and when generation stops.
#[derive(Clone, Debug)]
pub struct Settings {
    pub max_new_tokens: usize,
    /// 0: greedy (argmax); above 0: sample from softmax(logits / temperature).
    pub temperature: f64,
    /// Sample only from the smallest set of tokens whose probabilities reach `top_p` (1: all).
    pub top_p: f64,
    /// The sampling stream: the same seed gives the same completion.
    pub seed: u64,
    /// Stop when the decoded output contains one of these; the output ends before it.
    pub stop: Vec<String>,
    /// Go on past the model's max_position_embeddings (RoPE is defined for any position).
    pub past_positions: bool,
    /// Token ids that end the completion besides the model config's EOS: the tokenizer's EOS
    /// ids, a chat template's end-of-turn ([`ChatEncoder::stop_ids`]).
    pub stop_ids: Vec<u32>,
}

impl Settings {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Settings {
            max_new_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            past_positions: false,
            stop_ids: Vec::new(),
        }
    }

    /// Refuses what transformers' GenerationConfig refuses.
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            bail!("max_new_tokens must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!(
                "temperature = {} must be finite and ≥ 0 (0 is greedy)",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p = {} must be in (0, 1]", self.top_p);
        }
        if self.stop.iter().any(String::is_empty) {
            bail!("a stop sequence is empty: every output contains it");
        }
        Ok(())
    }
}

/// Why a completion ended.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Ended {
    Eos,
    Stop(String),
    MaxNewTokens,
    Positions,
}

/// A generated continuation.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Completion {
    /// The new token ids (up to and including the token that completed a stop sequence).
    pub ids: Vec<u32>,
    /// The decoded text, cut before a stop sequence: the prompt and the new tokens decoded
    /// together, less the prompt's text (so a leading space of the first token stays, as in
    /// transformers' and vLLM's outputs).
    pub text: String,
    pub ended: Ended,
}

/// The assistant's reply to `messages` in the encoder's chat format, ending at its stop ids.
pub fn generate(
    model: &Llama,
    encoder: &ChatEncoder,
    messages: &[Message],
    settings: &Settings,
) -> Result<Completion> {
    let prompt = encoder.encode_prompt(messages)?;
    let settings = Settings {
        stop_ids: encoder.stop_ids().to_vec(),
        ..settings.clone()
    };
    complete(model, encoder.tokenizer(), &prompt, &settings)
}

/// The continuation of `prompt` (token ids) under `settings`.
pub fn complete(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    settings: &Settings,
) -> Result<Completion> {
    let request = Request {
        prompt: prompt.to_vec(),
        seed: settings.seed,
    };
    let mut done = complete_batch(model, tokenizer, &[request], settings)?;
    Ok(done.remove(0))
}

/// A prompt (token ids) to continue, with its own sampling stream.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub seed: u64,
}

/// The continuations of every request, decoded together: each prompt is prefilled alone, then
/// the batch steps one token at a time, left-padded in one KV cache (each row at its own
/// positions, its padding masked), and a row leaves the batch when it ends. A row's tokens do
/// not depend on the rows beside it.
pub fn complete_batch(
    model: &Llama,
    tokenizer: &Tokenizer,
    requests: &[Request],
    settings: &Settings,
) -> Result<Vec<Completion>> {
    settings.validate()?;
    if let Some(n) = requests.iter().position(|r| r.prompt.is_empty()) {
        bail!("prompt {} has no tokens", n + 1);
    }
    let ctx = Ctx::eval();
    let limit = model.cfg.max_position_embeddings;
    let mut rows: Vec<Row> = requests
        .iter()
        .map(|r| Row::new(r, tokenizer))
        .collect::<Result<_>>()?;
    let mut at_limit = false;
    let mut caches = Vec::new();
    let mut active = Vec::new();
    let mut next = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        if request.prompt.len() >= limit && !settings.past_positions {
            rows[i].ended = Some(Ended::Positions);
            at_limit = true;
            continue;
        }
        let mut cache = model.new_cache();
        let ids = Tensor::from_slice(&request.prompt, (1, request.prompt.len()), model.device())?;
        let hidden = model.hidden_cached(&ids, &ctx, &mut cache)?;
        let last = hidden.narrow(1, request.prompt.len() - 1, 1)?;
        let logits = last_logits(model, &last)?;
        if let Some(token) = rows[i].accept(&logits[0], model, tokenizer, settings)? {
            caches.push(cache);
            active.push(i);
            next.push(token);
        }
    }
    let mut cache = KvCache::stack(caches)?;
    while !active.is_empty() {
        let keep: Vec<usize> = (0..active.len())
            .filter(|&r| settings.past_positions || cache.next_position(r) + 1 < limit)
            .collect();
        if keep.len() < active.len() {
            for r in (0..active.len()).filter(|r| !keep.contains(r)) {
                rows[active[r]].ended = Some(Ended::Positions);
            }
            at_limit = true;
            cache.retain(&keep)?;
            active = keep.iter().map(|&r| active[r]).collect();
            next = keep.iter().map(|&r| next[r]).collect();
            if active.is_empty() {
                break;
            }
        }
        let ids = Tensor::from_slice(&next, (next.len(), 1), model.device())?;
        // A step's many small parallel loops on threads kept awake between them.
        let logits =
            team::run(|| last_logits(model, &model.hidden_cached(&ids, &ctx, &mut cache)?))?;
        let mut keep = Vec::new();
        let mut tokens = Vec::new();
        for (r, logits) in logits.iter().enumerate() {
            if let Some(token) = rows[active[r]].accept(logits, model, tokenizer, settings)? {
                keep.push(r);
                tokens.push(token);
            }
        }
        if keep.len() < active.len() {
            cache.retain(&keep)?;
            active = keep.iter().map(|&r| active[r]).collect();
        }
        next = tokens;
    }
    if at_limit {
        crate::to_stderr!(
            "warning: stopped at the model's {limit} positions (max_position_embeddings); \
             --past-max-positions goes on"
        );
    }
    rows.into_iter().map(|row| row.finish(tokenizer)).collect()
}

/// The vocabulary logits of hidden states (b, 1, d), one f32 row per batch row.
fn last_logits(model: &Llama, last: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(model
        .head(last)?
        .squeeze(1)?
        .to_dtype(DType::F32)?
        .to_vec2()?)
}

/// One completion in progress.
struct Row {
    rng: StdRng,
    prompt: Vec<u32>,
    prompt_text: String,
    ids: Vec<u32>,
    text: Option<String>,
    ended: Option<Ended>,
}

impl Row {
    fn new(request: &Request, tokenizer: &Tokenizer) -> Result<Self> {
        Ok(Row {
            rng: StdRng::seed_from_u64(request.seed),
            prompt: request.prompt.clone(),
            prompt_text: decode(tokenizer, &request.prompt)?,
            ids: Vec::new(),
            text: None,
            ended: None,
        })
    }

    /// Whether the newest token may have completed a stop sequence, decoding only the last
    /// tokens: a token is at least one byte, so a stop of n bytes lies within the last n
    /// tokens, and 8 more keep the window's start (a stripped space, a cut character) away from
    /// it. Early on, the whole output is checked.
    fn stop_in_last_tokens(&self, tokenizer: &Tokenizer, stops: &[String]) -> Result<bool> {
        let longest = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let start = self.ids.len().saturating_sub(longest + 8);
        if start == 0 {
            return Ok(true);
        }
        let window = decode(tokenizer, &self.ids[start..])?;
        Ok(stops.iter().any(|s| window.contains(s.as_str())))
    }

    /// The new tokens' text in the context of the prompt.
    fn new_text(&self, tokenizer: &Tokenizer) -> Result<String> {
        let all: Vec<u32> = self.prompt.iter().chain(&self.ids).copied().collect();
        let all = decode(tokenizer, &all)?;
        match all.strip_prefix(&self.prompt_text) {
            Some(new) => Ok(new.to_string()),
            None => decode(tokenizer, &self.ids),
        }
    }

    /// Chooses the next token from `logits`; returns it while the completion goes on.
    fn accept(
        &mut self,
        logits: &[f32],
        model: &Llama,
        tokenizer: &Tokenizer,
        settings: &Settings,
    ) -> Result<Option<u32>> {
        let token = choose(logits, settings.temperature, settings.top_p, &mut self.rng);
        if token == model.cfg.eos_token_id || settings.stop_ids.contains(&token) {
            self.ended = Some(Ended::Eos);
            return Ok(None);
        }
        self.ids.push(token);
        if !settings.stop.is_empty() && self.stop_in_last_tokens(tokenizer, &settings.stop)? {
            let mut text = self.new_text(tokenizer)?;
            if let Some((at, stop)) = first_stop(&text, &settings.stop) {
                text.truncate(at);
                self.text = Some(text);
                self.ended = Some(Ended::Stop(stop.to_string()));
                return Ok(None);
            }
        }
        if self.ids.len() == settings.max_new_tokens {
            self.ended = Some(Ended::MaxNewTokens);
            return Ok(None);
        }
        Ok(Some(token))
    }

    fn finish(mut self, tokenizer: &Tokenizer) -> Result<Completion> {
        let text = match self.text.take() {
            Some(text) => text,
            None => self.new_text(tokenizer)?,
        };
        let ended = self.ended.unwrap_or(Ended::MaxNewTokens);
        Ok(Completion {
            ids: self.ids,
            text,
            ended,
        })
    }
}

fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer
        .decode(ids, true)
        .map_err(|e| anyhow::anyhow!("cannot decode the generated tokens: {e}"))
}

/// The earliest stop sequence in `text`: where it starts, and which.
fn first_stop<'a>(text: &str, stops: &'a [String]) -> Option<(usize, &'a str)> {
    stops
        .iter()
        .filter_map(|s| text.find(s.as_str()).map(|at| (at, s.as_str())))
        .min_by_key(|(at, _)| *at)
}

/// The next token: the argmax at temperature 0, else a sample from the tempered softmax
/// restricted to the nucleus (transformers' TopPLogitsWarper: the most probable tokens whose
/// probabilities sum to at least `top_p`, and never fewer than one).
pub fn choose(logits: &[f32], temperature: f64, top_p: f64, rng: &mut StdRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if temperature == 0.0 {
        return argmax();
    }
    let t = temperature;
    let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, ((v as f64 - top) / t).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    // Most probable first (ties by id). Only the head of that order is needed: sort the top k,
    // and widen k until the nucleus fits in it.
    let order = |a: &(usize, f64), b: &(usize, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut k = 64.min(probs.len());
    let kept = loop {
        if k < probs.len() {
            probs.select_nth_unstable_by(k, order);
        }
        probs[..k].sort_by(order);
        let mut mass = 0.0;
        let within = probs[..k].iter().position(|p| {
            mass += p.1;
            mass >= top_p
        });
        match within {
            Some(i) => break i + 1,
            None if k == probs.len() => break k,
            None => k = (4 * k).min(probs.len()),
        }
    };
    let mass: f64 = probs[..kept].iter().map(|p| p.1).sum();
    let nucleus = &probs[..kept];
    let mut u = rng.random::<f64>() * mass;
    for &(i, p) in nucleus {
        if u < p {
            return i as u32;
        }
        u -= p;
    }
    nucleus[kept - 1].0 as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(temperature: f64, top_p: f64, seed: u64) -> Settings {
        Settings {
            temperature,
            top_p,
            seed,
            ..Settings::greedy(1)
        }
    }

    #[test]
    fn temperature_zero_is_the_argmax_and_a_seed_repeats_its_samples() {
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(choose(&logits, 0.0, 1.0, &mut rng), 1);
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..50)
                .map(|_| choose(&logits, 1.0, 1.0, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
        // Every token is reachable at temperature 1 with the whole vocabulary.
        let seen: std::collections::BTreeSet<u32> = draw(1).into_iter().chain(draw(2)).collect();
        assert!(seen.len() >= 3, "{seen:?}");
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // Probabilities ≈ 0.64, 0.24, 0.09, 0.03: top_p 0.8 keeps the first two, 0.5 the first.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let draws = |top_p| {
            let mut rng = StdRng::seed_from_u64(3);
            (0..400)
                .map(|_| choose(&logits, 1.0, top_p, &mut rng))
                .collect::<std::collections::BTreeSet<u32>>()
        };
        assert_eq!(draws(0.5), [0].into());
        assert_eq!(draws(0.8), [0, 1].into());
        assert_eq!(draws(1.0), [0, 1, 2, 3].into());
    }

    #[test]
    fn the_earliest_stop_sequence_wins() {
        let stops = vec!["\n\n".to_string(), "Question:".to_string()];
        assert_eq!(
            first_stop("a Question: b\n\n", &stops),
            Some((2, "Question:"))
        );
        assert_eq!(first_stop("no stop", &stops), None);
    }

    #[test]
    fn settings_transformers_refuses_are_refused() {
        let bad = [
            Settings {
                max_new_tokens: 0,
                ..Settings::greedy(1)
            },
            settings(-0.5, 1.0, 0),
            settings(f64::NAN, 1.0, 0),
            settings(1.0, 0.0, 0),
            settings(1.0, 1.5, 0),
            Settings {
                stop: vec![String::new()],
                ..Settings::greedy(1)
            },
        ];
        for s in bad {
            assert!(s.validate().is_err(), "{s:?}");
        }
    }
}
