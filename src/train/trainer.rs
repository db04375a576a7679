//! The training loop, top to bottom: data → model + adapters → (forward → loss → backward →
//! clip → AdamW → schedule) × steps → run directory.

use super::optim::{clip_factor, AdamW, AdamWParams};
use super::schedule::{linear_with_warmup, warmup_steps};
use crate::adapters::{peft, Ctx};
use crate::config::RunConfig;
use crate::data::batch::{split_eval, Batcher};
use crate::data::chat::{ChatEncoder, Encoded};
use crate::data::dataset::{default_cache_dir, load, DataReport, LoadOptions};
use crate::eval::evaluate;
use crate::loss::step_loss_and_grads;
use crate::source::{self, ModelSource};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

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

pub fn train(cfg: &RunConfig, show_progress: bool) -> Result<TrainSummary> {
    let device = source::device()?;
    let dtype = source::parse_dtype(&cfg.model.dtype)?;
    let model_source = ModelSource::resolve(&cfg.model.source, &cfg.model.revision)?;
    let tokenizer = model_source.tokenizer(cfg.model.tokenizer.as_deref().map(Path::new))?;
    let encoder = ChatEncoder::new(tokenizer)?;

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

    let mut model = model_source.load(dtype, &device)?;
    let adapter_dtype = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let mut init_rng = StdRng::seed_from_u64(cfg.seed);
    model.attach(|_, module, shape| {
        if cfg.adapter.targets.iter().any(|t| t == module) {
            Ok(Some(cfg.adapter.build(
                shape,
                adapter_dtype,
                &device,
                &mut init_rng,
            )?))
        } else {
            Ok(None)
        }
    })?;
    let vars: Vec<_> = model.trainable().into_iter().map(|(_, v)| v).collect();
    let trainable: usize = vars.iter().map(|v| v.elem_count()).sum();

    let run_dir = PathBuf::from(&cfg.output_dir);
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create run directory {}", run_dir.display()))?;
    peft::write_atomic(&run_dir.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&metrics_path)
        .with_context(|| format!("cannot write {}", metrics_path.display()))?;
    let mut log = |line: serde_json::Value| -> Result<()> {
        writeln!(metrics, "{line}")
            .with_context(|| format!("cannot write {}", metrics_path.display()))
    };
    // What the data loading kept, dropped and skipped, line by line.
    peft::write_atomic(
        &run_dir.join("data_report.json"),
        serde_json::to_string_pretty(&reports)?.as_bytes(),
    )?;
    for r in &reports {
        log(
            json!({"step": 0, "data": r.file, "examples": r.examples, "truncated": r.truncated,
                   "dropped": r.dropped, "skipped_lines": r.skipped.len()}),
        )?;
    }

    eprintln!(
        "training {} adapter ({trainable} parameters) on {} ({} examples) for {} steps → {}",
        cfg.adapter.kind,
        model_source.name(),
        train_set.len(),
        cfg.train.steps,
        run_dir.display()
    );

    let [beta1, beta2] = cfg.optim.betas;
    let mut optimizer = AdamW::new(
        vars.clone(),
        AdamWParams {
            beta1,
            beta2,
            eps: cfg.optim.eps,
            weight_decay: cfg.optim.weight_decay,
        },
    )?;
    let total = cfg.train.steps;
    let warmup = warmup_steps(cfg.optim.warmup_ratio, total);
    let mut batches = Batcher::with_grad_accum(
        &train_set,
        cfg.train.micro_batch_size(),
        cfg.train.grad_accum(),
        cfg.seed,
    );
    let ctx = Ctx::train(cfg.seed.wrapping_add(1));

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

    if let Some(eval_set) = &eval_set {
        // The base model's loss: what the adapter improves on.
        let (eval_loss, eval_tokens) = evaluate(&model, eval_set, cfg.train.micro_batch_size())?;
        log(json!({"step": 0, "eval_loss": eval_loss, "eval_tokens": eval_tokens}))?;
    }

    let started = Instant::now();
    let mut tokens_seen = 0usize;
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    for step in 0..total {
        let lr = linear_with_warmup(cfg.optim.lr, step, total, warmup);
        let micro_batches = batches.next_step();
        let (loss, count, grads) = step_loss_and_grads(&model, &micro_batches, &ctx, &vars)?;
        let (grad_norm, scale) = clip_factor(&grads, &vars, cfg.optim.max_grad_norm)?;
        optimizer.step(&grads, lr, scale)?;
        let batch_tokens: usize = micro_batches.iter().map(|b| b.tokens()).sum();

        if !loss.is_finite() {
            bail!(
                "loss became {loss} at step {}: lower optim.lr or check the data",
                step + 1
            );
        }
        if step == 0 {
            first_loss = loss;
        }
        last_loss = loss;
        tokens_seen += batch_tokens;
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
                "label_tokens": count,
                "tokens": batch_tokens,
                "tokens_per_s": tokens_per_s,
                "epoch": batches.epoch,
                "elapsed_s": elapsed,
            }))?;
        }
        if let Some(eval_set) = &eval_set {
            let every = cfg.train.eval_every;
            if every > 0 && (step + 1) % every == 0 && step + 1 != total {
                let (eval_loss, eval_tokens) =
                    evaluate(&model, eval_set, cfg.train.micro_batch_size())?;
                log(json!({"step": step + 1, "eval_loss": eval_loss, "eval_tokens": eval_tokens}))?;
            }
        }
    }
    bar.finish();

    let final_eval_loss = match &eval_set {
        Some(eval_set) => {
            let (eval_loss, eval_tokens) =
                evaluate(&model, eval_set, cfg.train.micro_batch_size())?;
            log(json!({"step": total, "eval_loss": eval_loss, "eval_tokens": eval_tokens}))?;
            Some(eval_loss)
        }
        None => None,
    };
    peft::save(&run_dir, &model, &cfg.adapter, &model_source.name())?;
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
