//! The trainer as a recipe: [`train`] sets up (device, data, run directory, model with
//! adapters, optimizer, resume) and [`Trainer::run`] loops: batch → forward → loss → backward
//! (accumulated over micro-batches) → clip → AdamW step → log / evaluate / checkpoint.

use super::checkpoint::{self, TrainerState};
use super::memory;
use super::optim::{clip_factor, AdamW, AdamWParams};
use super::run_dir::{Metrics, RunDir, Start};
use super::schedule::{linear_with_warmup, warmup_steps};
use super::step::{accumulate_grads, Grads};
use crate::adapters::{adapter_dtype, peft, AdapterSet};
use crate::atomic;
use crate::config::{OnNonFinite, RunConfig};
use crate::ctx::{mix_seed, Ctx};
use crate::data::batch::{split_eval, Batcher};
use crate::data::chat::{ChatEncoder, Encoded};
use crate::data::dataset::{default_cache_dir, file_sha256, load, DataReport, LoadOptions};
use crate::eval::evaluate;
use crate::gguf;
use crate::model::Llama;
use crate::progress::Progress;
use crate::signals::{self, Interrupted};
use crate::source::ModelSource;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a finished run reports.
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    pub final_eval_loss: Option<f64>,
    /// A `--resume` found the run already finished and did nothing.
    pub already_finished: bool,
}

/// Trains the adapter `cfg` describes, starting as `start` says.
pub fn train(cfg: &RunConfig, start: Start, show_progress: bool) -> Result<TrainSummary> {
    // The run directory must not be (or hold, or lie in) anything the run reads.
    let model_dir = Path::new(&cfg.model.source);
    let mut inputs = vec![Path::new(&cfg.data.train)];
    inputs.extend(cfg.data.eval.as_deref().map(Path::new));
    inputs.extend(cfg.adapter.init_from.as_deref().map(Path::new));
    inputs.extend(model_dir.exists().then_some(model_dir));
    atomic::check_apart(Path::new(&cfg.output_dir), "output_dir", &inputs)?;
    // Everything that can be checked here is, before a model download: the data files are
    // there, and the adapter fits the shapes (for a Hub id, from its config.json alone).
    for (key, file) in std::iter::once(("data.train", &cfg.data.train))
        .chain(cfg.data.eval.iter().map(|f| ("data.eval", f)))
    {
        std::fs::File::open(file).with_context(|| format!("{key}: data file {file}"))?;
        if Path::new(file).is_dir() {
            bail!("{key}: data file {file} is a directory; give a chat jsonl file");
        }
    }
    let (_, shapes) = ModelSource::resolve_shapes(&cfg.model.source, &cfg.model.revision)
        .context("model.source")?;
    let trainable = cfg.adapter.param_count(&shapes)?;
    let device = crate::device::open(cfg.device)?;
    let dtype = cfg.model.dtype.on(&device);
    // A GGUF base keeps its quantized linears in their blocks on the CPU.
    let gguf = Path::new(&cfg.model.source);
    let stored_linears = if gguf::is_gguf(gguf) && device.is_cpu() {
        let file = gguf::GgufFile::open(gguf).context("model.source")?;
        Some(gguf::weights::block_linear_bytes(
            &file,
            dtype.size_in_bytes(),
        ))
    } else {
        None
    };
    let need = |pass| {
        let checkpointing = cfg.train.gradient_checkpointing;
        memory::estimate(
            &shapes,
            dtype,
            cfg.model.quantization(),
            stored_linears,
            trainable,
            pass,
            checkpointing,
        )
    };
    // The base alone must fit before it is downloaded.
    memory::check(cfg, &need(None), &device, None)?;
    let source =
        ModelSource::resolve(&cfg.model.source, &cfg.model.revision).context("model.source")?;
    let tokenizer = match cfg.model.tokenizer.as_deref() {
        Some(spec) => source.tokenizer(Some(spec)).context("model.tokenizer")?,
        None => source.tokenizer(None)?,
    };
    let encoder = ChatEncoder::new(tokenizer, cfg.data.chat_format).context("data.chat_format")?;
    encoder.check_fits(source.config.vocab_size)?;
    // Data before the model: a bad line should not wait for a 13 GB load.
    let data = Data::load(cfg, &encoder)?;
    let pass = data.largest_pass(cfg.train.micro_batch_size());
    let estimate = need(Some(pass));
    memory::check(cfg, &estimate, &device, Some(pass))?;
    crate::to_stderr!("{}", memory::describe(&estimate, &device));
    let run = RunDir::open(Path::new(&cfg.output_dir), start)?;
    if start == Start::Resume && run.is_finished(cfg.train.steps)? {
        // Resuming a finished run changes nothing.
        return Ok(TrainSummary {
            run_dir: run.path().to_path_buf(),
            steps: cfg.train.steps,
            first_loss: f64::NAN,
            last_loss: f64::NAN,
            final_eval_loss: None,
            already_finished: true,
        });
    }
    let fingerprints = data_fingerprints(cfg)?;
    if run.resume_from().is_some() {
        run.check_unchanged(&fingerprints)?;
    }
    Trainer::setup(cfg, &source, &device, &data, run, &fingerprints)?.run(show_progress)
}

/// file → sha256 of every data file the run reads.
fn data_fingerprints(cfg: &RunConfig) -> Result<serde_json::Value> {
    let mut map = serde_json::Map::new();
    for file in std::iter::once(&cfg.data.train).chain(&cfg.data.eval) {
        map.insert(file.clone(), file_sha256(Path::new(file))?.into());
    }
    Ok(map.into())
}

/// The training and held-out examples, and what loading them reported.
struct Data {
    train: Vec<Encoded>,
    eval: Option<Vec<Encoded>>,
    reports: Vec<DataReport>,
}

impl Data {
    /// The largest forward pass of training: a micro-batch of the longest examples.
    fn largest_pass(&self, micro_batch: usize) -> memory::Pass {
        memory::Pass {
            batch: micro_batch.min(self.train.len()).max(1),
            seq_len: self
                .train
                .iter()
                .map(|e| e.input_ids.len())
                .max()
                .unwrap_or(1),
            labels: self
                .train
                .iter()
                .map(Encoded::num_trained)
                .max()
                .unwrap_or(1),
        }
    }

    fn load(cfg: &RunConfig, encoder: &ChatEncoder) -> Result<Self> {
        let (train, report) = load_split(encoder, Path::new(&cfg.data.train), cfg)?;
        let mut reports = vec![report];
        let (train, eval) = match &cfg.data.eval {
            Some(p) => {
                let (eval, report) = load_split(encoder, Path::new(p), cfg)?;
                reports.push(report);
                (train, Some(eval))
            }
            None if cfg.data.eval_size > 0 => {
                let (train, eval) = split_eval(train, cfg.data.eval_size, cfg.data.eval_seed)?;
                (train, Some(eval))
            }
            None => (train, None),
        };
        Ok(Self {
            train,
            eval,
            reports,
        })
    }
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
    crate::to_stderr!("{}", report.summary());
    Ok((examples, report))
}

/// Everything the loop touches.
struct Trainer<'a> {
    cfg: &'a RunConfig,
    data: &'a Data,
    base_model: String,
    device: Device,
    model: Llama,
    adapters: AdapterSet,
    vars: Vec<Var>,
    optimizer: AdamW,
    batches: Batcher<'a>,
    state: TrainerState,
    run: RunDir,
    metrics: Metrics,
    /// The step of the newest checkpoint this process wrote.
    saved_step: Option<usize>,
}

/// One optimizer step's gradients, before the update.
struct StepResult {
    grads: Grads,
    loss: f64,
    grad_norm: f64,
    clip_scale: f64,
    label_tokens: usize,
    tokens: usize,
}

impl<'a> Trainer<'a> {
    fn setup(
        cfg: &'a RunConfig,
        source: &ModelSource,
        device: &Device,
        data: &'a Data,
        run: RunDir,
        fingerprints: &serde_json::Value,
    ) -> Result<Self> {
        let (model, adapters) = setup_model(cfg, source, device)?;
        let named = adapters.trainable();
        let vars: Vec<Var> = named.iter().map(|(_, v, _)| v.clone()).collect();
        let [beta1, beta2] = cfg.optim.betas;
        let mut optimizer = AdamW::new(
            named,
            AdamWParams {
                beta1,
                beta2,
                eps: cfg.optim.eps,
                weight_decay: cfg.optim.weight_decay,
            },
        );
        let mut batches = Batcher::with_grad_accum(
            &data.train,
            cfg.train.micro_batch_size(),
            cfg.train.grad_accum(),
            cfg.seed,
        )
        .with_order(cfg.data.order);
        let mut state = TrainerState::default();
        if let Some(dir) = run.resume_from() {
            state = checkpoint::load(dir, &adapters, &mut optimizer)?;
            batches.skip_to(state.samples_consumed);
            crate::to_stderr!("resuming from {} (step {})", dir.display(), state.step);
        }
        let trainable: usize = vars.iter().map(|v| v.elem_count()).sum();
        let resumed = run.resume_from().is_some();
        run.write_header(
            cfg,
            &json!({
                "version": env!("CARGO_PKG_VERSION"),
                "command": std::env::args().collect::<Vec<_>>(),
                "resumed_from_step": resumed.then_some(state.step),
                "trainable_parameters": trainable,
                "device": crate::device::describe(device),
            }),
            fingerprints,
        )?;
        let mut metrics = run.metrics(resumed.then_some(state.step))?;
        if !resumed {
            // What the data loading kept, dropped and skipped, line by line.
            run.write_data_report(&data.reports)?;
            for r in &data.reports {
                metrics.log(json!({"step": 0, "data": r.file, "examples": r.examples,
                    "truncated": r.truncated, "dropped": r.dropped,
                    "skipped_lines": r.skipped.len()}))?;
            }
        }
        crate::to_stderr!(
            "training {} adapter ({trainable} parameters) on {} ({} examples) for {} steps of {} examples → {}",
            cfg.adapter.kind(),
            source.name(),
            data.train.len(),
            cfg.train.steps,
            cfg.train.batch_size,
            run.path().display()
        );
        Ok(Self {
            cfg,
            data,
            base_model: source.name(),
            device: device.clone(),
            model,
            adapters,
            vars,
            optimizer,
            batches,
            state,
            run,
            metrics,
            saved_step: None,
        })
    }

    fn run(mut self, show_progress: bool) -> Result<TrainSummary> {
        let (cfg, total) = (self.cfg, self.cfg.train.steps);
        let mut progress = Progress::new(
            show_progress,
            "step",
            total,
            self.state.step,
            cfg.train.log_every.max(1),
        );
        if self.run.resume_from().is_none() {
            self.evaluate(0, &progress)?; // the starting point: what the adapter improves on
        }
        let warmup = warmup_steps(cfg.optim.warmup_ratio, total);
        let started = Instant::now();
        let mut tokens_seen = 0;
        let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
        let stop_signals = signals::catch_stop_signals();
        for step in self.state.step..total {
            if let Some(signal) = signals::requested() {
                progress.finish();
                return Err(self.stop(signal)?.into());
            }
            let lr = linear_with_warmup(cfg.optim.lr, step, total, warmup);
            let s = self.forward_backward(step)?;
            self.state.step = step + 1;
            self.state.samples_consumed = self.batches.consumed();
            tokens_seen += s.tokens;
            if !s.loss.is_finite() || !s.grad_norm.is_finite() {
                if cfg.train.on_nonfinite == OnNonFinite::Skip {
                    self.metrics.log(json!({"step": step + 1, "skipped": true,
                        "loss": s.loss.to_string(), "grad_norm": s.grad_norm.to_string()}))?;
                    progress.advance(1, format!("skipped (loss {})", s.loss));
                    continue;
                }
                bail!(
                    "step {}: loss {}, gradient norm {}: stopping ({}); {}, or set \
                     train.on_nonfinite = \"skip\" to skip such steps",
                    step + 1,
                    s.loss,
                    s.grad_norm,
                    self.run.kept_checkpoint()?,
                    nonfinite_causes(cfg)
                );
            }
            self.optimizer.step(&s.grads, lr, s.clip_scale)?;
            self.state.optimizer_updates = self.optimizer.steps_taken();

            if first_loss.is_nan() {
                first_loss = s.loss;
            }
            last_loss = s.loss;
            let elapsed = started.elapsed().as_secs_f64();
            let tokens_per_s = tokens_seen as f64 / elapsed.max(1e-9);
            progress.advance(
                1,
                format!("loss {:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s", s.loss),
            );
            let last = step + 1 == total;
            if (step + 1) % cfg.train.log_every.max(1) == 0 || last {
                self.metrics.log(json!({
                    "step": step + 1,
                    "loss": s.loss,
                    "lr": lr,
                    "grad_norm": s.grad_norm,
                    "label_tokens": s.label_tokens,
                    "tokens_per_s": tokens_per_s,
                    "epoch": self.batches.epoch,
                    "elapsed_s": elapsed,
                    "peak_rss_mib": peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64),
                    "peak_device_mib": crate::device::peak_memory_mib(&self.device),
                }))?;
            }
            if due(cfg.train.eval_every, step + 1) && !last {
                self.evaluate(step + 1, &progress)?;
            }
            if due(cfg.train.save_every(), step + 1) && !last {
                self.save_checkpoint()?;
            }
        }
        progress.finish();
        drop(stop_signals); // from here on the run ends by itself

        let final_eval_loss = self.evaluate(total, &progress)?;
        self.save_checkpoint()?;
        self.run.save_adapter(&self.adapters, &self.base_model)?;
        let skipped: usize = self.data.reports.iter().map(|r| r.skipped.len()).sum();
        if skipped > 0 {
            crate::to_stderr!(
                "skipped {skipped} invalid lines (listed in {})",
                self.run.data_report_path().display()
            );
        }
        Ok(TrainSummary {
            run_dir: self.run.path().to_path_buf(),
            steps: total,
            first_loss,
            last_loss,
            final_eval_loss,
            already_finished: false,
        })
    }

    /// Forward and backward over every micro-batch of `step`, gradients accumulated, and the
    /// clipping factor. The step's loss is the mean over all its label tokens.
    fn forward_backward(&mut self, step: usize) -> Result<StepResult> {
        let micro_batches = self.batches.next_step();
        let label_tokens: usize = micro_batches.iter().map(|b| b.label_tokens()).sum();
        let mut grads: Grads = vec![None; self.vars.len()];
        let (mut loss_sum, mut tokens) = (0.0, 0);
        for (k, batch) in micro_batches.iter().enumerate() {
            // Masks are a function of (seed, step, micro-batch): resume needs no RNG state.
            let ctx = Ctx::train(mix_seed(mix_seed(self.cfg.seed, step as u64), k as u64));
            let (sum, _) = accumulate_grads(
                &self.model,
                batch,
                &ctx,
                &self.vars,
                label_tokens as f64,
                self.cfg.train.gradient_checkpointing,
                &mut grads,
            )
            .map_err(crate::device::explain)?;
            loss_sum += sum;
            tokens += batch.tokens();
        }
        let (grad_norm, clip_scale) = clip_factor(&grads, self.cfg.optim.max_grad_norm)?;
        Ok(StepResult {
            grads,
            loss: loss_sum / label_tokens as f64,
            grad_norm,
            clip_scale,
            label_tokens,
            tokens,
        })
    }

    /// The held-out loss at `step`, logged and shown (None without held-out data).
    fn evaluate(&mut self, step: usize, progress: &Progress) -> Result<Option<f64>> {
        let Some(eval_set) = &self.data.eval else {
            return Ok(None);
        };
        let (loss, tokens) = evaluate(&self.model, eval_set, self.cfg.train.micro_batch_size())?;
        self.metrics
            .log(json!({"step": step, "eval_loss": loss, "eval_tokens": tokens}))?;
        progress.line(format!(
            "step {step}/{} eval loss {loss:.4}",
            self.cfg.train.steps
        ));
        if !loss.is_finite() {
            bail!(
                "eval loss {loss} after step {step}: the adapter is no longer finite, stopping ({}); {}",
                self.run.kept_checkpoint()?,
                nonfinite_causes(self.cfg)
            );
        }
        Ok(Some(loss))
    }

    fn save_checkpoint(&mut self) -> Result<()> {
        self.run.save_checkpoint(
            &self.adapters,
            &self.base_model,
            &self.optimizer,
            &self.state,
            self.cfg.train.keep_last,
        )?;
        self.saved_step = Some(self.state.step);
        Ok(())
    }

    /// After a stop signal, between two steps: the checkpoint of the steps done, and how to
    /// continue.
    fn stop(&mut self, signal: i32) -> Result<Interrupted> {
        if self.saved_step != Some(self.state.step) {
            self.save_checkpoint()?;
        }
        let dir = self.run.path().display();
        Ok(Interrupted {
            signal,
            message: format!(
                "stopped by {} after step {} of {}: checkpoint written in {dir}/checkpoints; \
                 continue with `prolora train --resume {dir}`",
                signals::name(signal),
                self.state.step,
                self.cfg.train.steps
            ),
        })
    }
}

/// The base model with fresh adapters attached (or ones started from `adapter.init_from`).
fn setup_model(
    cfg: &RunConfig,
    source: &ModelSource,
    device: &Device,
) -> Result<(Llama, AdapterSet)> {
    let dtype = cfg.model.dtype.on(device);
    let mut model = source.load_quantized(dtype, cfg.model.quantization(), device)?;
    let mut init_rng = StdRng::seed_from_u64(cfg.seed);
    let adapters = AdapterSet::new(
        &cfg.adapter,
        &model.cfg,
        adapter_dtype(dtype),
        device,
        &mut init_rng,
    )?;
    adapters.attach_to(&mut model);
    if let Some(dir) = &cfg.adapter.init_from {
        // The config decides the method and its training knobs (dropout); the saved adapter
        // only its starting values, which must fit tensor for tensor.
        let dir = Path::new(dir);
        if let Some(alpha) = peft::alpha_of(dir).map_err(|e| e.context("adapter.init_from"))? {
            if alpha != cfg.adapter.alpha {
                bail!(
                    "adapter.init_from: {} has lora_alpha {alpha}, the config adapter.alpha {}; make them equal",
                    dir.join(peft::CONFIG_FILE).display(),
                    cfg.adapter.alpha
                );
            }
        }
        peft::restore_values(&dir.join(peft::WEIGHTS_FILE), &adapters)?;
    }
    Ok((model, adapters))
}

/// What makes a loss non-finite, the most likely first, with this run's values.
fn nonfinite_causes(cfg: &RunConfig) -> String {
    let mut causes = vec![format!(
        "the learning rate is too high (lower optim.lr = {:e})",
        cfg.optim.lr
    )];
    if cfg.optim.eps == 0.0 {
        causes.push(
            "optim.eps = 0 divides 0 by 0 for a parameter whose gradient is zero (PyTorch's default is 1e-8)"
                .into(),
        );
    }
    if cfg.model.dtype == crate::device::ComputeDtype::F16 {
        causes.push("f16 overflows (set model.dtype = \"bf16\" or \"f32\")".into());
    }
    if cfg.optim.max_grad_norm == 0.0 {
        causes.push("no gradient clipping (optim.max_grad_norm = 0; the paper uses 0.3)".into());
    }
    causes.push("a damaged or extreme training example (check the data)".into());
    format!("likely causes, most likely first: {}", causes.join("; "))
}

/// Whether a periodic action with period `every` (0: never) falls on `step`.
fn due(every: usize, step: usize) -> bool {
    every > 0 && step.is_multiple_of(every)
}

/// Peak resident memory of this process so far (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
