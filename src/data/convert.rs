//! Raw instruction datasets → `{"dataset", "id", "messages"}` jsonl, as open-instruct's 2023
//! `reformat_datasets.py` writes them (the functions `convert_super_ni_data`, `convert_flan_v2_data`,
//! `convert_cot_data`, `convert_code_alpaca_data`, `convert_stanford_alpaca_data` and the
//! `encode_instruction_example` / `encode_few_shot_example` templates). The reference draws its
//! templates and samples from Python's `random` seeded once with `--seed`; we replay that
//! generator ([`Mt19937::python`]), so for the same input and seed the output is the reference's,
//! example for example (checked by `tests/prepare.rs` against files the reference wrote).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::choice::named_enum;
use crate::data::chat::{parse_line, py_strip};
use crate::data::jsonl::{for_each_chunk, line_text, Skipped};
use crate::data::rng::Mt19937;

named_enum! {
/// The raw formats `prolora data prepare` reads.
pub enum Format {
    /// A Super-NaturalInstructions checkout (`splits/xlingual/train_tasks.txt`, `tasks/*.json`),
    /// a directory of task files, or one task file.
    Superni = "superni",
    /// jsonl of `{"inputs", "targets"}` (open-instruct's resampled Flan V2 file).
    FlanV2 = "flan_v2",
    /// A directory with `cot_zsopt.jsonl` and `cot_fsopt.jsonl`, or one `{"inputs", "targets"}` jsonl.
    Cot = "cot",
    /// JSON list of `{"instruction", "input", "output"}` (`code_alpaca_20k.json`).
    CodeAlpaca = "code_alpaca",
    /// JSON list of `{"instruction", "input", "output"}` (`alpaca_data.json`).
    Alpaca = "alpaca",
    /// `{"messages": [...]}` jsonl: validated and passed through unchanged.
    Messages = "messages",
    /// jsonl of `{"prompt", "completion"}`: one user turn, one assistant turn.
    PromptCompletion = "prompt_completion",
}
}

/// Per SuperNI task: zero-shot instances, two-shot instances, exemplars per two-shot prompt.
const SUPERNI_ZERO_SHOT: usize = 60;
const SUPERNI_FEW_SHOT: usize = 20;
const SUPERNI_N_SHOT: usize = 2;
/// Per CoT file (open-instruct's Tulu v1 mixture: 50k zero-shot + 50k few-shot).
const COT_PER_FILE: usize = 50_000;

/// (prompt template, completion template, weight): open-instruct's `encoding_templates_w_input`.
const WITH_INPUT: [(&str, &str, f64); 14] = [
    ("{instruction}\n\n{input}\n\n", "{output}", 0.2),
    ("{instruction}\n{input}\n\n", "{output}", 0.1),
    ("{instruction}\n{input}\n", "{output}", 0.1),
    ("{instruction}\n\nInput: {input}\n\nOutput:", "{output}", 0.05),
    ("{instruction}\nInput: {input}\nOutput:", "{output}", 0.05),
    ("{instruction}\n{input}\n\nResponse:", "{output}", 0.05),
    ("{instruction}\n\nAdditional Context:\n{input}\n\nAnswer:", "{output}", 0.05),
    ("Task: {instruction}\nInput: {input}\nOutput:", "{output}", 0.05),
    ("Task: {instruction}\n\n{input}\n\n", "{output}", 0.05),
    ("Task: {instruction}\n\n{input}\n\nAnswer:", "{output}", 0.05),
    ("You need to complete the following task:\n\n{instruction}\n\n{input}\n\nAnswer:", "{output}", 0.05),
    ("{instruction}\n\nNow complete the following instance -\nInput: {input}\nOutput:", "{output}", 0.05),
    ("Instruction:{instruction}\n\nInput: {input}\n\n", "{output}", 0.05),
    (
        "Below is an instruction that describes a task, paired with an input that provides further context. \
         Write a response that appropriately completes the request.\n\n\
         ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
        "{output}",
        0.1,
    ),
];

/// `encoding_templates_wo_input` (the "Plase" typo is the reference's).
const WITHOUT_INPUT: [(&str, &str, f64); 14] = [
    ("{instruction}\n\n", "{output}", 0.2),
    ("{instruction}\n", "{output}", 0.1),
    ("{instruction}", "\n{output}", 0.1),
    ("{instruction} Output:", "{output}", 0.05),
    ("{instruction}\nResponse:", "{output}", 0.05),
    ("{instruction}\n\nAnswer:", "{output}", 0.05),
    ("Task: {instruction}\n\n", "{output}", 0.05),
    ("Instruction: {instruction}\n", "{output}", 0.05),
    ("Instruction: {instruction}\nOutput:", "{output}", 0.05),
    (
        "You need to complete the following task:\n\n{instruction}\n\n",
        "{output}",
        0.05,
    ),
    (
        "Can you help with this?\n\n{instruction}\n",
        "{output}",
        0.05,
    ),
    (
        "Plase answer the following request: {instruction}\nAnswer:",
        "{output}",
        0.05,
    ),
    (
        "Tell me how would you respond to the following request.\n{instruction}\n",
        "{output}",
        0.05,
    ),
    (
        "Write a response that appropriately completes the request.\n\n\
         ### Instruction:\n{instruction}\n\n### Response:",
        "{output}",
        0.1,
    ),
];

/// Python's `template.format(**fields)` for `{name}` fields: one pass, so a value containing
/// `{input}` is not substituted again.
fn format_template(template: &str, fields: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').expect("templates are well formed") + open;
        let name = &rest[open + 1..close];
        let value = fields
            .iter()
            .find(|(k, _)| *k == name)
            .unwrap_or_else(|| panic!("template field {name} has a value"));
        out.push_str(value.1);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// `encode_instruction_example(..., random_template=True)`: (prompt, completion).
fn encode_instruction(
    rng: &mut Mt19937,
    instruction: &str,
    input: Option<&str>,
    output: &str,
) -> (String, String) {
    let input = input.map(py_strip).filter(|i| !i.is_empty());
    let table = if input.is_some() {
        &WITH_INPUT
    } else {
        &WITHOUT_INPUT
    };
    let weights: Vec<f64> = table.iter().map(|t| t.2).collect();
    let (prompt, completion, _) = table[rng.py_choice_weighted(&weights)];
    let fields = [
        ("instruction", py_strip(instruction)),
        ("input", input.unwrap_or("")),
        ("output", py_strip(output)),
    ];
    (
        format_template(prompt, &fields),
        format_template(completion, &fields),
    )
}

/// `encode_few_shot_example`: (prompt, completion).
fn encode_few_shot(
    instruction: &str,
    exemplars: &[&Exemplar],
    input: &str,
    output: &str,
) -> (String, String) {
    let mut prompt = format!("{}\n\n", py_strip(instruction));
    for e in exemplars {
        prompt.push_str(&format!(
            "Input:\n{}\nOutput:\n{}\n\n",
            py_strip(&e.input),
            py_strip(&e.output)
        ));
    }
    prompt.push_str(&format!("Input:\n{}\nOutput:\n", py_strip(input)));
    (prompt, py_strip(output).to_string())
}

/// Flan V2 / CoT: a newline after the inputs unless they end with one or with a colon.
fn flan_prompt(inputs: &str) -> String {
    // Python's rstrip: Unicode whitespace plus the ASCII separators U+001C..=U+001F.
    let rstripped =
        inputs.trim_end_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c));
    if inputs.ends_with('\n') || rstripped.ends_with(':') {
        inputs.to_string()
    } else {
        format!("{inputs}\n")
    }
}

fn record(dataset: &str, id: &str, prompt: &str, completion: &str) -> Value {
    json!({
        "dataset": dataset,
        "id": id,
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ],
    })
}

#[derive(Deserialize)]
struct Exemplar {
    input: String,
    output: String,
}

#[derive(Deserialize)]
struct Instance {
    id: String,
    input: String,
    output: Vec<String>,
}

#[derive(Deserialize)]
struct Task {
    #[serde(rename = "Definition")]
    definition: Vec<String>,
    #[serde(rename = "Positive Examples")]
    positive_examples: Vec<Exemplar>,
    #[serde(rename = "Instances")]
    instances: Vec<Instance>,
}

/// What `prepare` wrote and skipped.
#[derive(Debug, Default)]
pub struct PrepareReport {
    pub written: usize,
    /// (where, why): a line number for jsonl input, else 0 with the place in the message.
    pub skipped: Vec<Skipped>,
}

struct Writer<'a, W: Write> {
    out: &'a mut W,
    skip_invalid: bool,
    report: PrepareReport,
}

impl<W: Write> Writer<'_, W> {
    fn write(&mut self, v: &Value) -> Result<()> {
        writeln!(self.out, "{v}").context("writing the output")?;
        self.report.written += 1;
        Ok(())
    }

    /// A bad record: an error, or under `skip_invalid` a counted skip. `line` is 0 when the
    /// place is in `what` (JSON lists, task files).
    fn bad(&mut self, file: &Path, line: usize, what: String) -> Result<()> {
        let place = if line > 0 {
            format!("{}:{line}", file.display())
        } else {
            file.display().to_string()
        };
        if !self.skip_invalid {
            bail!("{place}: {what} (or skip bad records with --skip-invalid)");
        }
        crate::to_stderr!("{place}: skipped: {what}");
        self.report.skipped.push(Skipped { line, error: what });
        Ok(())
    }
}

/// Converts `input` (a file or directory, see [`Format`]) to chat jsonl on `out`.
pub fn prepare<W: Write>(
    format: Format,
    input: &Path,
    out: &mut W,
    seed: u64,
    skip_invalid: bool,
) -> Result<PrepareReport> {
    let mut rng = Mt19937::python(seed);
    let mut w = Writer {
        out,
        skip_invalid,
        report: PrepareReport::default(),
    };
    match format {
        Format::Superni => superni(&mut rng, input, &mut w)?,
        Format::FlanV2 => inputs_targets(input, "flan_v2", &mut w)?,
        Format::Cot if input.is_dir() => {
            let mut lines = Vec::new();
            for name in ["cot_zsopt.jsonl", "cot_fsopt.jsonl"] {
                let path = input.join(name);
                let mut file_lines = read_lines(&path)?;
                if COT_PER_FILE < file_lines.len() {
                    let picked = rng.py_sample(file_lines.len(), COT_PER_FILE);
                    file_lines = picked
                        .into_iter()
                        .map(|i| std::mem::take(&mut file_lines[i]))
                        .collect();
                }
                lines.extend(file_lines.into_iter().map(|(n, l)| (path.clone(), n, l)));
            }
            for (idx, (path, lineno, line)) in lines.into_iter().enumerate() {
                convert_inputs_targets(&path, lineno, &line, "cot", idx, &mut w)?;
            }
        }
        Format::Cot => inputs_targets(input, "cot", &mut w)?,
        Format::CodeAlpaca => alpaca(
            &mut rng,
            &in_dir(input, "code_alpaca_20k.json"),
            "code_alpaca",
            &mut w,
        )?,
        Format::Alpaca => alpaca(
            &mut rng,
            &in_dir(input, "alpaca_data.json"),
            "stanford_alpaca",
            &mut w,
        )?,
        Format::Messages => each_line(input, &mut w, |w, lineno, text| match parse_line(text) {
            Ok(_) => writeln!(w.out, "{text}")
                .context("writing the output")
                .map(|_| w.report.written += 1),
            Err(what) => w.bad(input, lineno, what),
        })?,
        Format::PromptCompletion => {
            let mut idx = 0;
            each_line(input, &mut w, |w, lineno, text| {
                match fields(text, &["prompt", "completion"]) {
                    Ok(f) => {
                        let id = format!("prompt_completion_{idx}");
                        idx += 1;
                        w.write(&record("prompt_completion", &id, &f[0], &f[1]))
                    }
                    Err(what) => w.bad(input, lineno, what),
                }
            })?
        }
    }
    if w.report.written == 0 {
        bail!(
            "{}: no example written ({} skipped); check --format",
            input.display(),
            w.report.skipped.len()
        );
    }
    Ok(w.report)
}

/// A directory's well-known file, or the path itself.
fn in_dir(input: &Path, name: &str) -> PathBuf {
    if input.is_dir() {
        input.join(name)
    } else {
        input.to_path_buf()
    }
}

/// The non-blank lines of a file with their numbers (CoT samples among all of them).
fn read_lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let mut lines = Vec::new();
    for_each_chunk(path, 4096, |chunk| {
        for (lineno, raw) in chunk {
            let text = line_text(lineno, &raw)
                .map_err(|what| anyhow!("{}:{lineno}: {what}", path.display()))?;
            if let Some(t) = text {
                lines.push((lineno, t.to_string()));
            }
        }
        Ok(())
    })?;
    Ok(lines)
}

/// Streams the non-blank lines of a jsonl file through `f`; undecodable lines are bad records.
fn each_line<W: Write>(
    path: &Path,
    w: &mut Writer<'_, W>,
    mut f: impl FnMut(&mut Writer<'_, W>, usize, &str) -> Result<()>,
) -> Result<()> {
    for_each_chunk(path, 4096, |chunk| {
        for (lineno, raw) in chunk {
            match line_text(lineno, &raw) {
                Ok(Some(text)) => f(w, lineno, text)?,
                Ok(None) => {}
                Err(what) => w.bad(path, lineno, what)?,
            }
        }
        Ok(())
    })
}

/// The string fields `names` of a JSON object line, or what is wrong with it.
fn fields(text: &str, names: &[&str]) -> std::result::Result<Vec<String>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    names
        .iter()
        .map(|n| match v.get(n) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("\"{n}\" must be a string")),
            None => Err(format!(
                "no \"{n}\" (this format needs {})",
                names
                    .iter()
                    .map(|n| format!("\"{n}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        })
        .collect()
}

fn convert_inputs_targets<W: Write>(
    path: &Path,
    lineno: usize,
    text: &str,
    dataset: &str,
    idx: usize,
    w: &mut Writer<'_, W>,
) -> Result<()> {
    match fields(text, &["inputs", "targets"]) {
        Ok(f) => w.write(&record(
            dataset,
            &format!("{dataset}_{idx}"),
            &flan_prompt(&f[0]),
            &f[1],
        )),
        Err(what) => w.bad(path, lineno, what),
    }
}

fn inputs_targets<W: Write>(path: &Path, dataset: &str, w: &mut Writer<'_, W>) -> Result<()> {
    let mut idx = 0;
    each_line(path, w, |w, lineno, text| {
        let before = w.report.written;
        convert_inputs_targets(path, lineno, text, dataset, idx, w)?;
        idx += w.report.written - before;
        Ok(())
    })
}

fn alpaca<W: Write>(
    rng: &mut Mt19937,
    path: &Path,
    dataset: &str,
    w: &mut Writer<'_, W>,
) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let records: Vec<Value> = serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{}:{}:{}: not a JSON list of {{\"instruction\", \"input\", \"output\"}} objects ({})",
            path.display(),
            e.line(),
            e.column(),
            serde_message(&e)
        )
    })?;
    for (idx, r) in records.iter().enumerate() {
        let field = |n: &str| match r.get(n) {
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(Value::Null) | None if n == "input" => Ok(None),
            Some(_) => Err(format!("[{idx}].{n} must be a string")),
            None => Err(format!("[{idx}] has no \"{n}\"")),
        };
        match (field("instruction"), field("input"), field("output")) {
            (Ok(Some(instruction)), Ok(input), Ok(Some(output))) => {
                let (prompt, completion) = encode_instruction(rng, instruction, input, output);
                w.write(&record(
                    dataset,
                    &format!("{dataset}_{idx}"),
                    &prompt,
                    &completion,
                ))?;
            }
            (a, b, c) => {
                let what = [a.err(), b.err(), c.err()].into_iter().flatten().next();
                w.bad(path, 0, what.unwrap_or_default())?;
            }
        }
    }
    Ok(())
}

/// serde_json's message without its " at line L column C" (we print the place first).
fn serde_message(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    }
}

/// The task files of a SuperNI input: the xlingual train split when the checkout has it (minus
/// the `_mmmlu_` tasks, as the reference), else every `*.json` under `tasks/` or the directory.
fn superni_tasks(input: &Path) -> Result<Vec<PathBuf>> {
    if input.is_file() {
        return Ok(vec![input.to_path_buf()]);
    }
    let split = input
        .join("splits")
        .join("xlingual")
        .join("train_tasks.txt");
    if split.is_file() {
        let text = std::fs::read_to_string(&split)
            .with_context(|| format!("reading {}", split.display()))?;
        return Ok(text
            .lines()
            .filter(|l| !l.contains("_mmmlu_") && !l.trim().is_empty())
            .map(|l| input.join("tasks").join(format!("{}.json", l.trim())))
            .collect());
    }
    let dir = if input.join("tasks").is_dir() {
        input.join("tasks")
    } else {
        input.to_path_buf()
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no SuperNI task files (*.json, or splits/xlingual/train_tasks.txt + tasks/)",
            input.display()
        );
    }
    Ok(files)
}

fn superni<W: Write>(rng: &mut Mt19937, input: &Path, w: &mut Writer<'_, W>) -> Result<()> {
    for path in superni_tasks(input)? {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} (a task of the train split)", path.display()))?;
        let task: Task = match serde_json::from_str(&text) {
            Ok(t) => t,
            Err(e) => {
                let what = format!(
                    "line {} column {}: not a SuperNI task ({}); a task file has \"Definition\", \
                     \"Positive Examples\" and \"Instances\"",
                    e.line(),
                    e.column(),
                    serde_message(&e)
                );
                w.bad(&path, 0, what)?;
                continue;
            }
        };
        let Some(instruction) = task.definition.first() else {
            w.bad(&path, 0, "\"Definition\" is empty".into())?;
            continue;
        };
        let all = &task.instances;
        let instances: Vec<&Instance> = if SUPERNI_ZERO_SHOT + SUPERNI_FEW_SHOT < all.len() {
            rng.py_sample(all.len(), SUPERNI_ZERO_SHOT + SUPERNI_FEW_SHOT)
                .into_iter()
                .map(|i| &all[i])
                .collect()
        } else {
            all.iter().collect()
        };
        for (k, instance) in instances.iter().enumerate() {
            let Some(output) = instance.output.first() else {
                w.bad(
                    &path,
                    0,
                    format!("instance {:?} has an empty \"output\" list", instance.id),
                )?;
                continue;
            };
            let (prompt, completion) = if k < SUPERNI_ZERO_SHOT {
                encode_instruction(rng, instruction, Some(&instance.input), output)
            } else {
                let pos = &task.positive_examples;
                let exemplars: Vec<&Exemplar> = if SUPERNI_N_SHOT < pos.len() {
                    rng.py_sample(pos.len(), SUPERNI_N_SHOT)
                        .into_iter()
                        .map(|i| &pos[i])
                        .collect()
                } else {
                    pos.iter().collect()
                };
                encode_few_shot(instruction, &exemplars, &instance.input, output)
            };
            w.write(&record(
                "super_ni",
                &format!("super_ni_{}", instance.id),
                &prompt,
                &completion,
            ))?;
        }
    }
    Ok(())
}
