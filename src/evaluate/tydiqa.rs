//! TyDi QA (gold passage): extractive answers in nine languages, one exemplar per language
//! from the train file, the passage cut to 512 tokens as the reference cuts it, 50 new tokens;
//! SQuAD exact match and F1 per language and their averages (in percent).

use super::text::{py_strip, squad_exact, squad_f1};
use super::{
    data_file, greedy, mean, nonempty, pick, read, sampled, ChatFormat, Engine, Example, Options,
    Scored,
};
use crate::data::rng::Mt19937;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Map};
use std::path::Path;

/// Per language: the instruction and the passage, question and answer labels.
const TEMPLATES: [(&str, [&str; 4]); 9] = [
    (
        "english",
        [
            "Answer the following question based on the information in the given passage.",
            "Passage:",
            "Question:",
            "Answer:",
        ],
    ),
    (
        "arabic",
        [
            "أجب على السؤال التالي بناءً على المعلومات في المقطع المعطى.",
            "المقطع:",
            "السؤال:",
            "الإجابة:",
        ],
    ),
    (
        "bengali",
        [
            "প্রদত্ত অধ্যায়ের তথ্যের উপর ভিত্তি করে নিম্নলিখিত প্রশ্নের উত্তর দিন।",
            "অধ্যায়:",
            "প্রশ্ন:",
            "উত্তর:",
        ],
    ),
    (
        "finnish",
        [
            "Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.",
            "Kappale:",
            "Kysymys:",
            "Vastaus:",
        ],
    ),
    (
        "indonesian",
        [
            "Jawab pertanyaan berikut berdasarkan informasi di bagian yang diberikan.",
            "Bagian:",
            "Pertanyaan:",
            "Jawaban:",
        ],
    ),
    (
        "korean",
        [
            "주어진 문단의 정보에 기반하여 다음 질문에 답하십시오.",
            "문단:",
            "질문:",
            "답변:",
        ],
    ),
    (
        "russian",
        [
            "Ответьте на следующий вопрос на основе информации в данном отрывке.",
            "Отрывок:",
            "Вопрос:",
            "Ответ:",
        ],
    ),
    (
        "swahili",
        [
            "Jibu swali lifuatalo kulingana na habari kwenye kifungu kilichotolewa.",
            "Kifungu:",
            "Swali:",
            "Jibu:",
        ],
    ),
    (
        "telugu",
        [
            "ఇచ్చిన పేరాలోని సమాచారం ఆధారంగా కింది ప్రశ్నకు సమాధానం ఇవ్వండి.",
            "పేరా:",
            "ప్రశ్న:",
            "సమాధానం:",
        ],
    ),
];

/// The instruction and labels of `lang` (checked to exist when the data was read).
fn template(lang: &str) -> [&'static str; 4] {
    TEMPLATES
        .iter()
        .find(|(l, _)| *l == lang)
        .expect("a known language")
        .1
}

/// Passages longer than this many tokens (BOS included) are cut, as the reference's default.
const MAX_CONTEXT_TOKENS: usize = 512;

#[derive(Deserialize)]
struct Squad {
    data: Vec<Article>,
}
#[derive(Deserialize)]
struct Article {
    paragraphs: Vec<Paragraph>,
}
#[derive(Deserialize)]
struct Paragraph {
    context: String,
    qas: Vec<Qa>,
}
#[derive(Deserialize)]
struct Qa {
    id: String,
    question: String,
    answers: Vec<Answer>,
}
#[derive(Deserialize)]
struct Answer {
    text: String,
}

/// The first `limit` questions of each language, in their order (all without one).
fn first_per_language(items: Vec<Item>, limit: Option<usize>) -> Vec<Item> {
    let Some(limit) = limit else { return items };
    let mut seen: Vec<(String, usize)> = Vec::new();
    items
        .into_iter()
        .filter(
            |item| match seen.iter_mut().find(|(l, _)| *l == item.lang) {
                Some((_, n)) => {
                    *n += 1;
                    *n <= limit
                }
                None => {
                    seen.push((item.lang.clone(), 1));
                    true
                }
            },
        )
        .collect()
}

#[derive(Clone)]
struct Item {
    id: String,
    lang: String,
    context: String,
    question: String,
    answers: Vec<String>,
}

fn items(path: &Path) -> Result<Vec<Item>> {
    let squad: Squad = serde_json::from_str(&read(path)?).with_context(|| {
        format!(
            "{}: not TyDi QA's SQuAD-style JSON (data → paragraphs → qas)",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    for paragraph in squad.data.into_iter().flat_map(|a| a.paragraphs) {
        for qa in paragraph.qas {
            let lang = qa.id.split('-').next().unwrap_or("").to_string();
            if !TEMPLATES.iter().any(|(l, _)| *l == lang) {
                bail!(
                    "{}: question {:?}: no template for language {lang:?}",
                    path.display(),
                    qa.id
                );
            }
            if qa.answers.is_empty() {
                bail!("{}: question {:?} has no answer", path.display(), qa.id);
            }
            out.push(Item {
                id: qa.id,
                lang,
                context: paragraph.context.clone(),
                question: qa.question,
                answers: qa.answers.into_iter().map(|a| a.text).collect(),
            });
        }
    }
    Ok(out)
}

/// The passage as the model sees it: past 512 tokens, the first 512 (BOS included) decoded
/// back with the special tokens, so the text starts with a literal "<s>".
fn truncated(engine: &Engine, context: &str) -> Result<String> {
    let ids = engine.prompt_ids(context)?;
    if ids.len() <= MAX_CONTEXT_TOKENS {
        return Ok(context.to_string());
    }
    engine
        .tokenizer
        .decode(&ids[..MAX_CONTEXT_TOKENS], false)
        .map_err(|e| anyhow::anyhow!("cannot decode a passage: {e}"))
}

pub fn run(engine: &mut Engine, options: &Options) -> Result<Scored> {
    let shots = options.shots.unwrap_or(1);
    let max_new_tokens = options.max_new_tokens.unwrap_or(50);
    let dev_path = data_file(&options.data_dir, "tydiqa/tydiqa-goldp-v1.1-dev.json")?;
    let dev = nonempty(items(&dev_path)?, &dev_path)?;
    let mut langs: Vec<String> = dev.iter().map(|i| i.lang.clone()).collect();
    langs.sort();
    langs.dedup();
    // The reference's generator, seeded once: the per-language subsets first, then the
    // exemplars, language by language in sorted order.
    let mut rng = Mt19937::python(42);
    let test: Vec<Item> = match options.max_examples {
        // File order, unless the reference subsamples (then grouped by language).
        None => dev,
        Some(max) => langs
            .iter()
            .flat_map(|lang| {
                let of_lang = dev.iter().filter(|i| &i.lang == lang).cloned().collect();
                sampled(&mut rng, of_lang, Some(max))
            })
            .collect(),
    };
    let test = first_per_language(test, options.limit);
    let train = match shots {
        0 => Vec::new(),
        _ => {
            let path = data_file(&options.data_dir, "tydiqa/tydiqa-goldp-v1.1-train.json")?;
            let train = items(&path)?;
            let mut chosen = Vec::new();
            for lang in &langs {
                let of_lang: Vec<Item> =
                    train.iter().filter(|t| &t.lang == lang).cloned().collect();
                if of_lang.len() < shots {
                    bail!(
                        "--shots {shots}: {} has {} {lang} questions",
                        path.display(),
                        of_lang.len()
                    );
                }
                let indices = rng.py_sample(of_lang.len(), shots);
                chosen.push((lang.clone(), pick(of_lang, &indices)));
            }
            chosen
        }
    };
    // Each language's exemplars, built once: "passage, question, answer" blocks.
    let mut demos: Vec<(String, String)> = Vec::new();
    for lang in &langs {
        let [_, passage, question, answer] = template(lang);
        let exemplars = train
            .iter()
            .find(|(l, _)| l == lang)
            .map_or(&[][..], |(_, e)| &e[..]);
        let blocks = exemplars
            .iter()
            .map(|e| {
                let context = truncated(engine, &e.context)?;
                Ok(format!(
                    "{passage} {context}\n{question} {}\n{answer} {}",
                    e.question, e.answers[0]
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let text = match blocks.is_empty() {
            true => String::new(),
            false => blocks.join("\n\n") + "\n\n",
        };
        demos.push((lang.clone(), text));
    }
    let mut prompts = Vec::new();
    for item in &test {
        let [instruction, passage, question, answer] = template(&item.lang);
        let demo = &demos
            .iter()
            .find(|(l, _)| *l == item.lang)
            .expect("every language")
            .1;
        let mut user = format!("{instruction}\n\n{demo}");
        let context = truncated(engine, &item.context)?;
        user.push_str(&format!(
            "{passage} {context}\n{question} {}\n",
            item.question
        ));
        prompts.push(match options.chat_format {
            ChatFormat::Tulu | ChatFormat::Model => engine.wrap(&user, answer)?,
            ChatFormat::None => user + answer,
        });
    }
    let mut settings = greedy(max_new_tokens);
    if options.chat_format == ChatFormat::None {
        settings.stop = vec!["\n".into()];
    }
    engine.start("tydiqa", prompts.len());
    let outputs = engine.complete(&prompts, &vec![0; prompts.len()], &settings)?;
    let mut examples = Vec::new();
    let mut scores: Vec<(String, f64, f64)> = Vec::new();
    for ((item, prompt), out) in test.iter().zip(prompts).zip(outputs) {
        let prediction = py_strip(&out.text).to_string();
        let best = |f: &dyn Fn(&str, &str) -> f64| {
            item.answers
                .iter()
                .map(|g| f(&prediction, g))
                .fold(0.0, f64::max)
        };
        let em = best(&|p, g| f64::from(u8::from(squad_exact(p, g))));
        let f1 = best(&|p, g| squad_f1(p, g));
        scores.push((item.lang.clone(), em, f1));
        examples.push(Example {
            id: item.id.clone(),
            prompt,
            output: out.text,
            prediction,
            gold: json!(item.answers),
            correct: em == 1.0,
        });
    }
    let mut metrics = Map::new();
    let (mut ems, mut f1s) = (Vec::new(), Vec::new());
    for lang in &langs {
        let of = || scores.iter().filter(|s| &s.0 == lang);
        let (em, f1) = (
            100.0 * mean(of().map(|s| s.1)),
            100.0 * mean(of().map(|s| s.2)),
        );
        ems.push(em);
        f1s.push(f1);
        metrics.insert(lang.clone(), json!({"exact_match": em, "f1": f1}));
    }
    metrics.insert(
        "average".into(),
        json!({"f1": mean(f1s), "exact_match": mean(ems)}),
    );
    Ok(Scored {
        metrics: metrics.into(),
        examples,
        settings: json!({"shots": shots, "max_new_tokens": max_new_tokens, "max_context_length": MAX_CONTEXT_TOKENS}),
    })
}
