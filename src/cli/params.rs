//! `prolora params`: exact trainable-parameter counts from the shapes alone.

use super::print_json;
use crate::source::ModelSource;
use anyhow::{bail, Result};
use clap::Args;

#[derive(Args)]
pub struct ParamsArgs {
    /// A preset (tiny, llama2-7b, llama2-13b, llama2-70b), a local directory, a GGUF file or a
    /// Hub repo id.
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

pub(super) fn run(args: ParamsArgs) -> Result<()> {
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
