//! `prolora data prepare|encode|inspect`: instruction data.

use super::{choices, report_written};
use crate::atomic;
use crate::data::chat::{ChatEncoder, ChatFormat};
use crate::data::convert::{prepare, Format};
use crate::data::dataset::{encode_file, LoadOptions};
use crate::data::inspect;
use crate::source;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use std::io::IsTerminal;
use std::io::Write;
use std::path::{Path, PathBuf};

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
    /// A tokenizer.json (with its tokenizer_config.json beside it), a GGUF file, a directory
    /// holding a tokenizer.json, a preset or a Hub repo id.
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

/// Writes a data command's output: `-` streams to stdout; a file is checked against the
/// inputs and written atomically.
pub(super) fn write_output<T>(
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

pub(super) fn data_encoder(input: &DataInput) -> Result<ChatEncoder> {
    ChatEncoder::new(
        source::tokenizer(&input.tokenizer, "main")?,
        input.chat_format,
    )
}

pub(super) fn data_options(input: &DataInput) -> Result<LoadOptions> {
    if input.max_seq_len < 2 {
        bail!("--max-seq-len must be at least 2");
    }
    Ok(LoadOptions {
        max_seq_len: input.max_seq_len,
        skip_invalid: input.skip_invalid,
        cache_dir: None,
    })
}

pub(super) fn run_encode(args: EncodeArgs) -> Result<()> {
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

pub(super) fn run_inspect(args: InspectArgs) -> Result<()> {
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

pub(super) fn run_prepare(args: PrepareArgs) -> Result<()> {
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
