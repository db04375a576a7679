//! BIG-Bench Hard: 3-shot direct answers (`--shots N`: the prompt file's first N; their chain
//! of thought removed as the reference removes it), greedy; exact match per task and their
//! average.

use super::text::{bbh_prediction, exact_match, py_strip};
use super::{
    data_file, first, greedy, mean, names_ending, nonempty, pick, read, ChatFormat, Engine,
    Example, Options, Scored,
};
use crate::data::rng::Mt19937;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Map};
use std::path::Path;

#[derive(Deserialize)]
struct Task {
    examples: Vec<TaskExample>,
}

#[derive(Deserialize)]
struct TaskExample {
    input: String,
    target: String,
}

/// The first `shots` exemplars of a cot-prompts file without their reasoning: the first two
/// lines (the canary and a rule) dropped, each "Q: …\nA: … So the answer is X." turned into
/// "Q: …\nA: X.", the task description kept.
fn direct_prompt(path: &Path, shots: usize) -> Result<String> {
    let text = read(path)?;
    let kept: String = text.split_inclusive('\n').skip(2).collect();
    let mut exemplars = 0;
    let mut fields = Vec::new();
    for field in kept.split("\n\n") {
        if !field.starts_with("Q:") {
            fields.push(field.to_string());
            continue;
        }
        if !field.contains("So the answer is") || !field.contains("\nA:") {
            bail!(
                "{}: an exemplar lacks \"\\nA:\" or \"So the answer is\"",
                path.display()
            );
        }
        exemplars += 1;
        if exemplars > shots {
            continue;
        }
        let answer = py_strip(field.rsplit("So the answer is").next().unwrap_or(""));
        let question = py_strip(field.split("\nA:").next().unwrap_or(""));
        fields.push(format!("{question}\nA: {answer}"));
    }
    if exemplars < shots {
        bail!(
            "--shots {shots}: {} has {exemplars} exemplars",
            path.display()
        );
    }
    Ok(fields.join("\n\n"))
}

pub fn run(engine: &mut Engine, options: &Options) -> Result<Scored> {
    let max_new_tokens = options.max_new_tokens.unwrap_or(512);
    let tasks_dir = data_file(&options.data_dir, "bbh/bbh")?;
    let names = names_ending(&tasks_dir, ".json")?;
    let shots = options.shots.unwrap_or(3);
    // The reference's --max_num_examples_per_task: random.sample of every task, in task order,
    // after random.seed(42). Its tasks come in glob (directory) order; ours, sorted.
    let mut rng = Mt19937::python(42);
    let mut work = Vec::new();
    for name in &names {
        let path = tasks_dir.join(format!("{name}.json"));
        let task: Task = serde_json::from_str(&read(&path)?).with_context(|| {
            format!(
                "{}: needs {{\"examples\": [{{\"input\", \"target\"}}]}}",
                path.display()
            )
        })?;
        let prompt_file = data_file(&options.data_dir, &format!("bbh/cot-prompts/{name}.txt"))?;
        let exemplars = direct_prompt(&prompt_file, shots)?;
        let exemplars = py_strip(&exemplars);
        let examples: Vec<(usize, TaskExample)> = nonempty(task.examples, &path)?
            .into_iter()
            .enumerate()
            .collect();
        let examples = match options.max_examples {
            Some(n) if n > examples.len() => bail!(
                "--max-examples {n}: {} has {} examples (the reference's random.sample fails \
                 there too)",
                path.display(),
                examples.len()
            ),
            Some(n) => {
                let indices = rng.py_sample(examples.len(), n);
                pick(examples, &indices)
            }
            None => examples,
        };
        for (i, ex) in first(examples, options.limit) {
            let user = format!("{exemplars}\n\nQ: {}", ex.input);
            let prompt = match options.chat_format {
                ChatFormat::Tulu | ChatFormat::Model => engine.wrap(&user, "A:")?,
                ChatFormat::None => format!("{user}\nA:"),
            };
            work.push((name.clone(), i, prompt, ex.target));
        }
    }
    let mut settings = greedy(max_new_tokens);
    if options.chat_format == ChatFormat::None {
        settings.stop = vec!["\n\n".into()];
    }
    let prompts: Vec<String> = work.iter().map(|w| w.2.clone()).collect();
    engine.start("bbh", prompts.len());
    let outputs = engine.complete(&prompts, &vec![0; prompts.len()], &settings)?;
    let mut examples = Vec::new();
    let mut per_task: Vec<(String, f64)> = Vec::new();
    for ((task, i, prompt, target), out) in work.into_iter().zip(outputs) {
        let prediction = bbh_prediction(&out.text);
        let correct = exact_match(&prediction, &target);
        per_task.push((task.clone(), f64::from(u8::from(correct))));
        examples.push(Example {
            id: format!("{task}/{i}"),
            prompt,
            output: out.text,
            prediction,
            gold: json!(target),
            correct,
        });
    }
    let mut metrics = Map::new();
    for name in &names {
        let hits = per_task.iter().filter(|(t, _)| t == name).map(|(_, c)| *c);
        metrics.insert(name.clone(), json!(mean(hits)));
    }
    let average = mean(metrics.values().filter_map(|v| v.as_f64()));
    metrics.insert("average_exact_match".into(), json!(average));
    Ok(Scored {
        metrics: metrics.into(),
        examples,
        settings: json!({"shots": shots, "cot": false, "max_new_tokens": max_new_tokens}),
    })
}
