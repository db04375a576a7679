//! GSM8K: grade-school arithmetic, 8-shot chain of thought, greedy; the prediction is the last
//! number of the output, scored by exact match.

use super::text::{drop_digit_commas, exact_match, gsm_prediction, py_strip};
use super::{
    data_file, first, greedy, mean, nonempty, read, sampled, ChatFormat, Engine, Example, Options,
    Scored,
};
use crate::data::rng::Mt19937;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::json;

/// The chain-of-thought exemplars of Wei et al. (2022, table 20), in the reference's order.
const EXEMPLARS: &str = include_str!("gsm_exemplars.json");

#[derive(Deserialize)]
struct Exemplar {
    question: String,
    cot_answer: String,
}

#[derive(Deserialize)]
struct Problem {
    question: String,
    answer: String,
}

/// The instruction and `shots` exemplars: all eight in order, or fewer drawn as the reference
/// draws them (`random.sample` of the eight, next from its seeded generator).
fn prefix(shots: usize, rng: &mut Mt19937) -> Result<String> {
    let exemplars: Vec<Exemplar> = serde_json::from_str(EXEMPLARS)?;
    if shots > exemplars.len() {
        bail!("--shots {shots}: GSM has {} exemplars", exemplars.len());
    }
    if shots == 0 {
        return Ok("Answer the following question.\n\n".into());
    }
    let order = match shots < exemplars.len() {
        true => rng.py_sample(exemplars.len(), shots),
        false => (0..shots).collect(),
    };
    let demos: Vec<String> = order
        .into_iter()
        .map(|i| &exemplars[i])
        .map(|e| format!("Question: {}\nAnswer: {}", e.question, e.cot_answer))
        .collect();
    Ok(format!(
        "Answer the following questions.\n\n{}\n\n",
        demos.join("\n\n")
    ))
}

pub fn run(engine: &mut Engine, options: &Options) -> Result<Scored> {
    let shots = options.shots.unwrap_or(8);
    let max_new_tokens = options.max_new_tokens.unwrap_or(512);
    let path = data_file(&options.data_dir, "gsm/test.jsonl")?;
    let mut problems = Vec::new();
    for (n, line) in read(&path)?
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let p: Problem = serde_json::from_str(line).with_context(|| {
            format!(
                "{}:{}: needs {{\"question\", \"answer\"}}",
                path.display(),
                n + 1
            )
        })?;
        // The reference's answer.split("####")[1].
        let Some(gold) = p.answer.split("####").nth(1) else {
            bail!(
                "{}:{}: the answer has no \"#### <number>\" line",
                path.display(),
                n + 1
            );
        };
        problems.push((p.question, drop_digit_commas(py_strip(gold))));
    }
    // The reference's generator: the subset first, then the exemplars.
    let mut rng = Mt19937::python(42);
    let problems: Vec<(usize, (String, String))> =
        nonempty(problems, &path)?.into_iter().enumerate().collect();
    let problems = first(
        sampled(&mut rng, problems, options.max_examples),
        options.limit,
    );
    let prefix = prefix(shots, &mut rng)?;
    let prompts: Vec<String> = problems
        .iter()
        .map(|(_, (q, _))| {
            let user = format!("{prefix}Question: {}", py_strip(q));
            match options.chat_format {
                ChatFormat::Tulu | ChatFormat::Model => engine.wrap(&user, "Answer:"),
                ChatFormat::None => Ok(format!("{user}\nAnswer:")),
            }
        })
        .collect::<Result<_>>()?;
    // With the chat format the reference stops only at EOS; without, at the first newline.
    let mut settings = greedy(max_new_tokens);
    if options.chat_format == ChatFormat::None {
        settings.stop = vec!["\n".into()];
    }
    engine.start("gsm", prompts.len());
    let outputs = engine.complete(&prompts, &vec![0; prompts.len()], &settings)?;
    let examples: Vec<Example> = problems
        .into_iter()
        .zip(prompts)
        .zip(outputs)
        .map(|(((i, (_, gold)), prompt), out)| {
            let prediction = gsm_prediction(&out.text);
            Example {
                id: i.to_string(),
                correct: exact_match(&prediction, &gold),
                prompt,
                output: out.text,
                prediction,
                gold: json!(gold),
            }
        })
        .collect();
    Ok(Scored {
        metrics: json!({"exact_match": mean(examples.iter().map(|e| f64::from(u8::from(e.correct))))}),
        examples,
        settings: json!({"shots": shots, "max_new_tokens": max_new_tokens}),
    })
}
