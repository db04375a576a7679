//! The command line: one subcommand per user verb.

use crate::adapters::peft;
use crate::config::RunConfig;
use crate::data::chat::{encode_all, read_jsonl, ChatEncoder, Message, Role};
use crate::model::nf4::Quantization;
use crate::source::{self, ModelSource};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "prolora",
    version,
    about = "Finetune LLaMA-family models with LoRA-family adapters (PRoLoRA, LoRA, VeRA, Tied-LoRA)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Train an adapter from a TOML config.
    Train(TrainArgs),
    /// Mean token cross-entropy of a model (+ adapter) on a chat jsonl file.
    Eval(EvalArgs),
    /// Greedy chat completion, to smoke-test an adapter.
    Generate(GenerateArgs),
    /// Write a model with NF4 block linears in bitsandbytes' layout (loads here and in transformers).
    Quantize(QuantizeArgs),
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// A preset, a local transformers directory, or a Hub repo id (org/name).
    #[arg(long)]
    pub model: String,
    /// Hub revision: branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// The output directory (model.safetensors, config.json, tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
    /// Also quantize the block scales (double quantization).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub double_quant: bool,
}

#[derive(Args)]
pub struct TrainArgs {
    /// The run config (see configs/).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Override a config key, e.g. --set optim.lr=1e-4 --set seed=2 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,
}

/// How to get the base model (shared by eval and generate).
#[derive(Args)]
pub struct ModelArgs {
    /// A preset (tiny), a local transformers directory, or a Hub repo id (org/name).
    #[arg(long)]
    pub model: String,
    /// Hub revision: branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// A tokenizer.json to use instead of the model's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Compute dtype: f32, bf16, f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Storage of the block linears: none, or nf4 (4-bit, as bitsandbytes; quantized on load).
    #[arg(long, default_value = "none")]
    pub quantize: String,
    /// With --quantize nf4: also quantize the block scales (double quantization).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub double_quant: bool,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// `{"messages": [...]}` jsonl.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The user message.
    #[arg(long)]
    pub prompt: String,
    /// An optional system message.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => train(a),
        Command::Eval(a) => eval(a),
        Command::Generate(a) => generate(a),
        Command::Quantize(a) => quantize(a),
    }
}

fn quantize(args: QuantizeArgs) -> Result<()> {
    let source = ModelSource::resolve(&args.model, &args.revision)?;
    let s = crate::quantize::quantize_model(&source, &args.out, args.double_quant)?;
    println!(
        "wrote {} tensors ({:.1} MiB) to {}",
        s.tensors,
        s.bytes as f64 / (1 << 20) as f64,
        args.out.display()
    );
    Ok(())
}

fn train(args: TrainArgs) -> Result<()> {
    let cfg = RunConfig::load(&args.config, &args.overrides)?;
    let s = crate::train::train(&cfg, !args.quiet)?;
    println!(
        "done: {} steps, loss {:.4} → {:.4}{}; adapter in {}",
        s.steps,
        s.first_loss,
        s.last_loss,
        s.final_eval_loss
            .map(|l| format!(", eval loss {l:.4}"))
            .unwrap_or_default(),
        s.run_dir.display()
    );
    Ok(())
}

/// The base model with the adapter (if any) attached, and its chat encoder.
fn load_model(args: &ModelArgs) -> Result<(crate::model::Llama, ChatEncoder)> {
    let source = ModelSource::resolve(&args.model, &args.revision)?;
    let encoder = ChatEncoder::new(source.tokenizer(args.tokenizer.as_deref())?)?;
    let quant = Quantization::parse(&args.quantize, args.double_quant).context("--quantize")?;
    let mut model =
        source.load_quantized(source::parse_dtype(&args.dtype)?, quant, &source::device()?)?;
    if let Some(dir) = &args.adapter {
        peft::load_into(dir, &mut model)?;
    }
    Ok((model, encoder))
}

fn eval(args: EvalArgs) -> Result<()> {
    if args.max_seq_len < 2 {
        bail!("--max-seq-len must be at least 2");
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
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "loss": loss,
                "tokens": tokens,
                "examples": encoded.len(),
                "dropped": dropped,
                "perplexity": loss.exp(),
            })
        );
    } else {
        println!(
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

fn generate(args: GenerateArgs) -> Result<()> {
    let (model, encoder) = load_model(&args.model)?;
    let mut messages = Vec::new();
    if let Some(s) = args.system {
        messages.push(Message {
            role: Role::System,
            content: s,
        });
    }
    messages.push(Message {
        role: Role::User,
        content: args.prompt,
    });
    println!(
        "{}",
        crate::generate::generate(&model, &encoder, &messages, args.max_new_tokens)?
    );
    Ok(())
}
