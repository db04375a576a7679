//! The command line: one subcommand per user verb.

use crate::adapters::peft;
use crate::atomic;
use crate::choice::named_enum;
use crate::config::RunConfig;
use crate::data::chat::{encode_all, read_jsonl, ChatEncoder, ChatFormat, Message, Role};
use crate::data::convert::{prepare, Format};
use crate::data::dataset::{encode_file, LoadOptions};
use crate::data::inspect;
use crate::device::{ComputeDtype, DeviceSpec};
use crate::model::nf4::{Quantization, Storage};
use crate::source::{self, ModelSource, Origin};
use crate::train::run_dir::{CONFIG_FILE, METRICS_FILE};
use crate::train::Start;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

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
    /// Chat completion (greedy or sampled), one prompt or a jsonl file of them.
    Generate(GenerateArgs),
    /// The paper's benchmarks (MMLU, GSM, BBH, TyDi QA, HumanEval) as open-instruct scores them.
    Evaluate(EvaluateArgs),
    /// Loss curves of one or several runs, as an SVG.
    Plot(PlotArgs),
    /// A table of the runs under a directory (a sweep): eval losses, mean ± std over seeds.
    Collect(CollectArgs),
    /// Instruction data: convert raw datasets, encode, inspect.
    #[command(subcommand)]
    Data(DataCommand),
    /// Write a model with NF4 block linears in bitsandbytes' layout (loads here and in transformers).
    Quantize(QuantizeArgs),
    /// Exact trainable-parameter count of an adapter on a model, from the shapes alone.
    Params(ParamsArgs),
    /// Write an adapter (any kind) as a plain PEFT LoRA of the equivalent rank.
    Export(ExportArgs),
    /// Merge an adapter into the base weights: W0 + ΔW as a transformers checkpoint.
    Merge(MergeArgs),
    /// A grid of runs (e.g. learning rates × seeds), here or as a Slurm job array; rerun the
    /// same command to continue it. `sweep status DIR` shows where each point stands.
    Sweep(SweepArgs),
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SweepArgs {
    #[command(subcommand)]
    pub action: Option<SweepAction>,
    /// The base config of every point.
    #[arg(long, required = true)]
    pub config: Option<PathBuf>,
    /// A swept key and its values, e.g. `--grid optim.lr=1e-4,2e-4 --grid seed=1,2,3`; the
    /// points are the cartesian product.
    #[arg(long = "grid", value_name = "KEY=V1,V2,…", required = true)]
    pub grid: Vec<crate::sweep::Axis>,
    /// A key fixed for every point (as `train --set`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// The sweep directory (sweep.json, runs/<point>/, logs).
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    /// Where the points run.
    #[arg(long, default_value = "local", value_parser = choices::<Backend>(Backend::NAMES))]
    pub backend: Backend,
    /// Local backend: points at a time (default: one per GPU, one on a CPU machine).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub jobs: Option<usize>,
    /// Slurm backend: sbatch options for every task, e.g. "--partition=gpu --gres=gpu:1 --time=24:00:00".
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub slurm_args: String,
    /// Print the points (and the Slurm script) without running or submitting anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Evaluate each point once it has trained: benchmarks (mmlu,gsm,… or all), results in
    /// RUN/eval/<benchmark>.json and in `prolora collect`'s table.
    #[arg(long, value_name = "BENCHMARKS")]
    pub evaluate: Option<String>,
    /// With --evaluate: open-instruct's evaluation data layout.
    #[arg(long, requires = "evaluate")]
    pub eval_data_dir: Option<PathBuf>,
    /// With --evaluate humaneval: run the model's code (sandboxed python3).
    #[arg(long, requires = "evaluate")]
    pub allow_code_execution: bool,
}

crate::choice::named_enum! {
/// Where the points of a sweep run.
pub enum Backend {
    /// On this machine.
    Local = "local",
    /// As a Slurm job array (sbatch).
    Slurm = "slurm",
}
}

#[derive(Subcommand)]
pub enum SweepAction {
    /// Per point: pending, running, interrupted, failed or finished, the step and last loss.
    Status {
        /// The sweep directory.
        dir: PathBuf,
        /// One JSON array on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run one point to its end (start, resume or skip): what each array task runs.
    #[command(hide = true)]
    Task {
        dir: PathBuf,
        /// The point; default $SLURM_ARRAY_TASK_ID.
        #[arg(long)]
        index: Option<usize>,
        /// No progress lines (array scripts of older sweeps, which a requeue reruns, pass it).
        #[arg(long)]
        quiet: bool,
    },
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Encode a chat jsonl file: one {"input_ids", "labels"} line per valid example, in file
    /// order (those with no label token left too), to diff against a Python pipeline.
    Encode(EncodeArgs),
    /// Show examples with the trained-on tokens marked, and length statistics.
    Inspect(InspectArgs),
    /// Convert a raw dataset to chat jsonl as open-instruct's reformatting script does.
    Prepare(PrepareArgs),
}

#[derive(Args)]
pub struct PrepareArgs {
    /// The raw format: superni, flan_v2, cot, code_alpaca, alpaca, messages or prompt_completion.
    #[arg(long, value_parser = choices::<Format>(Format::NAMES))]
    pub format: Format,
    /// The raw file or directory (see the formats).
    #[arg(long = "in")]
    pub input: PathBuf,
    /// The `{"messages": [...]}` jsonl to write (`-`: stdout).
    #[arg(long)]
    pub out: PathBuf,
    /// Seeds the template choice and the sampling (the reference's `random.seed`).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Skip, count and report bad records instead of stopping at the first.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Print one JSON object (what was written) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Replace an existing output (built beside it, swapped in at the end).
    #[arg(long)]
    pub overwrite: bool,
}

/// What the data commands read.
#[derive(Args)]
pub struct DataInput {
    /// A tokenizer.json (with its tokenizer_config.json beside it), a directory holding one, a
    /// preset or a Hub repo id.
    #[arg(long, default_value = "llama2-7b")]
    pub tokenizer: String,
    /// How conversations become text: tulu (open-instruct's, the paper's), model (the model's
    /// own chat template) or none (the texts alone, for a base model).
    #[arg(long, default_value = "tulu", value_parser = choices::<ChatFormat>(ChatFormat::NAMES))]
    pub chat_format: ChatFormat,
    /// `{"messages": [...]}` jsonl.
    #[arg(long)]
    pub data: PathBuf,
    /// Longest example in tokens; longer ones are truncated (as in training).
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    /// Skip, count and report bad lines instead of stopping at the first one.
    #[arg(long)]
    pub skip_invalid: bool,
}

#[derive(Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub input: DataInput,
    /// Where to write the encoded jsonl (`-`: stdout).
    #[arg(long)]
    pub out: PathBuf,
    /// Print one JSON object (what was written) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Replace an existing output (built beside it, swapped in at the end).
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub input: DataInput,
    /// How many examples to show.
    #[arg(long, default_value_t = 3)]
    pub n: usize,
}

#[derive(Args)]
pub struct PlotArgs {
    /// Run directories (each with metrics.jsonl and config.toml), or directories holding runs
    /// (a sweep), searched as `collect` searches.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// The SVG file to write.
    #[arg(long, short, default_value = "loss.svg")]
    pub out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args)]
pub struct CollectArgs {
    /// A directory holding run directories (searched recursively).
    pub root: PathBuf,
    /// CSV instead of markdown.
    #[arg(long)]
    pub csv: bool,
}

/// Where a model's files come from.
#[derive(Args)]
pub struct ModelSpec {
    /// A preset (tiny, llama2-7b, …), a local transformers directory, or a Hub repo id (org/name).
    #[arg(long)]
    pub model: String,
    /// Hub revision: branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
}

#[derive(Args)]
pub struct QuantizeArgs {
    #[command(flatten)]
    pub model: ModelSpec,
    /// The output directory (model.safetensors, config.json, tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
    /// Also quantize the block scales (double quantization).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub double_quant: bool,
    /// Print one JSON object (what was written) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Replace an existing output (built beside it, swapped in at the end).
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args)]
pub struct ParamsArgs {
    /// A preset (tiny, llama2-7b, llama2-13b, llama2-70b), a local directory or a Hub repo id.
    #[arg(long, required_unless_present = "paper_tables")]
    pub model: Option<String>,
    /// Hub revision: branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// The adapter method: lora, prolora, vera or tied-lora.
    #[arg(long, required_unless_present = "paper_tables")]
    pub method: Option<String>,
    /// Total rank r.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Comma-separated linears (default: the method's, all seven or q,k,v for tied-lora).
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// A method option as in a run config, e.g. --set adapter.unshared_rank=1 (repeatable).
    #[arg(long = "set", value_name = "adapter.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Print the paper's Table 1 and Table 2 parameter column, computed here.
    #[arg(long)]
    pub paper_tables: bool,
}

named_enum! {
/// What `prolora export` writes.
pub enum ExportFormat {
    /// A plain PEFT LoRA of the equivalent rank.
    PeftLora = "peft-lora",
}
}

#[derive(Args)]
pub struct ExportArgs {
    /// The adapter directory (any method).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output format.
    #[arg(long, default_value = "peft-lora", value_parser = choices::<ExportFormat>(ExportFormat::NAMES))]
    pub format: ExportFormat,
    /// Where to write the PEFT LoRA adapter.
    #[arg(long)]
    pub out: PathBuf,
    /// The base model (for its shapes); default: the adapter's base_model_name_or_path.
    #[arg(long)]
    pub model: Option<String>,
    /// Hub revision of --model: branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Print one JSON object (what was written) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Replace an existing output (built beside it, swapped in at the end).
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args)]
pub struct MergeArgs {
    /// A local transformers directory or a Hub repo id.
    #[command(flatten)]
    pub model: ModelSpec,
    /// The adapter directory (any method).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The output directory (a transformers checkpoint).
    #[arg(long)]
    pub out: PathBuf,
    /// Print one JSON object (what was written) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Replace an existing output (built beside it, swapped in at the end).
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args)]
pub struct TrainArgs {
    /// The run config (see configs/).
    #[arg(long, short, required_unless_present = "resume")]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. --set optim.lr=1e-4 --set seed=2 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// No progress: neither the bar on a terminal nor the progress lines in a log.
    #[arg(long)]
    pub quiet: bool,
    /// Continue the run in this directory from its newest checkpoint (the config defaults to
    /// the run's own config.toml).
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "overwrite")]
    pub resume: Option<PathBuf>,
    /// Replace a finished or checkpointed run in output_dir instead of refusing (its
    /// checkpoints, adapter and eval/ results go).
    #[arg(long)]
    pub overwrite: bool,
    /// Compute device: auto, cpu, cuda or cuda:N (overrides the config's `device`).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Compute dtype of the base (overrides the config's `model.dtype`; auto: bf16 on a GPU,
    /// f32 on the CPU).
    #[arg(long, value_parser = choices::<ComputeDtype>(ComputeDtype::NAMES))]
    pub dtype: Option<ComputeDtype>,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The base model a command runs, and the adapter on it.
#[derive(Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pub spec: ModelSpec,
    /// An adapter directory (adapter_config.json + adapter_model.safetensors), any method.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Another tokenizer than the model's: a tokenizer.json, a directory holding one, a preset
    /// or a Hub repo id.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// How conversations and prompts become text: tulu (open-instruct's, what prolora trains
    /// in by default), model (the model's own chat template) or none (the plain text, for a
    /// base model).
    #[arg(long, default_value = "tulu", value_parser = choices::<ChatFormat>(ChatFormat::NAMES))]
    pub chat_format: ChatFormat,
    /// Compute dtype (auto: bf16 on a GPU, f32 on the CPU).
    #[arg(long, default_value = "auto", value_parser = choices::<ComputeDtype>(ComputeDtype::NAMES))]
    pub dtype: ComputeDtype,
    /// Storage of the block linears (nf4: 4-bit, as bitsandbytes; quantized while loading).
    #[arg(long, default_value = "none", value_parser = choices::<Storage>(Storage::NAMES))]
    pub quantize: Storage,
    /// With --quantize nf4: also quantize the block scales (double quantization).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub double_quant: bool,
    /// Compute device: auto (CUDA when built with it and a GPU is present), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
}

#[derive(Args)]
pub struct EvaluateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// mmlu, gsm, bbh, tydiqa, humaneval, or all (comma-separated for several).
    #[arg(long, default_value = "all")]
    pub benchmark: String,
    /// A finished run directory: its adapter is evaluated and the results go to RUN/eval/.
    #[arg(long, conflicts_with = "adapter")]
    pub run: Option<PathBuf>,
    /// open-instruct's evaluation data layout (mmlu/, gsm/, bbh/, tydiqa/, codex_humaneval/).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Whose evaluation scripts to follow: paper (the PRoLoRA authors' copy: MMLU's cue "The
    /// answer is ") or open-instruct (commit 65c6f406: "The answer is:"); nothing else differs.
    #[arg(long, value_enum, default_value = "paper")]
    pub protocol: crate::evaluate::Protocol,
    /// A quick look: the first N examples of each subject / task / language, in file order. Not
    /// the reference's subset; for that, --max-examples.
    #[arg(long, conflicts_with = "max_examples", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub limit: Option<usize>,
    /// The reference's own seeded subset, drawn as its flag draws it (the numbers its scripts
    /// pass in brackets): MMLU --n_instances (N per subject), GSM --max_num_examples (N; 200),
    /// BBH --max_num_examples_per_task (N per task; 40), TyDi QA --max_num_examples_per_lang (N
    /// per language; 100), HumanEval --max_num_examples (N).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_examples: Option<usize>,
    /// Prompts decoded together.
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub batch_size: usize,
    /// New tokens per answer (default per benchmark: GSM and BBH 512, TyDi QA 50, HumanEval 512).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_new_tokens: Option<usize>,
    /// HumanEval's sampling temperature (default 0.1, the paper's pass@1; 0 is greedy).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// HumanEval: completions per problem (default 20); pass@10 is reported from 10 up (the
    /// paper's pass@10 setting: --samples 20 --temperature 0.8).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub samples: Option<usize>,
    /// Few-shot exemplars (defaults: MMLU 0, GSM 8, BBH 3, TyDi QA 1; HumanEval has none and
    /// refuses it). Below 8, GSM's are drawn as the reference draws them.
    #[arg(long)]
    pub shots: Option<usize>,
    /// Run HumanEval's model-written code (sandboxed python3 subprocesses).
    #[arg(long)]
    pub allow_code_execution: bool,
    /// The sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the results (one JSON object; with several benchmarks, one per benchmark keyed by name).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an existing --out or RUN/eval/<benchmark>.json.
    #[arg(long)]
    pub overwrite: bool,
    /// With --run: evaluate only the benchmarks whose RUN/eval results are missing or were made
    /// by another evaluation (another model, adapter, --quantize, --dtype or option), replacing
    /// those (what `sweep --evaluate` runs on each point).
    #[arg(long, requires = "run")]
    pub update: bool,
    /// Print the results as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

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

/// A flag that takes one of `names`, listed in `--help` and in the error.
fn choices<T: std::str::FromStr + Clone + Send + Sync + 'static>(
    names: &'static [&'static str],
) -> impl clap::builder::TypedValueParser<Value = T> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(names).map(|s| {
        s.parse::<T>()
            .unwrap_or_else(|_| unreachable!("{s} is a listed name"))
    })
}

/// Machine output: one JSON object on stdout.
fn print_json(v: serde_json::Value) {
    crate::to_stdout!("{v}");
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => train(a),
        Command::Eval(a) => eval(a),
        Command::Generate(a) => generate(a),
        Command::Evaluate(a) => evaluate(a),
        Command::Plot(a) => {
            // Checked before the runs are searched (an existing --out is the first thing to
            // hear about) and again against the files of the runs found in a folder.
            let check = |dirs: &mut dyn Iterator<Item = &Path>| {
                let read: Vec<PathBuf> = dirs
                    .flat_map(|r| [r.join(CONFIG_FILE), r.join(METRICS_FILE)])
                    .collect();
                let inputs: Vec<&Path> = read.iter().map(PathBuf::as_path).collect();
                atomic::check_output(&a.out, "--out", &inputs, a.overwrite)
            };
            check(&mut a.runs.iter().map(PathBuf::as_path))?;
            let runs = crate::plot::runs_named(&a.runs)?;
            check(&mut runs.iter().map(|r| r.dir.as_path()))?;
            crate::plot::plot(&runs, &a.out)?;
            crate::to_stderr!("wrote {}", a.out.display());
            Ok(())
        }
        Command::Collect(a) => {
            crate::console::write_out(format_args!("{}", crate::collect::collect(&a.root, a.csv)?));
            Ok(())
        }
        Command::Data(DataCommand::Encode(a)) => data_encode(a),
        Command::Data(DataCommand::Inspect(a)) => data_inspect(a),
        Command::Data(DataCommand::Prepare(a)) => data_prepare(a),
        Command::Quantize(a) => quantize(a),
        Command::Params(a) => params(a),
        Command::Export(a) => export(a),
        Command::Merge(a) => merge(a),
        Command::Sweep(a) => sweep(a),
    }
}

/// The summary of a writing command: a line on stderr, or with `--json` the same as JSON on
/// stdout.
fn report_written(json: bool, text: String, value: serde_json::Value) {
    if json {
        print_json(value);
    } else {
        crate::to_stderr!("{text}");
    }
}

fn quantize(args: QuantizeArgs) -> Result<()> {
    let source = ModelSource::resolve(&args.model.model, &args.model.revision)?;
    atomic::check_output(&args.out, "--out", &local_dirs(&source), args.overwrite)?;
    let s = crate::quantize::quantize_model(&source, &args.out, args.double_quant)?;
    report_written(
        args.json,
        format!(
            "wrote {} tensors ({:.1} MiB) to {}",
            s.tensors,
            s.bytes as f64 / (1 << 20) as f64,
            args.out.display()
        ),
        json!({"out": args.out, "tensors": s.tensors, "bytes": s.bytes}),
    );
    Ok(())
}

fn params(args: ParamsArgs) -> Result<()> {
    if args.paper_tables {
        crate::console::write_out(format_args!("{}", crate::params::paper_tables()?));
        return Ok(());
    }
    let (Some(model), Some(method)) = (&args.model, &args.method) else {
        bail!("--model and --method are required (or pass --paper-tables)");
    };
    let cfg =
        crate::params::adapter_config(method, args.rank, args.targets.clone(), &args.overrides)?;
    let (name, shapes) = ModelSource::resolve_shapes(model, &args.revision)?;
    let report = crate::params::report(&name, &shapes, &cfg)?;
    if args.json {
        print_json(report);
    } else {
        crate::to_stdout!("{}", crate::params::describe(&report));
    }
    Ok(())
}

/// The base model an adapter was trained on: `--model`, else its recorded base.
fn base_of(model: &Option<String>, adapter: &Path) -> Result<String> {
    match model.clone().or_else(|| peft::base_model_of(adapter)) {
        Some(m) => Ok(m),
        None => bail!(
            "{}: no base_model_name_or_path in adapter_config.json; pass --model",
            adapter.display()
        ),
    }
}

fn export(args: ExportArgs) -> Result<()> {
    let model = base_of(&args.model, &args.adapter)?;
    let source = ModelSource::resolve(&model, &args.revision)?;
    let mut inputs = local_dirs(&source);
    inputs.push(&args.adapter);
    atomic::check_output(&args.out, "--out", &inputs, args.overwrite)?;
    match args.format {
        ExportFormat::PeftLora => {
            crate::export::export_peft_lora(&args.adapter, &source.config, &model, &args.out)?
        }
    }
    report_written(
        args.json,
        format!("{} adapter written to {}", args.format, args.out.display()),
        json!({"out": args.out, "format": args.format}),
    );
    Ok(())
}

/// The largest preset `merge` writes out whole (tiny is 32 MiB).
const MAX_PRESET_MERGE_BYTES: f64 = 1024.0 * 1024.0 * 1024.0;

fn merge(args: MergeArgs) -> Result<()> {
    let source = ModelSource::resolve(&args.model.model, &args.model.revision)?;
    match &source.origin {
        Origin::Dir(dir) => {
            atomic::check_output(&args.out, "--out", &[dir, &args.adapter], args.overwrite)?;
            crate::export::merge(dir, &source.config, &args.adapter, &args.out)?;
        }
        Origin::Gguf(path) => bail!(
            "--model {}: merge writes a safetensors checkpoint from a safetensors base; for \
             llama.cpp, export the adapter itself (prolora export --format gguf-lora) and load \
             it with the GGUF, or merge into the checkpoint the GGUF was converted from",
            path.display()
        ),
        Origin::Preset(name) => {
            // A small preset is written out whole first, so merge can be tried offline; a
            // large one's random weights are not worth gigabytes of disk.
            let bytes = crate::train::memory::estimate(
                &source.config,
                candle_core::DType::F32,
                Quantization::None,
                0,
                None,
                false,
            )
            .total();
            if bytes > MAX_PRESET_MERGE_BYTES {
                bail!(
                    "--model {name}: a preset of random weights ({:.1} GiB in f32) is not worth \
                     merging; pass a model directory or Hub id (tiny merges, for a try)",
                    bytes / f64::from(1u32 << 30)
                );
            }
            atomic::check_output(&args.out, "--out", &[&args.adapter], args.overwrite)?;
            let base = std::env::temp_dir().join(format!(
                "prolora-merge-base-{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            std::fs::create_dir(&base)
                .with_context(|| format!("cannot create {}", base.display()))?;
            let merged = crate::quantize::write_preset(&source, &base).and_then(|_| {
                crate::export::merge(&base, &source.config, &args.adapter, &args.out)
            });
            let removed = std::fs::remove_dir_all(&base)
                .with_context(|| format!("cannot remove {}", base.display()));
            merged?;
            removed?;
        }
    }
    report_written(
        args.json,
        format!("merged model written to {}", args.out.display()),
        json!({"out": args.out}),
    );
    Ok(())
}

fn train(mut args: TrainArgs) -> Result<()> {
    // As `--set model.dtype=…`: recorded in the run's config.toml, and held to it on --resume.
    if let Some(dtype) = args.dtype {
        args.overrides
            .push(format!("model.dtype=\"{}\"", dtype.name()));
    }
    let (mut cfg, start) = match &args.resume {
        Some(run_dir) => {
            let saved = run_dir.join(CONFIG_FILE);
            let path = match (&args.config, saved.exists()) {
                (Some(path), _) => path.clone(),
                (None, true) => saved.clone(),
                (None, false) => bail!(
                    "--resume {}: no config.toml there (the run never started); pass --config \
                     with the run's config",
                    run_dir.display()
                ),
            };
            let mut cfg = RunConfig::load(&path, &args.overrides)?;
            cfg.output_dir = std::path::absolute(run_dir)
                .unwrap_or_else(|_| run_dir.clone())
                .display()
                .to_string();
            if saved.exists() {
                let previous = RunConfig::load(&saved, &[])?;
                if let Some(key) = cfg.first_difference(&previous) {
                    bail!(
                        "--resume {}: the config differs from the run's config.toml at `{key}`; resume with the same settings",
                        run_dir.display()
                    );
                }
            }
            (cfg, Start::Resume)
        }
        None => {
            let path = args
                .config
                .as_ref()
                .expect("clap requires --config without --resume");
            let start = if args.overwrite {
                Start::Overwrite
            } else {
                Start::Fresh
            };
            (RunConfig::load(path, &args.overrides)?, start)
        }
    };
    if let Some(device) = args.device {
        cfg.device = device;
    }
    let s = crate::train::train(&cfg, start, !args.quiet)?;
    if s.already_finished {
        report_written(
            args.json,
            format!(
                "{} already finished ({} steps); nothing to do",
                s.run_dir.display(),
                s.steps
            ),
            json!({"run_dir": s.run_dir, "steps": s.steps, "already_finished": true}),
        );
        return Ok(());
    }
    report_written(
        args.json,
        format!(
            "done: {} steps, loss {:.4} → {:.4}{}; adapter in {}",
            s.steps,
            s.first_loss,
            s.last_loss,
            s.final_eval_loss
                .map(|l| format!(", eval loss {l:.4}"))
                .unwrap_or_default(),
            s.run_dir.display()
        ),
        json!({"run_dir": s.run_dir, "steps": s.steps, "first_loss": s.first_loss,
               "last_loss": s.last_loss, "eval_loss": s.final_eval_loss}),
    );
    Ok(())
}

/// The base model with the adapter (if any) attached, and its chat encoder.
fn load_model(args: &ModelArgs) -> Result<(crate::model::Llama, ChatEncoder)> {
    load_model_from(
        &ModelSource::resolve(&args.spec.model, &args.spec.revision)?,
        args,
        &crate::device::open(args.device)?,
    )
}

/// The same from the already resolved `source`, on the already opened `device`.
fn load_model_from(
    source: &ModelSource,
    args: &ModelArgs,
    device: &candle_core::Device,
) -> Result<(crate::model::Llama, ChatEncoder)> {
    let encoder = ChatEncoder::new(
        source.tokenizer(args.tokenizer.as_deref())?,
        args.chat_format,
    )?;
    encoder.check_fits(source.config.vocab_size)?;
    let quant = Quantization::new(args.quantize, args.double_quant);
    let mut model = source.load_quantized(args.dtype.on(device), quant, device)?;
    if let Some(dir) = &args.adapter {
        peft::load_into(dir, &mut model)?;
    }
    Ok((model, encoder))
}

fn eval(args: EvalArgs) -> Result<()> {
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

fn generate(args: GenerateArgs) -> Result<()> {
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
    let source = ModelSource::resolve(&args.model.spec.model, &args.model.spec.revision)?;
    let Some(file) = &args.prompts else {
        let device = crate::device::open(args.model.device)?;
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
    let device = crate::device::open(args.model.device)?;
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

fn evaluate(mut args: EvaluateArgs) -> Result<()> {
    use crate::evaluate as ev;
    let mut benchmarks = ev::parse_benchmarks(&args.benchmark, "--benchmark")?;
    if let Some(t) = args.temperature.filter(|t| !(t.is_finite() && *t >= 0.0)) {
        bail!("--temperature {t}: must be finite and ≥ 0 (0 is greedy)");
    }
    let options = ev::Options {
        data_dir: args.data_dir.clone(),
        protocol: args.protocol,
        limit: args.limit,
        max_examples: args.max_examples,
        batch_size: args.batch_size,
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        samples: args.samples,
        shots: args.shots,
        chat_format: args.model.chat_format,
        allow_code_execution: args.allow_code_execution,
        seed: args.seed,
    };
    if benchmarks.iter().any(|b| b == "humaneval") {
        ev::humaneval::refuse_shots(&options)?;
        ev::humaneval::check_code_execution(&options)?;
    }
    let mut outputs: Vec<(String, PathBuf)> = Vec::new();
    let mut held: Vec<crate::lock::Lock> = Vec::new();
    if let Some(run) = &args.run {
        if !run.join("adapter_model.safetensors").exists() {
            bail!(
                "--run {}: no adapter_model.safetensors; is the run finished?",
                run.display()
            );
        }
        // The base it was trained on, which is what it should be evaluated on.
        if let Ok(cfg) =
            crate::config::RunConfig::load(&run.join(crate::train::run_dir::CONFIG_FILE), &[])
        {
            let m = &cfg.model;
            if m.source != args.model.spec.model || m.quantize != args.model.quantize {
                crate::to_stderr!(
                    "warning: {} was trained on --model {} --quantize {}; evaluating on --model {} --quantize {}",
                    run.display(), m.source, m.quantize, args.model.spec.model, args.model.quantize
                );
            }
            if cfg.data.chat_format != args.model.chat_format {
                crate::to_stderr!(
                    "warning: {} was trained in --chat-format {}; evaluating in --chat-format {}",
                    run.display(),
                    cfg.data.chat_format,
                    args.model.chat_format
                );
            }
        }
        // Held to the end: no `train` replaces the adapter while it is evaluated.
        held.push(crate::train::run_dir::lock_for_evaluation(run)?);
        args.model.adapter = Some(run.clone());
        for b in &benchmarks {
            outputs.push((b.clone(), run.join("eval").join(format!("{b}.json"))));
        }
    }
    let source = ModelSource::resolve(&args.model.spec.model, &args.model.spec.revision)?;
    if let Some(out) = &args.out {
        let mut inputs = model_inputs(&source, &args.model);
        inputs.push(&args.data_dir);
        // Apart from the inputs before its lock file is made beside it.
        atomic::check_apart(out, "--out", &inputs)?;
        held.push(ev::writer::hold(out, "--out")?);
        atomic::check_output(out, "--out", &inputs, args.overwrite)?;
    }
    let device = crate::device::open(args.model.device)?;
    let identity = ev::identity::Identity::new(
        &ev::identity::Loading {
            source: &source,
            tokenizer: args.model.tokenizer.as_deref(),
            adapter: args.model.adapter.as_deref(),
            quantize: args.model.quantize.name(),
            double_quant: args.model.double_quant,
            dtype: args.model.dtype.on(&device),
        },
        &options,
    )?;
    if args.update {
        outputs.retain(|(_, path)| {
            let current = identity.is_recorded_in(path);
            if current {
                crate::to_stderr!("{}: made by this same evaluation; kept", path.display());
            }
            !current
        });
        benchmarks.retain(|b| outputs.iter().any(|(name, _)| name == b));
        if benchmarks.is_empty() {
            return Ok(());
        }
    }
    for (_, path) in &outputs {
        held.push(ev::writer::hold(path, "the results file")?);
        atomic::check_output(path, "the results file", &[], args.overwrite || args.update)?;
    }
    let (model, encoder) = load_model_from(&source, &args.model, &device)?;
    let mut engine = ev::Engine::new(&model, &encoder, args.batch_size);
    let mut all = serde_json::Map::new();
    for b in &benchmarks {
        let started = std::time::Instant::now();
        // Completions are kept beside the results file as they are made, for a rerun to use.
        let results = outputs
            .iter()
            .find(|(name, _)| name == b)
            .map(|(_, p)| p.clone());
        let partial = match (&results, &args.out) {
            (Some(path), _) => Some(path.with_extension("partial.jsonl")),
            (None, Some(out)) => Some(PathBuf::from(format!(
                "{}.{b}.partial.jsonl",
                out.display()
            ))),
            (None, None) => None,
        };
        if let Some(p) = &partial {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
        }
        engine.journal = partial
            .as_deref()
            .map(|p| ev::journal::Journal::open(p, &identity))
            .transpose()?;
        let mut result = ev::run(b, &mut engine, &options)?;
        identity.record(&mut result);
        result["seconds"] = json!(started.elapsed().as_secs_f64());
        if let Some((_, path)) = outputs.iter().find(|(name, _)| name == b) {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            atomic::write(path, serde_json::to_string_pretty(&result)?.as_bytes())?;
            crate::to_stderr!("wrote {}", path.display());
        }
        if !args.json {
            crate::to_stdout!(
                "{b} ({} examples, {:.1} s)",
                result["examples"].as_array().map_or(0, Vec::len),
                started.elapsed().as_secs_f64()
            );
            print_metrics(&result["metrics"], "  ");
        }
        all.insert(b.clone(), result);
        // Rewritten after every benchmark, so an interruption keeps the finished ones.
        if let Some(out) = &args.out {
            atomic::write(
                out,
                serde_json::to_string_pretty(&results_of(&all, benchmarks.len()))?.as_bytes(),
            )?;
        }
        if let Some(journal) = engine.journal.take() {
            journal.finish()?;
        }
    }
    let value = results_of(&all, benchmarks.len());
    if let Some(out) = &args.out {
        crate::to_stderr!("wrote {}", out.display());
    }
    if !args.json && matches!(source.origin, Origin::Preset(_)) {
        crate::to_stdout!(
            "note: --model {} has random weights, so scores of 0 are expected: this shows the \
             benchmarks run end to end, not what an adapter learned (use a real model for that)",
            args.model.spec.model
        );
    }
    if args.json {
        crate::to_stdout!("{value}");
    }
    Ok(())
}

/// The results object: one benchmark's, or one per benchmark keyed by name.
fn results_of(all: &serde_json::Map<String, serde_json::Value>, asked: usize) -> serde_json::Value {
    match (asked, all.values().next()) {
        (1, Some(one)) => one.clone(),
        _ => serde_json::Value::Object(all.clone()),
    }
}

/// Metrics as indented `name value` lines.
fn print_metrics(v: &serde_json::Value, indent: &str) {
    if let serde_json::Value::Object(m) = v {
        for (k, v) in m {
            match v {
                serde_json::Value::Object(_) => {
                    crate::to_stdout!("{indent}{k}");
                    print_metrics(v, &format!("{indent}  "));
                }
                v => crate::to_stdout!(
                    "{indent}{k:<40} {}",
                    v.as_f64().map_or(v.to_string(), |x| format!("{x:.4}"))
                ),
            }
        }
    }
}

/// A chat of an optional system message and one user message.
fn chat(system: Option<String>, prompt: String) -> Vec<Message> {
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

/// What a model command reads from disk: the model's directory, the adapter, a tokenizer file.
fn model_inputs<'a>(source: &'a ModelSource, args: &'a ModelArgs) -> Vec<&'a Path> {
    let mut inputs = local_dirs(source);
    inputs.extend(args.adapter.as_deref());
    inputs.extend(
        args.tokenizer
            .as_deref()
            .map(Path::new)
            .filter(|t| t.exists()),
    );
    inputs
}

/// The local directories a model is read from (none for a preset).
fn local_dirs(source: &ModelSource) -> Vec<&Path> {
    match &source.origin {
        Origin::Dir(dir) | Origin::Gguf(dir) => vec![dir.as_path()],
        Origin::Preset(_) => Vec::new(),
    }
}

/// Writes a data command's output: `-` streams to stdout; a file is checked against the
/// inputs and written atomically.
fn write_output<T>(
    out: &Path,
    inputs: &[&Path],
    overwrite: bool,
    write: impl FnOnce(&mut dyn Write) -> Result<T>,
) -> Result<T> {
    if out == Path::new("-") {
        let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
        let value = write(&mut stdout)?;
        stdout.flush().context("cannot write to stdout")?;
        return Ok(value);
    }
    atomic::check_output(out, "--out", inputs, overwrite)?;
    atomic::write_with(out, |w| write(w))
}

fn data_encoder(input: &DataInput) -> Result<ChatEncoder> {
    ChatEncoder::new(
        source::tokenizer(&input.tokenizer, "main")?,
        input.chat_format,
    )
}

fn data_options(input: &DataInput) -> Result<LoadOptions> {
    if input.max_seq_len < 2 {
        bail!("--max-seq-len must be at least 2");
    }
    Ok(LoadOptions {
        max_seq_len: input.max_seq_len,
        skip_invalid: input.skip_invalid,
        cache_dir: None,
    })
}

fn data_encode(args: EncodeArgs) -> Result<()> {
    if args.json && args.out.as_os_str() == "-" {
        bail!(
            "--json with --out -: the summary would be mixed into the data on stdout; write the \
             data to a file, or drop --json (the summary then goes to stderr)"
        );
    }
    let encoder = data_encoder(&args.input)?;
    let opts = data_options(&args.input)?;
    let tokenizer = Path::new(&args.input.tokenizer);
    let mut inputs = vec![args.input.data.as_path()];
    if tokenizer.exists() {
        inputs.push(tokenizer);
    }
    let report = write_output(&args.out, &inputs, args.overwrite, |out| {
        encode_file(&encoder, &args.input.data, &opts, |e| {
            let line = json!({"input_ids": e.input_ids, "labels": e.labels});
            writeln!(out, "{line}").with_context(|| format!("cannot write {}", args.out.display()))
        })
    })?;
    report_written(
        args.json,
        format!("{} → {}", report.summary(), args.out.display()),
        json!({"out": args.out, "report": report}),
    );
    Ok(())
}

fn data_inspect(args: InspectArgs) -> Result<()> {
    let encoder = data_encoder(&args.input)?;
    let opts = data_options(&args.input)?;
    let marks = if std::io::stdout().is_terminal() {
        &inspect::ANSI
    } else {
        &inspect::PLAIN
    };
    let (mut lengths, mut labels) = (Vec::new(), Vec::new());
    let mut shown = 0;
    let report = encode_file(&encoder, &args.input.data, &opts, |e| {
        if shown < args.n {
            shown += 1;
            let note = if e.num_trained() == 0 {
                ", dropped: no label token"
            } else {
                ""
            };
            crate::to_stdout!(
                "── example {shown}: {} tokens, {} trained on{note} ──\n{}\n",
                e.input_ids.len(),
                e.num_trained(),
                inspect::render(&encoder, &e, marks)?
            );
        }
        if e.num_trained() > 0 {
            lengths.push(e.input_ids.len());
            labels.push(e.num_trained());
        }
        Ok(())
    })?;
    crate::to_stdout!(
        "{} (max {} tokens; trained-on text is {}…{})",
        args.input.data.display(),
        opts.max_seq_len,
        marks.open,
        marks.close
    );
    crate::console::write_out(format_args!(
        "{}",
        inspect::statistics(&report, &mut lengths, &mut labels)
    ));
    Ok(())
}

fn data_prepare(args: PrepareArgs) -> Result<()> {
    let report = write_output(&args.out, &[&args.input], args.overwrite, |mut out| {
        prepare(
            args.format,
            &args.input,
            &mut out,
            args.seed,
            args.skip_invalid,
        )
    })?;
    report_written(
        args.json,
        format!(
            "wrote {} examples to {}{}",
            report.written,
            args.out.display(),
            if report.skipped.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} bad records skipped, listed above)",
                    report.skipped.len()
                )
            }
        ),
        json!({"out": args.out, "written": report.written, "skipped": report.skipped}),
    );
    Ok(())
}

fn sweep(args: SweepArgs) -> Result<()> {
    use crate::sweep::{local, slurm, status, Sweep};
    match args.action {
        Some(SweepAction::Status { dir, json }) => {
            let sweep = Sweep::read(&dir)?;
            let statuses = status::of(&dir, &sweep);
            if json {
                crate::to_stdout!("{}", status::json(&statuses));
            } else {
                crate::console::write_out(format_args!("{}", status::table(&statuses)));
                if let Some(job) = &sweep.slurm_job {
                    match slurm::queue(job) {
                        Some(lines) if lines.is_empty() => {
                            crate::to_stdout!("slurm job {job}: no task queued or running")
                        }
                        Some(lines) => crate::to_stdout!("slurm job {job}:\n{}", lines.join("\n")),
                        None => crate::to_stdout!("slurm job {job} (squeue not available here)"),
                    }
                }
            }
            return Ok(());
        }
        Some(SweepAction::Task { dir, index, quiet }) => {
            let index = match index {
                Some(i) => i,
                None => std::env::var("SLURM_ARRAY_TASK_ID")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "sweep task: pass --index (or run it as a Slurm array task)"
                        )
                    })?,
            };
            return crate::sweep::run_task(&dir, index, !quiet);
        }
        None => {}
    }
    let (config, out) = (
        args.config.expect("clap requires --config"),
        args.out.expect("clap requires --out"),
    );
    let slurm_args = slurm::split_args(&args.slurm_args)?;
    if args.backend == Backend::Local && !slurm_args.is_empty() {
        bail!("--slurm-args applies to --backend slurm only");
    }
    let mut plan = Sweep::plan(&config, &args.overrides, args.grid, &out)?;
    if let Some(benchmarks) = &args.evaluate {
        plan.evaluate = Some(crate::sweep::Evaluation::new(
            benchmarks,
            args.eval_data_dir.clone(),
            args.allow_code_execution,
        )?);
    }
    if args.dry_run {
        for p in &plan.points {
            crate::to_stdout!(
                "{}\t{}\t{}",
                p.index,
                p.overrides.join(" "),
                p.run_dir.display()
            );
        }
        if args.backend == Backend::Slurm {
            let exe = std::env::current_exe()?;
            crate::console::write_out(format_args!(
                "{}",
                slurm::array_script(&plan, &std::path::absolute(&out)?, &exe, &slurm_args)?
            ));
        }
        return Ok(());
    }
    let _owner = crate::sweep::own(&out)?;
    let mut sweep = plan.open(&out)?;
    let dir = std::path::absolute(&out)?;
    match args.backend {
        Backend::Local => {
            let gpus = crate::device::gpu_count();
            let jobs = args.jobs.unwrap_or(gpus.max(1));
            local::run(&dir, &sweep, jobs, gpus)?;
            crate::to_stderr!(
                "sweep done: `prolora collect {}` for the table",
                dir.display()
            );
        }
        Backend::Slurm => {
            if args.jobs.is_some() {
                bail!("--jobs applies to --backend local only (Slurm runs the tasks as it schedules them)");
            }
            if let Some(job) = &sweep.slurm_job {
                if slurm::queue(job).is_some_and(|lines| !lines.is_empty()) {
                    crate::to_stderr!("{}: job {job} is still queued or running; `prolora sweep status {}` follows it", dir.display(), dir.display());
                    return Ok(());
                }
            }
            let job = slurm::submit(&sweep, &dir, &slurm_args)?;
            sweep.slurm_job = Some(job.clone());
            sweep.write(&dir)?;
            crate::to_stdout!("{job}");
            crate::to_stderr!(
                "submitted job {job}: {} array tasks; `prolora sweep status {}` follows them",
                sweep.points.len(),
                dir.display()
            );
        }
    }
    Ok(())
}
