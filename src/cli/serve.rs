//! `prolora serve`: many adapters on one base behind an OpenAI-compatible API.

use super::model::BaseArgs;
use crate::data::chat::ChatEncoder;
use crate::model::nf4::Quantization;
use crate::serve::server::{serve, Options};
use crate::source::ModelSource;
use anyhow::{bail, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub base: BaseArgs,
    /// An adapter served as NAME (the API's `model`): NAME=DIR, repeatable.
    #[arg(long = "adapter", value_name = "NAME=DIR", value_parser = parse_named_adapter)]
    pub adapters: Vec<(String, PathBuf)>,
    /// Serve every adapter directory below DIR, named by its path under it; adapters may also
    /// be loaded from below it at run time (POST /v1/load_lora_adapter).
    #[arg(long, value_name = "DIR")]
    pub adapter_root: Option<PathBuf>,
    /// The address to listen on (only this machine by default).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port (0: any free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Rows decoded together.
    #[arg(long, default_value_t = 32, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    pub max_batch: usize,
    /// Requests waiting for a row; past it, 429 with Retry-After.
    #[arg(long, default_value_t = 256, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_queue: usize,
    /// Adapters kept in memory; the least recently used beyond it are dropped (and read again
    /// when asked for).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_loaded: Option<usize>,
    /// Positions a request may use, prompt and completion (default: the model's).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// The largest request body accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// After SIGTERM/SIGINT, seconds the requests in flight get to finish.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,
}

/// `NAME=DIR`.
fn parse_named_adapter(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
            Ok((name.to_string(), PathBuf::from(dir)))
        }
        _ => Err(format!("{s:?}: expected NAME=DIR")),
    }
}

/// Every adapter directory (holding adapter_config.json) below `root`, named by its path under
/// it ('/'-separated), at most 4 levels down.
fn adapters_below(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    fn walk(root: &Path, dir: &Path, depth: usize, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| anyhow::anyhow!("--adapter-root: cannot read {}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        entries.sort();
        for path in entries {
            if path.join(crate::adapters::peft::CONFIG_FILE).is_file() {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                let name: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push((name.join("/"), path));
            } else if depth < 4 {
                walk(root, &path, depth + 1, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, root, 1, &mut out)?;
    Ok(out)
}

pub(super) fn run(args: ServeArgs) -> Result<()> {
    args.base.apply();
    let source = ModelSource::resolve(&args.base.spec.model, &args.base.spec.revision)?;
    let base_name = args.base.spec.model.clone();
    let mut adapters = args.adapters.clone();
    if let Some(root) = &args.adapter_root {
        adapters.extend(adapters_below(root)?);
    }
    for (i, (name, _)) in adapters.iter().enumerate() {
        if *name == base_name || adapters[..i].iter().any(|(n, _)| n == name) {
            bail!("adapter name {name:?} is used twice (or is the base model's name); rename one");
        }
    }
    let options = Options {
        host: args.host.clone(),
        port: args.port,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        max_batch: args.max_batch,
        max_queue: args.max_queue,
        max_loaded: args.max_loaded,
        max_model_len: args.max_model_len,
        max_body: args.max_body_bytes,
        adapters,
        adapter_root: args.adapter_root.clone(),
        base_name,
        drain_timeout: Duration::from_secs(args.drain_timeout),
    };
    let (tokenizer, device, dtype) = (
        args.base.tokenizer.clone(),
        args.base.device,
        args.base.dtype,
    );
    let format = args.base.chat_format;
    let quant = Quantization::new(args.base.quantize, args.base.double_quant);
    serve(
        options,
        Box::new(move || {
            let device = crate::device::open(device)?;
            let encoder = ChatEncoder::new(source.tokenizer(tokenizer.as_deref())?, format)?;
            encoder.check_fits(source.config.vocab_size)?;
            let model = source.load_quantized(dtype.on(&device), quant, &device)?;
            Ok((model, encoder))
        }),
    )
}
