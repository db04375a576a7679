//! `prolora evaluate`: the paper's benchmarks (MMLU, GSM, BBH, TyDi QA, HumanEval) as the
//! open-instruct evaluation scripts the paper ran build, score and name them, on our generation
//! engine. One file per benchmark; what they share is here.

pub mod bbh;
pub mod csv;
pub mod execute;
pub mod gsm;
pub mod humaneval;
pub mod identity;
pub mod journal;
pub mod mmlu;
pub mod np_random;
pub mod pass_at_k;
pub mod sandbox;
pub mod text;
pub mod tydiqa;
pub mod writer;

use crate::ctx::Ctx;
use crate::data::chat::ChatEncoder;
use crate::generate::{complete_batch, Completion, Request, Settings};
use crate::model::Llama;
use crate::progress::Progress;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// The benchmarks, in the paper's order.
pub const BENCHMARKS: [&str; 5] = ["mmlu", "gsm", "bbh", "tydiqa", "humaneval"];

/// `all` or a comma-separated list of benchmark names; `flag` names the option in the error.
pub fn parse_benchmarks(list: &str, flag: &str) -> Result<Vec<String>> {
    let names: Vec<String> = match list {
        "all" => BENCHMARKS.iter().map(|b| b.to_string()).collect(),
        list => list.split(',').map(|b| b.trim().to_string()).collect(),
    };
    if let Some(b) = names.iter().find(|b| !BENCHMARKS.contains(&b.as_str())) {
        bail!("{flag} {b:?}: one of {}, or all", BENCHMARKS.join(", "));
    }
    Ok(names)
}

/// Each benchmark's headline number as the paper's tables report it: the column, where the
/// results file holds it, and the scale to percent.
pub const HEADLINES: [(&str, &str, &str, f64); 5] = [
    ("mmlu", "MMLU (EM)", "/metrics/average_acc", 100.0),
    ("gsm", "GSM (EM)", "/metrics/exact_match", 100.0),
    ("bbh", "BBH (EM)", "/metrics/average_exact_match", 100.0),
    ("tydiqa", "TyDi QA (F1)", "/metrics/average/f1", 1.0),
    ("humaneval", "HumanEval (P@1)", "/metrics/pass@1", 100.0),
];

/// A run's results file for `benchmark`.
pub fn results_path(run: &Path, benchmark: &str) -> PathBuf {
    run.join("eval").join(format!("{benchmark}.json"))
}

pub use crate::data::chat::ChatFormat;

/// Whose evaluation scripts the prompts follow. They differ only in MMLU's answer cue.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// The PRoLoRA authors' copy of the scripts: MMLU's cue is "The answer is ".
    Paper,
    /// open-instruct at commit 65c6f406: MMLU's cue is "The answer is:".
    OpenInstruct,
}

impl Protocol {
    /// What follows the assistant tag in a chat-formatted MMLU prompt.
    pub fn mmlu_answer_cue(self) -> &'static str {
        match self {
            Protocol::Paper => "The answer is ",
            Protocol::OpenInstruct => "The answer is:",
        }
    }
}

/// Every knob of a run; `None` takes the benchmark's default (the paper's setting).
#[derive(Clone, Debug, Serialize)]
pub struct Options {
    pub data_dir: PathBuf,
    pub protocol: Protocol,
    /// The first N examples of each task (subject, task, language), in file order: a quick look,
    /// not the reference's subset.
    pub limit: Option<usize>,
    /// The reference's own seeded subset, as its flag for the benchmark draws it: MMLU
    /// `--n_instances` (per subject), GSM and HumanEval `--max_num_examples`, BBH
    /// `--max_num_examples_per_task`, TyDi QA `--max_num_examples_per_lang`.
    pub max_examples: Option<usize>,
    pub batch_size: usize,
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub samples: Option<usize>,
    pub shots: Option<usize>,
    pub chat_format: ChatFormat,
    pub allow_code_execution: bool,
    pub seed: u64,
}

/// One scored example as the results file holds it.
#[derive(Clone, Debug, Serialize)]
pub struct Example {
    pub id: String,
    /// The exact string given to the tokenizer (which adds BOS where its post-processor does,
    /// except to a model template's text, which holds its own special tokens).
    pub prompt: String,
    /// The decoded generation (empty for MMLU, which reads the next-token logits).
    pub output: String,
    pub prediction: String,
    pub gold: Value,
    pub correct: bool,
}

/// What a benchmark returns: its metrics named as the reference names them, and every example.
pub struct Scored {
    pub metrics: Value,
    pub examples: Vec<Example>,
    /// Settings the benchmark resolved (shots, new tokens, …).
    pub settings: Value,
}

/// The model and chat encoder a benchmark runs on, with the progress of the benchmark.
pub struct Engine<'a> {
    pub model: &'a Llama,
    pub encoder: &'a ChatEncoder,
    pub tokenizer: &'a Tokenizer,
    pub batch_size: usize,
    progress: Progress,
    examples: u64,
    tokens: u64,
    /// Where the current benchmark's completions are kept as they are made.
    pub journal: Option<journal::Journal>,
}

impl<'a> Engine<'a> {
    pub fn new(model: &'a Llama, encoder: &'a ChatEncoder, batch_size: usize) -> Self {
        Engine {
            model,
            encoder,
            tokenizer: encoder.tokenizer(),
            batch_size: batch_size.max(1),
            progress: Progress::hidden(),
            examples: 0,
            tokens: 0,
            journal: None,
        }
    }

    /// Progress over `n` examples of `name`, with examples/s and tokens/s.
    pub fn start(&mut self, name: &str, n: usize) {
        self.progress = Progress::new(true, name, n, 0, 0);
        self.examples = 0;
        self.tokens = 0;
    }

    pub fn finish(&self) {
        self.progress.finish_and_clear();
    }

    /// One user message wrapped in the chat format, then `answer_prefix`.
    pub fn wrap(&self, user: &str, answer_prefix: &str) -> Result<String> {
        self.encoder.wrap_user(user, answer_prefix)
    }

    /// The tokens of `prompt` as the reference's tokenizer call gives them: with the BOS the
    /// tokenizer's post-processor adds (LLaMA's; none for SmolLM2), none added to a model
    /// template's text (`apply_chat_template` tokenizes without).
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        self.encoder
            .prompt_ids(prompt)
            .context("cannot tokenize a prompt")
    }

    /// The number of tokens of `prompt`, no special token added.
    pub fn text_tokens(&self, prompt: &str) -> Result<usize> {
        Ok(self
            .encoder
            .ids(prompt, false)
            .context("cannot tokenize a prompt")?
            .len())
    }

    fn count(&mut self, examples: u64, tokens: u64) {
        self.examples += examples;
        self.tokens += tokens;
        let secs = self.progress.elapsed_s().max(1e-9);
        let message = format!(
            "{:.2} examples/s {:.1} tok/s",
            self.examples as f64 / secs,
            self.tokens as f64 / secs
        );
        self.progress.advance(examples as usize, message);
    }

    /// The next-token logits (f32) after each prompt.
    pub fn next_token_logits(&mut self, prompt: &str) -> Result<Vec<f32>> {
        let ids = self.prompt_ids(prompt)?;
        let t = ids.len();
        let input = Tensor::from_vec(ids, (1, t), self.model.device())?;
        let hidden = self.model.hidden(&input, &Ctx::eval())?;
        let logits = self.model.head(&hidden.narrow(1, t - 1, 1)?)?;
        let logits = logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        self.count(1, t as u64);
        Ok(logits)
    }

    /// Completions of `prompts`, `batch_size` at a time; request i samples with seed `seeds[i]`.
    pub fn complete(
        &mut self,
        prompts: &[String],
        seeds: &[u64],
        settings: &Settings,
    ) -> Result<Vec<Completion>> {
        let settings = &Settings {
            stop_ids: self.encoder.stop_ids().to_vec(),
            ..settings.clone()
        };
        let mut out = Vec::with_capacity(prompts.len());
        let requests = prompts
            .iter()
            .zip(seeds)
            .map(|(p, &seed)| {
                Ok(Request {
                    prompt: self.prompt_ids(p)?,
                    seed,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for chunk in requests.chunks(self.batch_size) {
            let keys: Vec<String> = chunk
                .iter()
                .map(|r| journal::Journal::key(r, settings))
                .collect();
            let mut known: Vec<Option<Completion>> = keys
                .iter()
                .map(|k| self.journal.as_ref().and_then(|j| j.get(k).cloned()))
                .collect();
            let todo: Vec<usize> = (0..chunk.len()).filter(|&i| known[i].is_none()).collect();
            let requests: Vec<Request> = todo.iter().map(|&i| chunk[i].clone()).collect();
            let made = match requests.is_empty() {
                true => Vec::new(),
                false => complete_batch(self.model, self.tokenizer, &requests, settings)?,
            };
            let mut made = todo
                .iter()
                .copied()
                .zip(made)
                .collect::<std::collections::HashMap<_, _>>();
            let mut tokens = 0;
            for i in 0..chunk.len() {
                let c = match made.remove(&i) {
                    Some(c) => {
                        tokens += c.ids.len();
                        if let Some(j) = self.journal.as_mut() {
                            j.add(keys[i].clone(), &c)?;
                        }
                        c
                    }
                    None => known[i].take().expect("in the journal"),
                };
                out.push(c);
            }
            self.count(chunk.len() as u64, tokens as u64);
        }
        Ok(out)
    }
}

/// Greedy settings for `max_new_tokens`, going past the model's positions as the reference
/// does (RoPE is defined for any position).
pub fn greedy(max_new_tokens: usize) -> Settings {
    Settings {
        past_positions: true,
        ..Settings::greedy(max_new_tokens)
    }
}

/// A data file of the benchmark, or one error naming it and how to get the data.
pub fn data_file(dir: &Path, relative: &str) -> Result<PathBuf> {
    let path = dir.join(relative);
    if !path.exists() {
        bail!(
            "{}: missing; --data-dir must hold open-instruct's evaluation data (its \
             scripts/prepare_eval_data.sh downloads it), or try the samples: --data-dir data/eval",
            path.display()
        );
    }
    Ok(path)
}

/// The names of the files in `dir` ending in `suffix`, without it, sorted; at least one.
pub fn names_ending(dir: &Path, suffix: &str) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|f| f.strip_suffix(suffix).map(String::from))
        .collect();
    names.sort();
    if names.is_empty() {
        bail!("{}: no <name>{suffix} files", dir.display());
    }
    Ok(names)
}

pub fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// `items` read from `path`, refused when there are none: a score over nothing is no score.
pub fn nonempty<T>(items: Vec<T>, path: &Path) -> Result<Vec<T>> {
    if items.is_empty() {
        bail!(
            "{}: no examples; check --data-dir (it needs open-instruct's evaluation data)",
            path.display()
        );
    }
    Ok(items)
}

/// `random.sample(items, max)` when there are more than `max` items, as the GSM, TyDi QA and
/// HumanEval scripts subsample after `random.seed(42)`; the items in the order drawn.
pub fn sampled<T>(
    rng: &mut crate::data::rng::Mt19937,
    items: Vec<T>,
    max: Option<usize>,
) -> Vec<T> {
    match max {
        Some(k) if items.len() > k => {
            let indices = rng.py_sample(items.len(), k);
            pick(items, &indices)
        }
        _ => items,
    }
}

/// The items at `indices` (distinct), in that order.
pub fn pick<T>(items: Vec<T>, indices: &[usize]) -> Vec<T> {
    let mut slots: Vec<Option<T>> = items.into_iter().map(Some).collect();
    indices
        .iter()
        .map(|&i| slots[i].take().expect("distinct indices"))
        .collect()
}

/// The first `limit` items (all without one).
pub fn first<T>(mut items: Vec<T>, limit: Option<usize>) -> Vec<T> {
    if let Some(n) = limit {
        items.truncate(n);
    }
    items
}

/// Runs one benchmark; the JSON results object.
pub fn run(benchmark: &str, engine: &mut Engine, options: &Options) -> Result<Value> {
    let scored = match benchmark {
        "mmlu" => mmlu::run(engine, options)?,
        "gsm" => gsm::run(engine, options)?,
        "bbh" => bbh::run(engine, options)?,
        "tydiqa" => tydiqa::run(engine, options)?,
        "humaneval" => humaneval::run(engine, options)?,
        other => bail!(
            "unknown benchmark {other:?}; one of {}",
            BENCHMARKS.join(", ")
        ),
    };
    engine.finish();
    let mut settings = serde_json::to_value(options)?;
    if let (Value::Object(s), Value::Object(extra)) = (&mut settings, scored.settings) {
        s.extend(extra);
    }
    Ok(json!({
        "benchmark": benchmark,
        "settings": settings,
        "metrics": scored.metrics,
        "examples": scored.examples,
    }))
}

/// The mean of `values` (0 for none).
pub fn mean(values: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, n) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}
