//! The command line: one subcommand per user verb.

use crate::adapters::peft;
use crate::config::RunConfig;
use crate::data::chat::{encode_all, read_jsonl, ChatEncoder, Message, Role};
use crate::source::{self, ModelSource};
use anyhow::{bail, Result};
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
    /// Loss curves of one or several runs, as an SVG.
    Plot(PlotArgs),
    /// A table of the runs under a directory (a sweep): eval losses, mean ± std over seeds.
    Collect(CollectArgs),
}

#[derive(Args)]
pub struct PlotArgs {
    /// Run directories (each with metrics.jsonl and config.toml).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// The SVG file to write.
    #[arg(long, short, default_value = "loss.svg")]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct CollectArgs {
    /// A directory holding run directories (searched recursively).
    pub root: PathBuf,
    /// CSV instead of markdown.
    #[arg(long)]
    pub csv: bool,
}

#[derive(Args)]
pub struct TrainArgs {
    /// The run config (see configs/).
    #[arg(long, short, required_unless_present = "resume")]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. --set optim.lr=1e-4 --set seed=2 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,
    /// Continue the run in this directory from its newest checkpoint (the config defaults to
    /// the run's own config.toml).
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "overwrite")]
    pub resume: Option<PathBuf>,
    /// Replace a finished or checkpointed run in output_dir instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
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
        Command::Plot(a) => {
            crate::plot::plot(&a.runs, &a.out)?;
            println!("wrote {}", a.out.display());
            Ok(())
        }
        Command::Collect(a) => {
            print!("{}", crate::collect::collect(&a.root, a.csv)?);
            Ok(())
        }
    }
}

fn train(args: TrainArgs) -> Result<()> {
    let (cfg, start) = match &args.resume {
        Some(run_dir) => {
            let saved = run_dir.join("config.toml");
            let path = args.config.clone().unwrap_or_else(|| saved.clone());
            let mut cfg = RunConfig::load(&path, &args.overrides)?;
            cfg.output_dir = run_dir.display().to_string();
            let previous = RunConfig::load(&saved, &[])?;
            if let Some(key) = cfg.first_difference(&previous) {
                bail!(
                    "--resume {}: the config differs from the run's config.toml at `{key}`; resume with the same settings",
                    run_dir.display()
                );
            }
            (cfg, crate::train::Start::Resume)
        }
        None => {
            let path = args
                .config
                .as_ref()
                .expect("clap requires --config without --resume");
            let start = if args.overwrite {
                crate::train::Start::Overwrite
            } else {
                crate::train::Start::Fresh
            };
            (RunConfig::load(path, &args.overrides)?, start)
        }
    };
    let s = crate::train::train(&cfg, start, !args.quiet)?;
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
    let mut model = source.load(source::parse_dtype(&args.dtype)?, &source::device()?)?;
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
