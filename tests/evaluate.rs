//! `prolora evaluate` against the reference: open-instruct's own evaluation code, run with
//! transformers on the tiny PEFT-fixture base over `data/eval/` (goldens from
//! scripts/reference/make_eval_goldens.py). Prompts byte for byte, prompt token ids, greedy
//! outputs, predictions, correctness and metrics; the string rules on the reference's tables;
//! HumanEval's execution and pass@k.

use prolora::evaluate::{self as ev, text, ChatFormat, Engine, Options, Protocol};
use prolora::generate::{complete, Settings};
use serde_json::Value;
use std::path::PathBuf;

mod common;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn golden(name: &str) -> Value {
    let path = root()
        .join("tests/fixtures/eval")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn options() -> Options {
    Options {
        data_dir: root().join("data/eval"),
        protocol: Protocol::Paper,
        limit: None,
        max_examples: None,
        batch_size: 4,
        max_new_tokens: None,
        temperature: None,
        samples: None,
        shots: None,
        chat_format: ChatFormat::Tulu,
        allow_code_execution: true,
        seed: 0,
    }
}

fn model() -> (prolora::model::Llama, tokenizers::Tokenizer) {
    let dir = common::fixture("peft-lora").join("base");
    let source = prolora::source::ModelSource::resolve(dir.to_str().unwrap(), "main").unwrap();
    let model = source
        .load(candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    (model, source.tokenizer(None).unwrap())
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Max |a − b| over the numbers of two metric objects with the same keys.
fn metrics_differ(ours: &Value, theirs: &Value) -> f64 {
    match theirs {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| metrics_differ(&ours[k], v))
            .fold(0.0, f64::max),
        Value::Number(n) => (ours.as_f64().unwrap_or(f64::NAN) - n.as_f64().unwrap()).abs(),
        _ => panic!("unexpected metric {theirs}"),
    }
}

/// Runs `benchmark` and checks every example and metric against its golden; returns the
/// results for benchmark-specific checks.
fn check(benchmark: &str, options: &Options) -> (Value, Value) {
    check_against(benchmark, benchmark, options)
}

/// `check` against the golden file `name`.
fn check_against(benchmark: &str, name: &str, options: &Options) -> (Value, Value) {
    let (model, tokenizer) = model();
    let mut engine = Engine::new(&model, &tokenizer, options.batch_size);
    let ours = ev::run(benchmark, &mut engine, options).unwrap();
    let gold = golden(name);
    let (got, want) = (
        ours["examples"].as_array().unwrap(),
        gold["examples"].as_array().unwrap(),
    );
    assert_eq!(got.len(), want.len(), "{benchmark}: examples");
    for (g, w) in got.iter().zip(want) {
        let id = &w["id"];
        assert_eq!(g["prompt"], w["prompt"], "{benchmark} {id}: prompt");
        // The paper's slow tokenizer; where the fast one (ours) differs the golden says so.
        let want_ids = match &w["prompt_ids_fast_tokenizer"] {
            Value::Null => &w["prompt_ids"],
            fast => fast,
        };
        let prompt = g["prompt"].as_str().unwrap();
        assert_eq!(
            engine.prompt_ids(prompt).unwrap(),
            ids(want_ids),
            "{benchmark} {id}: ids"
        );
        if want_ids != &w["prompt_ids"] {
            // Different input ids, so a different output: fed the slow tokenizer's ids instead,
            // the engine gives the reference's tokens.
            let n = w["generated_ids"].as_array().unwrap().len();
            let settings = Settings {
                past_positions: true,
                ..Settings::greedy(n)
            };
            let c = complete(&model, &tokenizer, &ids(&w["prompt_ids"]), &settings).unwrap();
            assert_eq!(
                c.ids,
                ids(&w["generated_ids"]),
                "{benchmark} {id}: slow-tokenizer ids"
            );
            continue;
        }
        assert_eq!(g["output"], w["output"], "{benchmark} {id}: output");
        if benchmark != "humaneval" {
            assert_eq!(
                g["prediction"], w["prediction"],
                "{benchmark} {id}: prediction"
            );
        }
        assert_eq!(g["correct"], w["correct"], "{benchmark} {id}: correct");
    }
    let gap = metrics_differ(&ours["metrics"], &gold["metrics"]);
    assert!(
        gap < 1e-12,
        "{benchmark}: metrics {} vs {}",
        ours["metrics"],
        gold["metrics"]
    );
    (ours, gold)
}

/// The authors' scripts (the paper's protocol): the answer cue "The answer is ".
#[test]
fn mmlu_equals_the_reference() {
    let (ours, gold) = check("mmlu", &options());
    assert_eq!(ours["settings"]["protocol"], "paper");
    assert_no_near_ties(&gold);
}

/// open-instruct at 65c6f406: the answer cue "The answer is:".
#[test]
fn mmlu_equals_open_instruct() {
    let options = Options {
        protocol: Protocol::OpenInstruct,
        ..options()
    };
    let (ours, gold) = check_against("mmlu", "mmlu-open-instruct", &options);
    assert_eq!(ours["settings"]["protocol"], "open-instruct");
    assert_eq!(gold["settings"]["answer_prefix"], "The answer is:");
    assert_no_near_ties(&gold);
}

/// No near-tie among the four letters could have decided a prediction either way.
fn assert_no_near_ties(gold: &Value) {
    for e in gold["examples"].as_array().unwrap() {
        let mut l: Vec<f64> = e["answer_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        l.sort_by(|a, b| b.total_cmp(a));
        assert!(
            l[0] - l[1] > 1e-4,
            "{}: a near tie {l:?}; compare with a tolerance",
            e["id"]
        );
    }
}

#[test]
fn gsm_equals_the_reference() {
    check("gsm", &options());
}

#[test]
fn bbh_equals_the_reference() {
    check("bbh", &options());
}

#[test]
fn tydiqa_equals_the_reference() {
    check("tydiqa", &options());
}

/// Greedy (the reference's sampling cannot be matched token for token): the same completions
/// after the stop sequences, and the same pass/fail when run.
#[test]
fn humaneval_equals_the_reference() {
    let options = Options {
        temperature: Some(0.0),
        samples: Some(1),
        ..options()
    };
    check("humaneval", &options);
}

#[test]
fn string_rules_equal_the_reference_tables() {
    let s = golden("strings");
    let cases = |k: &str| s[k]["cases"].as_array().unwrap().clone();
    let str_of = |v: &Value| v.as_str().unwrap().to_string();
    for c in cases("gsm_extraction") {
        let gold = text::drop_digit_commas(text::py_strip(c["gold_raw"].as_str().unwrap()));
        assert_eq!(gold, str_of(&c["gold"]), "{c}");
        let prediction = text::gsm_prediction(c["output"].as_str().unwrap());
        assert_eq!(prediction, str_of(&c["prediction"]), "{c}");
        assert_eq!(
            text::exact_match(&prediction, &gold),
            c["correct"].as_bool().unwrap(),
            "{c}"
        );
    }
    for c in cases("bbh_extraction") {
        let prediction = text::bbh_prediction(c["output"].as_str().unwrap());
        assert_eq!(prediction, str_of(&c["prediction"]), "{c}");
        let correct = text::exact_match(&prediction, c["gold"].as_str().unwrap());
        assert_eq!(correct, c["correct"].as_bool().unwrap(), "{c}");
    }
    for c in cases("exact_match") {
        let em = text::exact_match(
            c["prediction"].as_str().unwrap(),
            c["reference"].as_str().unwrap(),
        );
        assert_eq!(
            f64::from(u8::from(em)),
            c["exact_match"].as_f64().unwrap(),
            "{c}"
        );
    }
    for c in cases("squad") {
        let p = c["prediction"].as_str().unwrap();
        assert_eq!(
            text::squad_normalize(p),
            str_of(&c["normalized_prediction"]),
            "{c}"
        );
        let golds: Vec<String> = c["golds"].as_array().unwrap().iter().map(str_of).collect();
        for (g, n) in golds.iter().zip(c["normalized_golds"].as_array().unwrap()) {
            assert_eq!(text::squad_normalize(g), str_of(n), "{c}");
        }
        let em = golds.iter().any(|g| text::squad_exact(p, g));
        let f1 = golds
            .iter()
            .map(|g| text::squad_f1(p, g))
            .fold(0.0, f64::max);
        assert_eq!(em, c["exact_match"].as_bool().unwrap(), "{c}");
        assert!((f1 - c["f1"].as_f64().unwrap()).abs() < 1e-12, "{c}: {f1}");
    }
}

#[test]
fn execution_and_pass_at_k_equal_the_reference() {
    let h = golden("humaneval");
    let data = humaneval_problems();
    for c in h["hand_written"].as_array().unwrap() {
        let p = &data[c["task_id"].as_str().unwrap()];
        let program = format!(
            "{}{}\n{}\ncheck({})",
            p["prompt"].as_str().unwrap(),
            c["completion"].as_str().unwrap(),
            p["test"].as_str().unwrap(),
            p["entry_point"].as_str().unwrap()
        );
        let outcome = ev::execute::run_check(&program, &ev::execute::Limits::default()).unwrap();
        let passed = outcome == ev::execute::Outcome::Passed;
        assert_eq!(
            passed,
            c["passed"].as_bool().unwrap(),
            "{} {}: {outcome:?}",
            c["task_id"],
            c["kind"]
        );
        if c["result"] == "timed out" {
            assert_eq!(outcome, ev::execute::Outcome::TimedOut, "{}", c["kind"]);
        }
    }
    // Rows of one problem, and a row averaging several as the reference reports.
    for row in h["pass_at_k_table"].as_array().unwrap() {
        let list = |k: &str| match &row[k] {
            Value::Array(a) => a.iter().map(|v| v.as_u64().unwrap() as usize).collect(),
            v => vec![v.as_u64().unwrap() as usize],
        };
        let k = row["k"].as_u64().unwrap() as usize;
        let each = list("n")
            .into_iter()
            .zip(list("c"))
            .map(|(n, c)| ev::pass_at_k::pass_at_k(n, c, k).unwrap());
        let got = ev::mean(each);
        assert!(
            (got - row["pass_at_k"].as_f64().unwrap()).abs() < 1e-12,
            "{row}: {got}"
        );
    }
}

/// The sample HumanEval problems by task id.
fn humaneval_problems() -> serde_json::Map<String, Value> {
    use std::io::Read;
    let file =
        std::fs::File::open(root().join("data/eval/codex_humaneval/HumanEval.jsonl.gz")).unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["task_id"].as_str().unwrap().to_string(), v))
        .collect()
}
