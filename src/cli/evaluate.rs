//! `prolora evaluate`: the paper's benchmarks, scored as open-instruct scores them.

use super::model::{load_model_from, model_inputs, ModelArgs};
use crate::atomic;
use crate::source::{ModelSource, Origin};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;

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

pub(super) fn run(mut args: EvaluateArgs) -> Result<()> {
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
        chat_format: args.model.base.chat_format,
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
            if m.source != args.model.base.spec.model || m.quantize != args.model.base.quantize {
                crate::to_stderr!(
                    "warning: {} was trained on --model {} --quantize {}; evaluating on --model {} --quantize {}",
                    run.display(), m.source, m.quantize, args.model.base.spec.model, args.model.base.quantize
                );
            }
            if cfg.data.chat_format != args.model.base.chat_format {
                crate::to_stderr!(
                    "warning: {} was trained in --chat-format {}; evaluating in --chat-format {}",
                    run.display(),
                    cfg.data.chat_format,
                    args.model.base.chat_format
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
    let source = ModelSource::resolve(&args.model.base.spec.model, &args.model.base.spec.revision)?;
    if let Some(out) = &args.out {
        let mut inputs = model_inputs(&source, &args.model);
        inputs.push(&args.data_dir);
        // Apart from the inputs before its lock file is made beside it.
        atomic::check_apart(out, "--out", &inputs)?;
        held.push(ev::writer::hold(out, "--out")?);
        atomic::check_output(out, "--out", &inputs, args.overwrite)?;
    }
    let device = crate::device::open(args.model.base.device)?;
    let identity = ev::identity::Identity::new(
        &ev::identity::Loading {
            source: &source,
            tokenizer: args.model.base.tokenizer.as_deref(),
            adapter: args.model.adapter.as_deref(),
            quantize: args.model.base.quantize.name(),
            double_quant: args.model.base.double_quant,
            dtype: args.model.base.dtype.on(&device),
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
            args.model.base.spec.model
        );
    }
    if args.json {
        crate::to_stdout!("{value}");
    }
    Ok(())
}

/// The results object: one benchmark's, or one per benchmark keyed by name.
pub(super) fn results_of(
    all: &serde_json::Map<String, serde_json::Value>,
    asked: usize,
) -> serde_json::Value {
    match (asked, all.values().next()) {
        (1, Some(one)) => one.clone(),
        _ => serde_json::Value::Object(all.clone()),
    }
}

/// Metrics as indented `name value` lines.
pub(super) fn print_metrics(v: &serde_json::Value, indent: &str) {
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
