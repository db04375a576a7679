//! Greedy decoding with the chat template, on a KV cache.

use crate::ctx::Ctx;
use crate::data::chat::ChatEncoder;
use crate::data::chat::Message;
use crate::model::Llama;
use anyhow::Result;
use candle_core::{Tensor, D};

/// The assistant's reply to `messages`: [`greedy`] from the chat prompt, decoded.
pub fn generate(
    model: &Llama,
    encoder: &ChatEncoder,
    messages: &[Message],
    max_new_tokens: usize,
    past_positions: bool,
) -> Result<String> {
    let prompt = encoder.encode_prompt(messages)?;
    let reply = greedy(model, &prompt, max_new_tokens, past_positions)?;
    encoder
        .tokenizer()
        .decode(&reply, true)
        .map_err(|e| anyhow::anyhow!("cannot decode the generated tokens: {e}"))
}

/// Greedy tokens after `prompt` until EOS, `max_new_tokens`, or (unless `past_positions`) the
/// model's `max_position_embeddings`, with a warning. The prompt is computed once into a KV
/// cache; each new token then costs one position.
pub fn greedy(
    model: &Llama,
    prompt: &[u32],
    max_new_tokens: usize,
    past_positions: bool,
) -> Result<Vec<u32>> {
    let ctx = Ctx::eval();
    let eos = model.cfg.eos_token_id;
    let limit = model.cfg.max_position_embeddings;
    let mut cache = model.new_cache();
    let mut input = prompt.to_vec();
    let mut reply = Vec::new();
    for _ in 0..max_new_tokens {
        if cache.len() + input.len() >= limit && !past_positions {
            eprintln!(
                "warning: stopped at the model's {limit} positions (max_position_embeddings); \
                 --past-max-positions goes on"
            );
            break;
        }
        let ids = Tensor::from_slice(&input, (1, input.len()), model.device())?;
        let hidden = model.hidden_cached(&ids, &ctx, &mut cache)?;
        let last = hidden.narrow(1, input.len() - 1, 1)?;
        let next = model
            .head(&last)?
            .flatten_all()?
            .argmax(D::Minus1)?
            .to_scalar::<u32>()?;
        if next == eos {
            break;
        }
        reply.push(next);
        input = vec![next];
    }
    Ok(reply)
}
