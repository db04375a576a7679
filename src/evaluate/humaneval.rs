//! HumanEval: complete a Python function; each completion runs against the problem's tests in
//! a sandboxed subprocess (only with `--allow-code-execution`); pass@k by the unbiased estimator.

use super::execute::{check_available, run_check, Limits, Outcome};
use super::pass_at_k::pass_at_k;
use super::{
    data_file, first, mean, nonempty, sampled, ChatFormat, Engine, Example, Options, Scored,
};
use crate::data::chat::ChatEncoder;
use crate::data::rng::Mt19937;
use crate::generate::Settings;
use crate::progress::Progress;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::{json, Map};
use std::io::Read;
use std::path::Path;

/// The reference's stop sequences: the function ends where top-level code starts.
const STOPS: [&str; 5] = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"];

#[derive(Deserialize)]
struct Problem {
    task_id: String,
    prompt: String,
    test: String,
    entry_point: String,
}

/// Refuses to go on without `--allow-code-execution`, or where the sandbox cannot run here
/// (checked before any model is loaded).
pub fn check_code_execution(options: &Options) -> Result<()> {
    if !options.allow_code_execution {
        bail!(
            "HumanEval runs the model's code: pass --allow-code-execution to run each completion \
             in a sandbox (python3 in its own namespaces: no network, no other process, none of \
             your files; 3 s, 1 GiB); nothing has run"
        );
    }
    check_available()
}

/// HumanEval has no exemplars: a --shots for it is a mistake, not a no-op.
pub fn refuse_shots(options: &Options) -> Result<()> {
    if let Some(shots) = options.shots {
        bail!(
            "--shots {shots}: HumanEval has no few-shot exemplars; leave out --shots or humaneval"
        );
    }
    Ok(())
}

fn problems(path: &Path) -> Result<Vec<Problem>> {
    let mut text = String::new();
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("gz") => flate2::read::GzDecoder::new(file).read_to_string(&mut text),
        _ => std::io::BufReader::new(file).read_to_string(&mut text),
    }
    .with_context(|| format!("{}: cannot read (not gzip'd UTF-8 jsonl?)", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            serde_json::from_str(l).with_context(|| {
                format!(
                    "{}:{}: needs {{\"task_id\", \"prompt\", \"test\", \"entry_point\"}}",
                    path.display(),
                    n + 1
                )
            })
        })
        .collect()
}

/// The problems to run, in order: the reference's subset (`--max_num_examples`: random.sample
/// after random.seed(42)), then the first `limit`.
fn chosen(options: &Options) -> Result<Vec<Problem>> {
    let dir = &options.data_dir;
    let path = match dir.join("codex_humaneval/HumanEval.jsonl.gz").exists() {
        true => dir.join("codex_humaneval/HumanEval.jsonl.gz"),
        false => data_file(dir, "codex_humaneval/HumanEval.jsonl")
            .context("neither HumanEval.jsonl.gz nor HumanEval.jsonl")?,
    };
    let problems = sampled(
        &mut Mt19937::python(42),
        nonempty(problems(&path)?, &path)?,
        options.max_examples,
    );
    Ok(first(problems, options.limit))
}

fn prompt(p: &Problem, encoder: &ChatEncoder) -> Result<String> {
    match encoder.format() {
        ChatFormat::Tulu | ChatFormat::Model => encoder.wrap_user(
            &format!("Complete the following python function.\n\n\n{}", p.prompt),
            &format!("Here is the completed function:\n\n\n{}", p.prompt),
        ),
        ChatFormat::None => Ok(p.prompt.clone()),
    }
}

/// Each chosen problem's task id and prompt in `encoder`'s chat format (what a run would
/// generate from, nothing run).
pub fn prompts(options: &Options, encoder: &ChatEncoder) -> Result<Vec<(String, String)>> {
    chosen(options)?
        .iter()
        .map(|p| Ok((p.task_id.clone(), prompt(p, encoder)?)))
        .collect()
}

pub fn run(engine: &mut Engine, options: &Options) -> Result<Scored> {
    if !options.allow_code_execution {
        check_code_execution(options)?;
    }
    refuse_shots(options)?;
    let samples = options.samples.unwrap_or(20);
    let temperature = options.temperature.unwrap_or(0.1);
    let max_new_tokens = options.max_new_tokens.unwrap_or(512);
    if samples == 0 {
        bail!("--samples must be at least 1");
    }
    let problems = chosen(options)?;
    let prompt_of = |p: &Problem| prompt(p, engine.encoder);
    // Sample s of problem i draws from its own stream of the run's seed.
    let mut prompts = Vec::new();
    let mut seeds = Vec::new();
    for (i, p) in problems.iter().enumerate() {
        for s in 0..samples {
            prompts.push(prompt_of(p)?);
            seeds.push(
                options
                    .seed
                    .wrapping_mul(1_000_003)
                    .wrapping_add((i * samples + s) as u64),
            );
        }
    }
    let settings = Settings {
        max_new_tokens,
        temperature,
        top_p: 0.95,
        seed: options.seed,
        stop: STOPS.iter().map(|s| s.to_string()).collect(),
        past_positions: true,
        stop_ids: Vec::new(),
    };
    engine.start("humaneval", prompts.len());
    let outputs = engine.complete(&prompts, &seeds, &settings)?;
    let limits = Limits::default();
    // Thousands of programs at up to a timeout each: minutes that a log should see pass.
    let checked = std::sync::Mutex::new(Progress::new(true, "humaneval", outputs.len(), 0, 0));
    let outcomes = outputs
        .par_iter()
        .enumerate()
        .map(|(j, out)| {
            let p = &problems[j / samples];
            let program = format!(
                "{}{}\n{}\ncheck({})",
                p.prompt, out.text, p.test, p.entry_point
            );
            let outcome = run_check(&program, &limits);
            let mut checked = checked.lock().unwrap_or_else(|e| e.into_inner());
            checked.advance(1, "programs run".into());
            outcome
        })
        .collect::<Result<Vec<_>>>()?;
    checked
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .finish_and_clear();
    let mut examples = Vec::new();
    let mut passed = vec![0usize; problems.len()];
    for (j, (out, outcome)) in outputs.into_iter().zip(outcomes).enumerate() {
        let (i, s) = (j / samples, j % samples);
        let result = outcome.result();
        passed[i] += usize::from(outcome == Outcome::Passed);
        examples.push(Example {
            id: match samples {
                1 => problems[i].task_id.clone(),
                _ => format!("{}#{s}", problems[i].task_id),
            },
            prompt: prompts[j].clone(),
            output: out.text,
            correct: outcome == Outcome::Passed,
            prediction: result,
            gold: json!("passed"),
        });
    }
    let metrics = pass_at_ks(&passed, samples)?;
    Ok(Scored {
        metrics: metrics.into(),
        examples,
        settings: json!({"samples": samples, "temperature": temperature, "top_p": 0.95,
            "max_new_tokens": max_new_tokens, "stop": STOPS, "timeout_s": limits.timeout.as_secs_f64()}),
    })
}

/// pass@1 and pass@10 over the problems, each where there are at least k samples a problem
/// (as the reference reports only the k it can estimate); `passed[i]` of `samples` passed.
pub fn pass_at_ks(passed: &[usize], samples: usize) -> Result<Map<String, serde_json::Value>> {
    let mut metrics = Map::new();
    for k in [1, 10] {
        if samples >= k {
            let each = passed
                .iter()
                .map(|&c| pass_at_k(samples, c, k))
                .collect::<Result<Vec<_>>>()?;
            metrics.insert(format!("pass@{k}"), json!(mean(each)));
        }
    }
    Ok(metrics)
}

#[cfg(test)]
mod tests {
    use super::pass_at_ks;

    /// The paper's second setting, `--samples 20 --temperature 0.8`, is reported as pass@10
    /// (with pass@1 beside it).
    #[test]
    fn twenty_samples_report_pass_at_10() {
        let m = pass_at_ks(&[0, 3, 20], 20).unwrap();
        assert_eq!(m.keys().collect::<Vec<_>>(), ["pass@1", "pass@10"]);
        assert!(m["pass@10"].as_f64().unwrap() > m["pass@1"].as_f64().unwrap());
        let m = pass_at_ks(&[1], 9).unwrap();
        assert_eq!(m.keys().collect::<Vec<_>>(), ["pass@1"]);
    }
}
