//! The training loop, top to bottom: data → model + adapters → (micro-batches: forward → loss →
//! backward, accumulated → clip → AdamW → schedule) × steps → checkpoints and the run directory.

use super::checkpoint::{self, TrainerState};
use super::optim::{clip_factor, AdamW, AdamWParams};
use super::schedule::{linear_with_warmup, warmup_steps};
use super::step::{accumulate_grads, Grads};
use crate::adapters::{adapter_dtype, peft, AdapterSet};
use crate::atomic;
use crate::config::RunConfig;
use crate::ctx::{mix_seed, Ctx};
use crate::data::batch::{split_eval, Batcher, Order};
use crate::data::chat::{ChatEncoder, Encoded};
use crate::data::dataset::{default_cache_dir, load, DataReport, LoadOptions};
use crate::eval::evaluate;
use crate::source::{self, ModelSource};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How `train` treats an existing run directory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Start {
    /// A new run; an existing finished or checkpointed run in the directory is an error.
    Fresh,
    /// A new run that replaces whatever the directory holds.
    Overwrite,
    /// Continue from the newest checkpoint in the directory.
    Resume,
}

/// What a finished run reports.
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    pub final_eval_loss: Option<f64>,
}

/// Encodes a `messages` jsonl file (streamed, cached), failing when nothing trainable is left.
fn load_split(
    encoder: &ChatEncoder,
    path: &Path,
    cfg: &RunConfig,
) -> Result<(Vec<Encoded>, DataReport)> {
    let opts = LoadOptions {
        max_seq_len: cfg.data.max_seq_len,
        skip_invalid: cfg.data.skip_invalid,
        cache_dir: cfg.data.cache.then(default_cache_dir).flatten(),
    };
    let (examples, report) = load(encoder, path, &opts)?;
    eprintln!("{}", report.summary());
    Ok((examples, report))
}

/// An adapter used as a starting point must have been trained with the same scaling.
fn check_init_alpha(dir: &Path, alpha: f64) -> Result<()> {
    let path = dir.join(peft::CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("adapter.init_from: cannot read {}", path.display()))?;
    let saved: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    match saved["lora_alpha"].as_f64() {
        Some(a) if a != alpha => bail!(
            "adapter.init_from: {} has lora_alpha {a}, the config adapter.alpha {alpha}; make them equal",
            path.display()
        ),
        _ => Ok(()),
    }
}

/// Peak resident memory of this process so far (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Checks the run directory against `start` and returns the checkpoint to resume from.
fn prepare_run_dir(run_dir: &Path, start: Start) -> Result<Option<PathBuf>> {
    let checkpoints = checkpoint::list(run_dir)?;
    let finished = run_dir.join(peft::WEIGHTS_FILE).exists();
    match start {
        Start::Resume => match checkpoints.last() {
            Some((_, dir)) => Ok(Some(dir.clone())),
            None => bail!(
                "--resume: {} has no checkpoint to resume from (train.save_every writes them)",
                run_dir.display()
            ),
        },
        Start::Fresh if finished || !checkpoints.is_empty() => bail!(
            "{} already holds a run: pass --resume to continue it, --overwrite to replace it, \
             or choose another output_dir (--set output_dir=…)",
            run_dir.display()
        ),
        Start::Overwrite => {
            for stale in [
                run_dir.join("checkpoints"),
                run_dir.join(peft::WEIGHTS_FILE),
            ] {
                if stale.is_dir() {
                    std::fs::remove_dir_all(&stale)?;
                } else if stale.exists() {
                    std::fs::remove_file(&stale)?;
                }
            }
            Ok(None)
        }
        Start::Fresh => Ok(None),
    }
}

/// Keeps the metrics lines of steps up to `step` (a resumed run rewrites what came after).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    atomic::write(path, kept.as_bytes())
}

pub fn train(cfg: &RunConfig, start: Start, show_progress: bool) -> Result<TrainSummary> {
    let device = crate::device::open(&cfg.device)?;
    let dtype = source::compute_dtype(&cfg.model.dtype, &device)?;
    let model_source = ModelSource::resolve(&cfg.model.source, &cfg.model.revision)?;
    let tokenizer = model_source.tokenizer(cfg.model.tokenizer.as_deref().map(Path::new))?;
    let encoder = ChatEncoder::new(tokenizer)?;
    // The adapter must fit the model's shapes: say so before any data or weights are read.
    cfg.adapter.param_count(&model_source.config)?;

    // Data before the model: a bad line should not wait for a 13 GB load.
    let (train_set, train_report) = load_split(&encoder, Path::new(&cfg.data.train), cfg)?;
    let mut reports = vec![train_report];
    let (train_set, eval_set) = match &cfg.data.eval {
        Some(p) => {
            let (eval, report) = load_split(&encoder, Path::new(p), cfg)?;
            reports.push(report);
            (train_set, Some(eval))
        }
        None if cfg.data.eval_size > 0 => {
            let (train, eval) = split_eval(train_set, cfg.data.eval_size, cfg.data.eval_seed)?;
            (train, Some(eval))
        }
        None => (train_set, None),
    };

    let run_dir = PathBuf::from(&cfg.output_dir);
    let resume_from = prepare_run_dir(&run_dir, start)?;

    let mut model = model_source.load_quantized(dtype, cfg.model.quantization()?, &device)?;
    let mut init_rng = StdRng::seed_from_u64(cfg.seed);
    let adapters = AdapterSet::new(
        &cfg.adapter,
        &model.cfg,
        adapter_dtype(dtype),
        &device,
        &mut init_rng,
    )?;
    adapters.attach_to(&mut model);
    if let Some(dir) = &cfg.adapter.init_from {
        // The config decides the method and its training knobs (dropout); the saved adapter
        // only its starting values, which must fit tensor for tensor.
        let dir = Path::new(dir);
        check_init_alpha(dir, cfg.adapter.alpha)?;
        peft::restore_values(&dir.join(peft::WEIGHTS_FILE), &adapters)?;
    }
    let named = adapters.trainable();
    let vars: Vec<_> = named.iter().map(|(_, v, _)| v.clone()).collect();
    let trainable: usize = vars.iter().map(|v| v.elem_count()).sum();

    let [beta1, beta2] = cfg.optim.betas;
    let mut optimizer = AdamW::new(
        named.clone(),
        AdamWParams {
            beta1,
            beta2,
            eps: cfg.optim.eps,
            weight_decay: cfg.optim.weight_decay,
        },
    );
    let micro = cfg.train.micro_batch_size();
    let mut batches = Batcher::with_grad_accum(&train_set, micro, cfg.train.grad_accum(), cfg.seed)
        .with_order(Order::parse(&cfg.data.order)?);
    let mut state = TrainerState {
        step: 0,
        samples_consumed: 0,
        optimizer_updates: 0,
    };
    if let Some(dir) = &resume_from {
        state = checkpoint::load(dir, &adapters, &mut optimizer)?;
        batches.skip_to(state.samples_consumed);
        eprintln!("resuming from {} (step {})", dir.display(), state.step);
    }

    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create run directory {}", run_dir.display()))?;
    atomic::write(&run_dir.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    let run_info = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "command": std::env::args().collect::<Vec<_>>(),
        "resumed_from_step": resume_from.as_ref().map(|_| state.step),
        "trainable_parameters": trainable,
        "device": crate::device::describe(&device),
    });
    atomic::write(
        &run_dir.join("run.json"),
        serde_json::to_string_pretty(&run_info)?.as_bytes(),
    )?;
    let metrics_path = run_dir.join("metrics.jsonl");
    if resume_from.is_some() {
        truncate_metrics(&metrics_path, state.step)?;
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .truncate(false)
        .open(&metrics_path)
        .with_context(|| format!("cannot write {}", metrics_path.display()))?;
    if resume_from.is_none() {
        metrics.set_len(0)?;
    }
    let mut log = |line: serde_json::Value| -> Result<()> {
        writeln!(metrics, "{line}")
            .with_context(|| format!("cannot write {}", metrics_path.display()))
    };

    if resume_from.is_none() {
        // What the data loading kept, dropped and skipped, line by line.
        atomic::write(
            &run_dir.join("data_report.json"),
            serde_json::to_string_pretty(&reports)?.as_bytes(),
        )?;
        for r in &reports {
            log(
                json!({"step": 0, "data": r.file, "examples": r.examples, "truncated": r.truncated,
                       "dropped": r.dropped, "skipped_lines": r.skipped.len()}),
            )?;
        }
    }

    let total = cfg.train.steps;
    eprintln!(
        "training {} adapter ({trainable} parameters) on {} ({} examples) for {} steps of {} examples → {}",
        cfg.adapter.kind(),
        model_source.name(),
        train_set.len(),
        total,
        cfg.train.batch_size,
        run_dir.display()
    );

    if let (Some(eval_set), None) = (&eval_set, &resume_from) {
        // The starting point: what the adapter improves on.
        let (eval_loss, eval_tokens) = evaluate(&model, eval_set, micro)?;
        log(json!({"step": 0, "eval_loss": eval_loss, "eval_tokens": eval_tokens}))?;
    }

    let bar = if show_progress {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .expect("a valid template"),
    );
    bar.set_position(state.step as u64);

    let save = |state: &TrainerState, optimizer: &AdamW| {
        checkpoint::save(
            &run_dir,
            &adapters,
            &model_source.name(),
            optimizer,
            state,
            cfg.train.keep_last,
        )
    };
    let warmup = warmup_steps(cfg.optim.warmup_ratio, total);
    let started = Instant::now();
    let mut tokens_seen = 0usize;
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    for step in state.step..total {
        let lr = linear_with_warmup(cfg.optim.lr, step, total, warmup);
        let micro_batches = batches.next_step();
        // The loss of the step is the mean over all its label tokens, across micro-batches.
        let label_tokens: usize = micro_batches.iter().map(|b| b.label_tokens()).sum();
        let mut grads: Grads = vec![None; vars.len()];
        let mut loss_sum = 0.0;
        for (k, batch) in micro_batches.iter().enumerate() {
            let ctx = Ctx::train(mix_seed(mix_seed(cfg.seed, step as u64), k as u64));
            let (sum, _) = accumulate_grads(
                &model,
                batch,
                &ctx,
                &vars,
                label_tokens as f64,
                cfg.train.gradient_checkpointing,
                &mut grads,
            )
            .map_err(crate::device::explain)?;
            loss_sum += sum;
            tokens_seen += batch.tokens();
        }
        let loss = loss_sum / label_tokens as f64;
        let (grad_norm, scale) = clip_factor(&grads, cfg.optim.max_grad_norm)?;
        state.step = step + 1;
        state.samples_consumed = batches.consumed();
        if !loss.is_finite() || !grad_norm.is_finite() {
            if cfg.train.on_nonfinite == "skip" {
                log(
                    json!({"step": step + 1, "skipped": true, "loss": loss.to_string(), "grad_norm": grad_norm.to_string()}),
                )?;
                bar.inc(1);
                continue;
            }
            let kept = checkpoint::list(&run_dir)?
                .last()
                .map(|(s, _)| format!("the checkpoint of step {s} is kept"))
                .unwrap_or_else(|| "no checkpoint was written yet".into());
            bail!(
                "step {}: loss {loss}, gradient norm {grad_norm}: stopping ({kept}); lower optim.lr, \
                 check the data, or set train.on_nonfinite = \"skip\"",
                step + 1
            );
        }
        optimizer.step(&grads, lr, scale)?;
        state.optimizer_updates = optimizer.steps_taken();

        if first_loss.is_nan() {
            first_loss = loss;
        }
        last_loss = loss;
        let elapsed = started.elapsed().as_secs_f64();
        let tokens_per_s = tokens_seen as f64 / elapsed.max(1e-9);
        bar.set_message(format!(
            "loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s"
        ));
        bar.inc(1);
        if (step + 1) % cfg.train.log_every.max(1) == 0 || step + 1 == total {
            log(json!({
                "step": step + 1,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "label_tokens": label_tokens,
                "tokens_per_s": tokens_per_s,
                "epoch": batches.epoch,
                "elapsed_s": elapsed,
                "peak_rss_mib": peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64),
                "peak_device_mib": crate::device::peak_memory_mib(&device),
            }))?;
        }
        if let Some(eval_set) = &eval_set {
            let every = cfg.train.eval_every;
            if every > 0 && (step + 1) % every == 0 && step + 1 != total {
                let (eval_loss, eval_tokens) = evaluate(&model, eval_set, micro)?;
                log(json!({"step": step + 1, "eval_loss": eval_loss, "eval_tokens": eval_tokens}))?;
            }
        }
        let every = cfg.train.save_every;
        if every > 0 && (step + 1) % every == 0 && step + 1 != total {
            save(&state, &optimizer)?;
        }
    }
    bar.finish();

    let final_eval_loss = match &eval_set {
        Some(eval_set) => {
            let (eval_loss, eval_tokens) = evaluate(&model, eval_set, micro)?;
            log(json!({"step": total, "eval_loss": eval_loss, "eval_tokens": eval_tokens}))?;
            Some(eval_loss)
        }
        None => None,
    };
    save(&state, &optimizer)?;
    peft::save(&run_dir, &adapters, &model_source.name())?;
    let skipped: usize = reports.iter().map(|r| r.skipped.len()).sum();
    if skipped > 0 {
        eprintln!(
            "skipped {skipped} invalid lines (listed in {})",
            run_dir.join("data_report.json").display()
        );
    }
    Ok(TrainSummary {
        run_dir,
        steps: total,
        first_loss,
        last_loss,
        final_eval_loss,
    })
}
