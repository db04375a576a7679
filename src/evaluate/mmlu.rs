//! MMLU: multiple choice over 57 subjects. No generation: the prediction is the answer letter
//! whose token (" A" … " D") has the largest next-token logit after the prompt.

use super::csv::read_rendered;
use super::np_random::pandas_sample;
use super::{
    data_file, first, mean, names_ending, nonempty, pick, ChatFormat, Engine, Example, Options,
    Scored,
};
use anyhow::{bail, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

const CHOICES: [&str; 4] = ["A", "B", "C", "D"];

/// Each subject's subcategory (MMLU's taxonomy, as the reference's categories.py has it).
const SUBCATEGORIES: [(&str, &str); 57] = [
    ("abstract_algebra", "math"),
    ("anatomy", "health"),
    ("astronomy", "physics"),
    ("business_ethics", "business"),
    ("clinical_knowledge", "health"),
    ("college_biology", "biology"),
    ("college_chemistry", "chemistry"),
    ("college_computer_science", "computer science"),
    ("college_mathematics", "math"),
    ("college_medicine", "health"),
    ("college_physics", "physics"),
    ("computer_security", "computer science"),
    ("conceptual_physics", "physics"),
    ("econometrics", "economics"),
    ("electrical_engineering", "engineering"),
    ("elementary_mathematics", "math"),
    ("formal_logic", "philosophy"),
    ("global_facts", "other"),
    ("high_school_biology", "biology"),
    ("high_school_chemistry", "chemistry"),
    ("high_school_computer_science", "computer science"),
    ("high_school_european_history", "history"),
    ("high_school_geography", "geography"),
    ("high_school_government_and_politics", "politics"),
    ("high_school_macroeconomics", "economics"),
    ("high_school_mathematics", "math"),
    ("high_school_microeconomics", "economics"),
    ("high_school_physics", "physics"),
    ("high_school_psychology", "psychology"),
    ("high_school_statistics", "math"),
    ("high_school_us_history", "history"),
    ("high_school_world_history", "history"),
    ("human_aging", "health"),
    ("human_sexuality", "culture"),
    ("international_law", "law"),
    ("jurisprudence", "law"),
    ("logical_fallacies", "philosophy"),
    ("machine_learning", "computer science"),
    ("management", "business"),
    ("marketing", "business"),
    ("medical_genetics", "health"),
    ("miscellaneous", "other"),
    ("moral_disputes", "philosophy"),
    ("moral_scenarios", "philosophy"),
    ("nutrition", "health"),
    ("philosophy", "philosophy"),
    ("prehistory", "history"),
    ("professional_accounting", "other"),
    ("professional_law", "law"),
    ("professional_medicine", "health"),
    ("professional_psychology", "psychology"),
    ("public_relations", "politics"),
    ("security_studies", "politics"),
    ("sociology", "culture"),
    ("us_foreign_policy", "politics"),
    ("virology", "health"),
    ("world_religions", "philosophy"),
];

/// The four categories and their subcategories.
const CATEGORIES: [(&str, &[&str]); 4] = [
    (
        "STEM",
        &[
            "physics",
            "chemistry",
            "biology",
            "computer science",
            "math",
            "engineering",
        ],
    ),
    ("humanities", &["history", "philosophy", "law"]),
    (
        "social sciences",
        &[
            "politics",
            "culture",
            "economics",
            "geography",
            "psychology",
        ],
    ),
    (
        "other (business, health, misc.)",
        &["other", "business", "health"],
    ),
];

/// "abstract_algebra" → " abstract algebra" (the reference's leading space included).
fn subject_words(subject: &str) -> String {
    subject.split('_').map(|w| format!(" {w}")).collect()
}

/// A question and its choices, with the answer when it is an exemplar.
fn format_example(row: &[String], with_answer: bool) -> String {
    let k = row.len() - 2;
    let mut s = row[0].clone();
    for (j, choice) in row[1..=k].iter().enumerate() {
        s.push_str(&format!("\n{}. {choice}", CHOICES[j]));
    }
    s.push_str("\nAnswer:");
    if with_answer {
        s.push_str(&format!(" {}\n\n", row[k + 1]));
    }
    s
}

/// The subject header and the first `shots` exemplars of dev.
fn header(dev: &[Vec<String>], subject: &str, shots: usize) -> String {
    let mut s = format!(
        "The following are multiple choice questions (with answers) about {}.\n\n",
        subject_words(subject)
    );
    for row in &dev[..shots] {
        s.push_str(&format_example(row, true));
    }
    s
}

fn rows(path: &Path) -> Result<Vec<Vec<String>>> {
    let rows = read_rendered(path)?;
    if let Some(r) = rows.iter().position(|r| r.len() != 6) {
        bail!(
            "{}: record {} has {} fields; MMLU has 6 (question, A–D, answer)",
            path.display(),
            r + 1,
            rows[r].len()
        );
    }
    Ok(rows)
}

/// The reference keeps each prompt within this many tokens (no BOS) by dropping exemplars.
const MAX_PROMPT_TOKENS: usize = 2048;

/// The prompt for `row` with as many of `shots` exemplars as fit, as the reference fits them.
fn prompt(
    engine: &Engine,
    options: &Options,
    dev: &[Vec<String>],
    subject: &str,
    shots: usize,
    row: &[String],
) -> Result<String> {
    let question = format_example(row, false);
    let mut k = shots;
    loop {
        let plain = header(dev, subject, k) + &question;
        let prompt = match options.chat_format {
            ChatFormat::Tulu | ChatFormat::Model => {
                engine.wrap(&plain, options.protocol.mmlu_answer_cue())?
            }
            ChatFormat::None => plain,
        };
        // With no exemplars left the prompt is kept (the reference loops on, to k < 0, forever).
        if k == 0 || engine.text_tokens(&prompt)? <= MAX_PROMPT_TOKENS {
            return Ok(prompt);
        }
        k -= 1;
    }
}

pub fn run(engine: &mut Engine, options: &Options) -> Result<Scored> {
    let shots = options.shots.unwrap_or(0);
    let test_dir = data_file(&options.data_dir, "mmlu/test")?;
    let subjects = names_ending(&test_dir, "_test.csv")?;
    // The answer letters' tokens as the reference takes them: the last id of " A".
    let letter_ids = CHOICES
        .iter()
        .map(|c| {
            Ok(*engine
                .prompt_ids(&format!(" {c}"))?
                .last()
                .expect("a token"))
        })
        .collect::<Result<Vec<u32>>>()?;

    let mut work = Vec::new();
    for subject in &subjects {
        let dev = match shots {
            0 => Vec::new(),
            _ => {
                let path = data_file(&options.data_dir, &format!("mmlu/dev/{subject}_dev.csv"))?;
                let dev = rows(&path)?;
                if dev.len() < shots {
                    bail!(
                        "--shots {shots}: {} has {} exemplars",
                        path.display(),
                        dev.len()
                    );
                }
                dev
            }
        };
        let path = test_dir.join(format!("{subject}_test.csv"));
        let mut test: Vec<(usize, Vec<String>)> = nonempty(rows(&path)?, &path)?
            .into_iter()
            .enumerate()
            .collect();
        // The reference's --n_instances: test_df.sample(n, random_state=42), each subject anew.
        if let Some(n) = options.max_examples.filter(|&n| n < test.len()) {
            let rows = pandas_sample(42, test.len(), n);
            test = pick(test, &rows);
        }
        for (i, row) in first(test, options.limit) {
            let prompt = prompt(engine, options, &dev, subject, shots, &row)?;
            work.push((subject.clone(), i, prompt, row[5].clone()));
        }
    }

    engine.start("mmlu", work.len());
    let mut examples = Vec::new();
    let mut per_subject: Vec<(String, bool)> = Vec::new();
    for (subject, i, prompt, gold) in work {
        let logits = engine.next_token_logits(&prompt)?;
        let scores: Vec<f32> = letter_ids.iter().map(|&id| logits[id as usize]).collect();
        // The first of equal maxima, as torch.argmax.
        let best = (0..4).fold(0, |b, j| if scores[j] > scores[b] { j } else { b });
        let prediction = CHOICES[best].to_string();
        let correct = prediction == gold;
        per_subject.push((subject.clone(), correct));
        examples.push(Example {
            id: format!("{subject}/{i}"),
            prompt,
            output: String::new(),
            prediction,
            gold: json!(gold),
            correct,
        });
    }
    Ok(Scored {
        metrics: metrics(&per_subject),
        examples,
        settings: json!({"shots": shots, "answer_cue": options.protocol.mmlu_answer_cue(),
            "max_prompt_tokens": MAX_PROMPT_TOKENS}),
    })
}

/// The reference's metrics: `average_acc` over every example, `subcat_acc` and `cat_acc` over
/// the examples of their subjects (only those with examples: the reference fails on an empty
/// one), plus `subject_acc` per subject (which the reference prints).
fn metrics(results: &[(String, bool)]) -> Value {
    let acc = |pred: &dyn Fn(&str) -> bool| -> Option<f64> {
        let hits: Vec<f64> = results
            .iter()
            .filter(|(s, _)| pred(s))
            .map(|(_, c)| f64::from(u8::from(*c)))
            .collect();
        (!hits.is_empty()).then(|| mean(hits))
    };
    let subcat_of = |s: &str| SUBCATEGORIES.iter().find(|(n, _)| *n == s).map(|(_, c)| *c);
    let mut subjects = Map::new();
    for (s, _) in results {
        if !subjects.contains_key(s) {
            subjects.insert(s.clone(), json!(acc(&|x| x == s)));
        }
    }
    let mut subcats = Map::new();
    let mut seen = Vec::new();
    for (_, sub) in SUBCATEGORIES {
        if seen.contains(&sub) {
            continue;
        }
        seen.push(sub);
        if let Some(a) = acc(&|s| subcat_of(s) == Some(sub)) {
            subcats.insert(sub.to_string(), json!(a));
        }
    }
    let mut cats = Map::new();
    for (cat, subs) in CATEGORIES {
        if let Some(a) = acc(&|s| subcat_of(s).is_some_and(|c| subs.contains(&c))) {
            cats.insert(cat.to_string(), json!(a));
        }
    }
    json!({
        "average_acc": acc(&|_| true).unwrap_or(0.0),
        "subcat_acc": subcats,
        "cat_acc": cats,
        "subject_acc": subjects,
    })
}
