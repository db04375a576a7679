//! `prolora generate`: chat completion, one prompt or a jsonl file of them.

use super::model::{load_model_from, model_inputs, ModelArgs};
use crate::atomic;
use crate::data::chat::{Message, Role};
use crate::source::ModelSource;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The user message.
    #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// An optional system message.
    #[arg(long)]
    pub system: Option<String>,
    /// Batch mode: a jsonl file of prompts, one per line: {"prompt": "…"} (optionally "system"
    /// and "id"), or {"messages": [...]}; completions go to --out as jsonl.
    #[arg(long, value_name = "FILE.jsonl")]
    pub prompts: Option<PathBuf>,
    /// Batch mode: where the completions go (`-` or absent: stdout).
    #[arg(long, requires = "prompts")]
    pub out: Option<PathBuf>,
    /// Replace an existing --out.
    #[arg(long, requires = "out")]
    pub overwrite: bool,
    /// Batch mode: prompts decoded together (each gets the tokens it would get alone).
    #[arg(long, default_value_t = 8, requires = "prompts", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub batch_size: usize,
    /// Stop after this many new tokens (or at the end-of-sequence token); at least 1.
    #[arg(long, default_value_t = 128, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_new_tokens: usize,
    /// 0 is greedy; above 0, sample from softmax(logits / temperature).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: only the most probable tokens whose probabilities reach this.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// The sampling seed: the same seed gives the same completions.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the output contains this text (repeatable); the output ends before it.
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Go on past the model's max_position_embeddings (RoPE is defined for any position).
    #[arg(long)]
    pub past_max_positions: bool,
}

pub(super) fn run(args: GenerateArgs) -> Result<()> {
    use crate::generate::{complete_batch, generate as complete, Ended, Settings};
    let settings = Settings {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop: args.stop.clone(),
        past_positions: args.past_max_positions,
        stop_ids: Vec::new(),
    };
    settings
        .validate()
        .map_err(|e| anyhow::anyhow!("--{e}").context("generate"))?;
    let source = ModelSource::resolve(&args.model.base.spec.model, &args.model.base.spec.revision)?;
    let Some(file) = &args.prompts else {
        let device = crate::device::open(args.model.base.device)?;
        let (model, encoder) = load_model_from(&source, &args.model, &device)?;
        let messages = chat(args.system.clone(), args.prompt.clone().unwrap_or_default());
        crate::to_stdout!("{}", complete(&model, &encoder, &messages, &settings)?.text);
        return Ok(());
    };
    let out = args.out.as_ref().filter(|o| o.as_os_str() != "-");
    if let Some(out) = out {
        let mut inputs = model_inputs(&source, &args.model);
        inputs.push(file);
        atomic::check_output(out, "--out", &inputs, args.overwrite)?;
    }
    std::fs::File::open(file).with_context(|| format!("--prompts {}", file.display()))?;
    // Read as the data files are, line by line with a length limit (a file with no newlines is
    // refused, not read whole) and a byte-order mark on line 1 allowed.
    let mut requests = Vec::new();
    crate::data::jsonl::for_each_chunk(file, 1024, |lines| {
        for (n, raw) in lines {
            let at = || format!("{}:{n}", file.display());
            let line = match crate::data::jsonl::line_text(n, &raw) {
                Ok(Some(line)) => line,
                Ok(None) => continue,
                Err(why) => bail!("{}: {why}", at()),
            };
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
            let messages = match (&v["messages"], v["prompt"].as_str()) {
                (serde_json::Value::Array(_), _) => {
                    serde_json::from_value::<Vec<Message>>(v["messages"].clone()).with_context(
                        || format!("{}: \"messages\" is not a list of {{role, content}}", at()),
                    )?
                }
                (_, Some(prompt)) => {
                    chat(v["system"].as_str().map(String::from), prompt.to_string())
                }
                _ => bail!("{}: needs \"prompt\": \"…\" or \"messages\": [...]", at()),
            };
            // The id as given (a string stays a string, a number a number), else the line number.
            let id = match &v["id"] {
                serde_json::Value::Null => json!(n),
                id @ (serde_json::Value::String(_) | serde_json::Value::Number(_)) => id.clone(),
                other => bail!("{}: \"id\": {other} must be a string or a number", at()),
            };
            requests.push((id, messages));
        }
        Ok(())
    })?;
    let device = crate::device::open(args.model.base.device)?;
    let (model, encoder) = load_model_from(&source, &args.model, &device)?;
    let settings = Settings {
        stop_ids: encoder.stop_ids().to_vec(),
        ..settings
    };
    let mut progress = crate::progress::Progress::new(true, "prompts", requests.len(), 0, 0);
    let mut lines = String::new();
    let mut completed = 0;
    for chunk in requests.chunks(args.batch_size) {
        let prompts = chunk
            .iter()
            .map(|(_, messages)| {
                let prompt = encoder.encode_prompt(messages)?;
                Ok(crate::generate::Request {
                    prompt,
                    seed: settings.seed,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let done = complete_batch(&model, encoder.tokenizer(), &prompts, &settings)?;
        for ((id, messages), c) in chunk.iter().zip(done) {
            let ended = match &c.ended {
                Ended::Eos => json!("eos"),
                Ended::Stop(s) => json!({"stop": s}),
                Ended::MaxNewTokens => json!("max_new_tokens"),
                Ended::Positions => json!("max_position_embeddings"),
            };
            let line = json!({"id": id, "prompt": encoder.prompt_text(messages)?, "output": c.text,
                "tokens": c.ids.len(), "ended": ended});
            lines.push_str(&format!("{line}\n"));
        }
        completed += chunk.len();
        let rate = completed as f64 / progress.elapsed_s().max(1e-9);
        progress.advance(chunk.len(), format!("{rate:.2} prompts/s"));
    }
    progress.finish_and_clear();
    match out {
        Some(out) => {
            atomic::write(out, lines.as_bytes())?;
            crate::to_stderr!("wrote {} completions to {}", requests.len(), out.display());
        }
        None => crate::console::write_out(format_args!("{lines}")),
    }
    Ok(())
}

/// A chat of an optional system message and one user message.
pub(super) fn chat(system: Option<String>, prompt: String) -> Vec<Message> {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(Message {
            role: Role::System,
            content: s,
        });
    }
    messages.push(Message {
        role: Role::User,
        content: prompt,
    });
    messages
}
