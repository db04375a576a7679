//! The training loop, top to bottom: data → model + adapters → (forward → loss → backward →
//! clip → AdamW → schedule) × steps → run directory.

use super::optim::{clip_factor, AdamW, AdamWParams};
use super::schedule::{linear_with_warmup, warmup_steps};
use crate::adapters::{adapter_dtype, peft, AdapterSet, Ctx};
use crate::config::RunConfig;
use crate::data::batch::Batcher;
use crate::data::chat::{encode_all, read_jsonl, ChatEncoder, Encoded};
use crate::eval::evaluate;
use crate::loss::summed_loss;
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

/// Encodes a `messages` jsonl file, failing when nothing trainable is left.
fn load_split(encoder: &ChatEncoder, path: &Path, max_seq_len: usize) -> Result<Vec<Encoded>> {
    let examples = read_jsonl(path)?;
    let (encoded, dropped) = encode_all(encoder, &examples, max_seq_len)?;
    if encoded.is_empty() {
        bail!(
            "{}: no example has an assistant token left after truncation to {max_seq_len} tokens \
             ({dropped} dropped); raise data.max_seq_len or check the data",
            path.display()
        );
    }
    if dropped > 0 {
        eprintln!(
            "{}: dropped {dropped} of {} examples with no label token after truncation",
            path.display(),
            examples.len()
        );
    }
    Ok(encoded)
}

pub fn train(cfg: &RunConfig, show_progress: bool) -> Result<TrainSummary> {
    let device = source::device()?;
    let dtype = source::parse_dtype(&cfg.model.dtype)?;
    let model_source = ModelSource::resolve(&cfg.model.source, &cfg.model.revision)?;
    let tokenizer = model_source.tokenizer(cfg.model.tokenizer.as_deref().map(Path::new))?;
    let encoder = ChatEncoder::new(tokenizer)?;

    // Data before the model: a bad line should not wait for a 13 GB load.
    let train_set = load_split(&encoder, Path::new(&cfg.data.train), cfg.data.max_seq_len)?;
    let eval_set = match &cfg.data.eval {
        Some(p) => Some(load_split(&encoder, Path::new(p), cfg.data.max_seq_len)?),
        None => None,
    };

    let mut model = model_source.load(dtype, &device)?;
    let mut init_rng = StdRng::seed_from_u64(cfg.seed);
    let adapters = AdapterSet::new(
        &cfg.adapter,
        &model.cfg,
        adapter_dtype(dtype),
        &device,
        &mut init_rng,
    )?;
    model.attach(&adapters);
    let named = adapters.trainable();
    let vars: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
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
        named
            .iter()
            .map(|(key, var)| (var.clone(), adapters.lr_scale(key)))
            .collect(),
        AdamWParams {
            beta1,
            beta2,
            eps: cfg.optim.eps,
            weight_decay: cfg.optim.weight_decay,
        },
    )?;
    let total = cfg.train.steps;
    let warmup = warmup_steps(cfg.optim.warmup_ratio, total);
    let mut batches = Batcher::new(&train_set, cfg.train.batch_size, cfg.seed);
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
        let (eval_loss, eval_tokens) = evaluate(&model, eval_set, cfg.train.batch_size)?;
        log(json!({"step": 0, "eval_loss": eval_loss, "eval_tokens": eval_tokens}))?;
    }

    let started = Instant::now();
    let mut tokens_seen = 0usize;
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    for step in 0..total {
        let lr = linear_with_warmup(cfg.optim.lr, step, total, warmup);
        let batch = batches.next_batch();
        let (sum, count) = summed_loss(&model, &batch, &ctx)?;
        let loss = (sum / count as f64)?;
        let grads = loss.backward()?;
        let (grad_norm, scale) = clip_factor(&grads, &vars, cfg.optim.max_grad_norm)?;
        optimizer.step(&grads, lr, scale)?;

        let loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
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
        tokens_seen += batch.tokens();
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
                "tokens": batch.tokens(),
                "tokens_per_s": tokens_per_s,
                "epoch": batches.epoch,
                "elapsed_s": elapsed,
            }))?;
        }
        if let Some(eval_set) = &eval_set {
            let every = cfg.train.eval_every;
            if every > 0 && (step + 1) % every == 0 && step + 1 != total {
                let (eval_loss, eval_tokens) = evaluate(&model, eval_set, cfg.train.batch_size)?;
                log(json!({"step": step + 1, "eval_loss": eval_loss, "eval_tokens": eval_tokens}))?;
            }
        }
    }
    bar.finish();

    let final_eval_loss = match &eval_set {
        Some(eval_set) => {
            let (eval_loss, eval_tokens) = evaluate(&model, eval_set, cfg.train.batch_size)?;
            log(json!({"step": total, "eval_loss": eval_loss, "eval_tokens": eval_tokens}))?;
            Some(eval_loss)
        }
        None => None,
    };
    peft::save(&run_dir, &adapters, &model_source.name())?;
    Ok(TrainSummary {
        run_dir,
        steps: total,
        first_loss,
        last_loss,
        final_eval_loss,
    })
}
