//! `prolora collect`: a table of the runs under a directory.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct CollectArgs {
    /// A directory holding run directories (searched recursively).
    pub root: PathBuf,
    /// CSV instead of markdown.
    #[arg(long)]
    pub csv: bool,
}

pub(super) fn run(a: CollectArgs) -> Result<()> {
    crate::console::write_out(format_args!("{}", crate::collect::collect(&a.root, a.csv)?));
    Ok(())
}
