//! Greedy decoding with the chat template, for smoke-testing an adapter.

use crate::ctx::Ctx;
use crate::data::chat::ChatEncoder;
use crate::data::chat::Message;
use crate::model::Llama;
use anyhow::Result;
use candle_core::{Tensor, D};

/// The assistant's reply to `messages`: greedy tokens until EOS, `max_new_tokens`, or (unless
/// `past_positions`) the model's `max_position_embeddings`, with a warning.
/// Recomputes the whole sequence each step (no KV cache): simple, and fast enough for a check.
pub fn generate(
    model: &Llama,
    encoder: &ChatEncoder,
    messages: &[Message],
    max_new_tokens: usize,
    past_positions: bool,
) -> Result<String> {
    let mut ids = encoder.encode_prompt(messages)?;
    let prompt_len = ids.len();
    let ctx = Ctx::eval();
    let eos = model.cfg.eos_token_id;
    let limit = model.cfg.max_position_embeddings;
    for _ in 0..max_new_tokens {
        if ids.len() >= limit && !past_positions {
            eprintln!(
                "warning: stopped at the model's {limit} positions (max_position_embeddings); \
                 --past-max-positions goes on"
            );
            break;
        }
        let input = Tensor::from_slice(&ids, (1, ids.len()), model.device())?;
        let hidden = model.hidden(&input, &ctx)?;
        let last = hidden.narrow(1, ids.len() - 1, 1)?;
        let next = model
            .head(&last)?
            .flatten_all()?
            .argmax(D::Minus1)?
            .to_scalar::<u32>()?;
        if next == eos {
            break;
        }
        ids.push(next);
    }
    encoder
        .tokenizer()
        .decode(&ids[prompt_len..], true)
        .map_err(|e| anyhow::anyhow!("cannot decode the generated tokens: {e}"))
}
