//! The command line: one subcommand per user verb.

use crate::adapters::tied_lora::TIED_MODULES;
use crate::adapters::{peft, AdapterConfig, AdapterKind, Axis};
use crate::config::RunConfig;
use crate::data::chat::{encode_all, read_jsonl, ChatEncoder, Message, Role};
use crate::source::{self, ModelSource, Origin};
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
    /// Exact trainable-parameter count of an adapter on a model, from the shapes alone.
    Params(ParamsArgs),
    /// Write an adapter (any kind) as a plain PEFT LoRA of the equivalent rank.
    Export(ExportArgs),
    /// Merge an adapter into the base weights: W0 + ΔW as a transformers checkpoint.
    Merge(MergeArgs),
}

#[derive(Args)]
pub struct ParamsArgs {
    /// A preset (tiny, llama2-7b, llama2-13b, llama2-70b), a local directory or a Hub repo id.
    #[arg(long, required_unless_present = "paper_tables")]
    pub model: Option<String>,
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// lora, prolora, vera or tied-lora.
    #[arg(long, required_unless_present = "paper_tables")]
    pub adapter: Option<String>,
    /// Total rank r.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// PRoLoRA: unshared rank u (default 1).
    #[arg(long)]
    pub unshared: Option<usize>,
    /// PRoLoRA: sharing rate m of A (default 7).
    #[arg(long)]
    pub sharing: Option<usize>,
    /// PRoLoRA: sharing rate n of B (default: --sharing).
    #[arg(long)]
    pub sharing_b: Option<usize>,
    /// PRoLoRA: cut the chunks along `hidden` (default) or `rank`.
    #[arg(long)]
    pub share_axis: Option<String>,
    /// Comma-separated linears (default: all seven; q,k,v for tied-lora).
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Print the paper's Table 1 and Table 2 parameter column, computed here.
    #[arg(long)]
    pub paper_tables: bool,
}

#[derive(Args)]
pub struct ExportArgs {
    /// Our adapter directory (any kind).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output format; `peft-lora` is the one there is.
    #[arg(long, default_value = "peft-lora")]
    pub format: String,
    /// Where to write the PEFT LoRA adapter.
    #[arg(long)]
    pub out: PathBuf,
    /// The base model (for its shapes); default: the adapter's base_model_name_or_path.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value = "main")]
    pub revision: String,
}

#[derive(Args)]
pub struct MergeArgs {
    /// A local transformers directory or a Hub repo id.
    #[arg(long)]
    pub model: String,
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// The adapter directory (any kind).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The output directory (a transformers checkpoint).
    #[arg(long)]
    pub out: PathBuf,
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
        Command::Params(a) => params(a),
        Command::Export(a) => export(a),
        Command::Merge(a) => merge(a),
    }
}

fn params(args: ParamsArgs) -> Result<()> {
    if args.paper_tables {
        print!("{}", crate::params::paper_tables()?);
        return Ok(());
    }
    let (Some(model), Some(adapter)) = (&args.model, &args.adapter) else {
        bail!("--model and --adapter are required (or pass --paper-tables)");
    };
    let kind = AdapterKind::parse(adapter)?;
    let is_prolora = kind == AdapterKind::Prolora;
    let targets = match (&args.targets, kind) {
        (Some(t), _) => t.clone(),
        (None, AdapterKind::TiedLora) => TIED_MODULES.map(String::from).to_vec(),
        (None, _) => AdapterConfig::default().targets,
    };
    let share_axis = match args.share_axis.as_deref() {
        None => None,
        Some("hidden") => Some(Axis::Hidden),
        Some("rank") => Some(Axis::Rank),
        Some(other) => bail!("--share-axis {other:?}: use hidden or rank"),
    };
    for (flag, set) in [
        ("--unshared", args.unshared.is_some()),
        ("--sharing", args.sharing.is_some()),
        ("--sharing-b", args.sharing_b.is_some()),
        ("--share-axis", share_axis.is_some()),
    ] {
        if set && !is_prolora {
            bail!("{flag} applies to --adapter prolora only");
        }
    }
    let cfg = AdapterConfig {
        kind,
        rank: args.rank,
        targets,
        unshared_rank: args.unshared,
        sharing_rate_a: args.sharing,
        sharing_rate_b: args.sharing_b,
        share_axis,
        ..Default::default()
    };
    let source = ModelSource::resolve(model, &args.revision)?;
    let report = crate::params::report(&source.name(), &source.config, &cfg)?;
    if args.json {
        println!("{report}");
    } else {
        println!("{}", crate::params::describe(&report));
    }
    Ok(())
}

/// The base model an adapter was trained on: `--model`, else its recorded base.
fn base_of(model: &Option<String>, adapter: &std::path::Path) -> Result<String> {
    match model.clone().or_else(|| peft::base_model_of(adapter)) {
        Some(m) => Ok(m),
        None => bail!(
            "{}: no base_model_name_or_path in adapter_config.json; pass --model",
            adapter.display()
        ),
    }
}

fn export(args: ExportArgs) -> Result<()> {
    if args.format != "peft-lora" {
        bail!(
            "--format {:?} is not supported (use peft-lora)",
            args.format
        );
    }
    let model = base_of(&args.model, &args.adapter)?;
    let source = ModelSource::resolve(&model, &args.revision)?;
    crate::export::export_peft_lora(&args.adapter, &source.config, &model, &args.out)?;
    println!("PEFT LoRA written to {}", args.out.display());
    Ok(())
}

fn merge(args: MergeArgs) -> Result<()> {
    let source = ModelSource::resolve(&args.model, &args.revision)?;
    let Origin::Dir(dir) = &source.origin else {
        bail!(
            "--model {}: a preset has no checkpoint files to merge into; pass a model directory or Hub id",
            args.model
        );
    };
    crate::export::merge(dir, &source.config, &args.adapter, &args.out)?;
    println!("merged model written to {}", args.out.display());
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
