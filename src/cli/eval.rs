//! `prolora eval`: mean token cross-entropy of a model (+ adapter) on chat data.

use super::model::{load_model, ModelArgs};
use super::print_json;
use crate::data::chat::{encode_all, read_jsonl};
use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// `{"messages": [...]}` jsonl.
    #[arg(long)]
    pub data: PathBuf,
    /// Longest example in tokens; longer ones are truncated (as in training).
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn run(args: EvalArgs) -> Result<()> {
    if args.max_seq_len < 2 {
        bail!("--max-seq-len must be at least 2");
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let (model, encoder) = load_model(&args.model)?;
    let examples = read_jsonl(&args.data)?;
    let (encoded, dropped) = encode_all(&encoder, &examples, args.max_seq_len)?;
    if encoded.is_empty() {
        bail!(
            "{}: no example has a label token within {} tokens",
            args.data.display(),
            args.max_seq_len
        );
    }
    let (loss, tokens) = crate::eval::evaluate(&model, &encoded, args.batch_size)?;
    if !loss.is_finite() {
        bail!(
            "the loss over {} is {loss}: the model or the adapter produces non-finite values",
            args.data.display()
        );
    }
    if args.json {
        print_json(json!({
            "loss": loss,
            "tokens": tokens,
            "examples": encoded.len(),
            "dropped": dropped,
            "perplexity": loss.exp(),
        }));
    } else {
        crate::to_stdout!(
            "loss {loss:.6} (perplexity {:.3}) over {tokens} label tokens in {} examples{}",
            loss.exp(),
            encoded.len(),
            if dropped > 0 {
                format!(" ({dropped} dropped: no label token left)")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
