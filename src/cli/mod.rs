//! The command line: one subcommand per user verb.
//! Each command is one file: its arguments beside its handler.

mod collect;
mod data;
mod eval;
mod evaluate;
mod export;
mod generate;
mod merge;
mod model;
mod params;
mod plot;
mod quantize;
mod sweep;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};
use collect::CollectArgs;
use data::DataCommand;
use eval::EvalArgs;
use evaluate::EvaluateArgs;
use export::ExportArgs;
use generate::GenerateArgs;
use merge::MergeArgs;
use params::ParamsArgs;
use plot::PlotArgs;
use quantize::QuantizeArgs;
use sweep::SweepArgs;
use train::TrainArgs;

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
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Evaluate(a) => evaluate::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Collect(a) => collect::run(a),
        Command::Data(DataCommand::Encode(a)) => data::run_encode(a),
        Command::Data(DataCommand::Inspect(a)) => data::run_inspect(a),
        Command::Data(DataCommand::Prepare(a)) => data::run_prepare(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Params(a) => params::run(a),
        Command::Export(a) => export::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Sweep(a) => sweep::run(a),
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
