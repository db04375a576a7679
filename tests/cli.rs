//! The binary as a user runs it: the demo trains, eval reproduces PyTorch+PEFT, bad input gives
//! one clear line and a non-zero exit.

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{prolora, root, stderr};

/// Runs a command that must fail; returns its error line after checking the shape of the failure.
fn error_of(args: &[&str]) -> String {
    let o = prolora(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "expected failure for {args:?}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line expected, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}

/// A fixture's path as a command-line or config argument.
fn fixture(rel: &str) -> String {
    common::fixture(rel).display().to_string()
}

fn json_of(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("one JSON object on stdout")
}

/// `prolora eval --json` of `model` (with `adapter`, a path) on the PEFT fixture's data at
/// length 64, plus `extra` arguments.
fn eval_fixture(model: &str, adapter: Option<&str>, extra: &[&str]) -> serde_json::Value {
    let data = fixture("peft-lora/data.jsonl");
    let mut args = vec![
        "eval",
        "--model",
        model,
        "--data",
        &data,
        "--max-seq-len",
        "64",
        "--json",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a]);
    }
    args.extend(extra);
    json_of(&prolora(&args))
}

/// A golden's `key` (`expected.json` of a fixture directory).
fn golden(dir: &str, key: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("{dir}/expected.json"))).unwrap(),
    )
    .unwrap();
    v[key].as_f64().unwrap()
}

fn assert_rel(ours: f64, want: f64, what: &str) {
    assert!(
        ((ours - want) / want).abs() < 1e-4,
        "{what}: ours {ours} vs {want}"
    );
}

#[test]
fn eval_of_peft_adapter_equals_pytorch() {
    let out = eval_fixture(
        &fixture("peft-lora/base"),
        Some(&fixture("peft-lora/adapter")),
        &[],
    );
    assert_rel(
        out["loss"].as_f64().unwrap(),
        golden("peft-lora", "loss"),
        "PyTorch+PEFT",
    );
    assert_eq!(
        out["tokens"].as_f64().unwrap(),
        golden("peft-lora", "tokens")
    );
}

/// `prolora eval --quantize nf4` against transformers + PEFT + bitsandbytes; and `prolora
/// quantize` output evaluates to the same loss without re-quantizing.
#[test]
fn eval_quantize_nf4_equals_pytorch_bitsandbytes() {
    let want = golden("peft-lora-nf4", "loss");
    let out = tempfile::tempdir().unwrap();
    let quantized = prolora(&[
        "quantize",
        "--model",
        &fixture("peft-lora/base"),
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(quantized.status.success(), "{}", stderr(&quantized));
    for (model, quantize) in [
        (fixture("peft-lora/base"), "nf4"),
        (out.path().to_str().unwrap().to_string(), "none"),
    ] {
        let o = eval_fixture(
            &model,
            Some(&fixture("peft-lora/adapter")),
            &["--quantize", quantize],
        );
        assert_rel(
            o["loss"].as_f64().unwrap(),
            want,
            &format!("{model} --quantize {quantize} vs bitsandbytes"),
        );
    }
    let e = error_of(&[
        "eval",
        "--model",
        "tiny",
        "--quantize",
        "int3",
        "--data",
        "x.jsonl",
    ]);
    assert!(e.contains("--quantize") && e.contains("int3"), "{e}");
}

#[test]
fn our_adapter_loads_in_peft_with_the_same_loss() {
    // tests/fixtures/our-lora/adapter was written by `prolora train`; the loss is PEFT's
    // (scripts/reference/check_our_adapter.py).
    let out = eval_fixture(
        &fixture("peft-lora/base"),
        Some(&fixture("our-lora/adapter")),
        &[],
    );
    assert_rel(
        out["loss"].as_f64().unwrap(),
        golden("our-lora", "loss"),
        "stock PEFT",
    );
}

/// `prolora eval` of the adapter in `run` on the tiny preset over the demo's held-out data.
fn demo_eval_loss(run: &Path) -> f64 {
    demo_eval_loss_with(run, &[])
}

/// The same with `extra` arguments.
fn demo_eval_loss_with(run: &Path, extra: &[&str]) -> f64 {
    let run = run.to_str().unwrap();
    let data = "data/sample_chat_eval.jsonl";
    let mut args = vec![
        "eval",
        "--model",
        "tiny",
        "--adapter",
        run,
        "--data",
        data,
        "--max-seq-len",
        "128",
        "--json",
    ];
    args.extend(extra);
    json_of(&prolora(&args))["loss"].as_f64().unwrap()
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn demo_config_trains_loss_decreases_and_the_adapter_reloads() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let o = prolora(&[
        "train",
        "--config",
        "configs/demo.toml",
        "--set",
        &format!("output_dir={}", run.display()),
        "--set",
        "train.steps=40",
        "--set",
        "train.eval_every=0",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "metrics.jsonl",
        "config.toml",
    ] {
        assert!(run.join(f).exists(), "{f} missing from the run dir");
    }
    let lines = metrics(&run);
    let train_steps = lines.iter().filter(|l| l.get("loss").is_some()).count();
    assert_eq!(train_steps, 40);
    let evals: Vec<f64> = lines
        .iter()
        .filter_map(|l| l["eval_loss"].as_f64())
        .collect();
    let (before, after) = (evals[0], *evals.last().unwrap());
    assert!(after < before - 0.3, "eval loss {before} → {after}");

    // The resolved config records the overrides.
    let snapshot = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(snapshot.contains("steps = 40"), "{snapshot}");
    let adapter_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(adapter_cfg["peft_type"], "LORA");
    assert_eq!(adapter_cfg["r"], 8);

    // Reloading the saved adapter reproduces the trainer's final eval loss.
    let reloaded = demo_eval_loss(&run);
    assert!((reloaded - after).abs() < 1e-5, "{reloaded} vs {after}");
    // In 4 bits the tiny model is the same model quantized: the adapter keeps its gain.
    let in_4bit = demo_eval_loss_with(&run, &["--quantize", "nf4"]);
    assert!(
        (in_4bit - reloaded).abs() < 0.1 * (before - after),
        "eval --quantize nf4 {in_4bit} vs {reloaded} (gain {before} → {after})"
    );

    // The run shows up in a sweep table and a plot.
    let table = prolora(&["collect", tmp.path().to_str().unwrap()]);
    assert!(table.status.success(), "{}", stderr(&table));
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("lora r8 lr 2e-3") && table.contains(&format!("{after:.4}")),
        "{table}"
    );
    let svg = tmp.path().join("loss.svg");
    let o = prolora(&[
        "plot",
        run.to_str().unwrap(),
        "--out",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.matches("<circle").count() == evals.len(),
        "{svg}"
    );

    let o = prolora(&[
        "generate",
        "--model",
        "tiny",
        "--adapter",
        run.to_str().unwrap(),
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn missing_model_dir_names_it() {
    let err = error_of(&[
        "eval",
        "--model",
        "no/such/dir",
        "--data",
        "data/sample_chat_eval.jsonl",
    ]);
    assert!(err.contains("no/such/dir"), "{err}");
}

#[test]
fn unusable_devices_are_clear_errors() {
    let eval = |device: &str| {
        error_of(&[
            "eval",
            "--model",
            "tiny",
            "--data",
            "data/sample_chat_eval.jsonl",
            "--device",
            device,
        ])
    };
    let err = eval("tpu");
    assert!(err.contains("\"tpu\"") && err.contains("cuda:N"), "{err}");
    // This build (CI's) has no CUDA: say how to get it, not a driver error.
    if !cfg!(feature = "cuda") {
        for device in ["cuda", "cuda:1"] {
            let err = eval(device);
            assert!(err.contains("--features cuda"), "{err}");
        }
        let err = error_of(&["train", "--config", "configs/demo.toml", "--device", "cuda"]);
        assert!(err.contains("--features cuda"), "{err}");
    }
}

#[test]
fn malformed_config_json_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), "{\"vocab_size\": 12,").unwrap();
    let dir = tmp.path().display().to_string();
    let err = error_of(&[
        "eval",
        "--model",
        &dir,
        "--data",
        "data/sample_chat_eval.jsonl",
    ]);
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn bad_jsonl_lines_name_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let good = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;
    let not_json = tmp.path().join("not_json.jsonl");
    std::fs::write(&not_json, format!("{good}\n{good}\n{{oops\n")).unwrap();
    let no_messages = tmp.path().join("no_messages.jsonl");
    std::fs::write(&no_messages, format!("{good}\n{{\"prompt\": \"x\"}}\n")).unwrap();
    let err = error_of(&[
        "eval",
        "--model",
        "tiny",
        "--data",
        not_json.to_str().unwrap(),
    ]);
    assert!(err.contains("not_json.jsonl:3:"), "{err}");
    let err = error_of(&[
        "eval",
        "--model",
        "tiny",
        "--data",
        no_messages.to_str().unwrap(),
    ]);
    assert!(
        err.contains("no_messages.jsonl:2:") && err.contains("messages"),
        "{err}"
    );

    // The trainer reads its data before loading the model and fails the same way.
    let err = error_of(&[
        "train",
        "--config",
        "configs/demo.toml",
        "--set",
        &format!("data.train={}", not_json.display()),
        "--set",
        &format!("output_dir={}", tmp.path().join("run").display()),
    ]);
    assert!(err.contains("not_json.jsonl:3:"), "{err}");
}

#[test]
fn unknown_config_key_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("typo.toml");
    let demo = std::fs::read_to_string(root().join("configs/demo.toml")).unwrap();
    std::fs::write(&cfg, demo.replace("max_grad_norm", "max_grad_nrom")).unwrap();
    let err = error_of(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(
        err.contains("max_grad_nrom") && err.contains("typo.toml:"),
        "{err}"
    );

    let err = error_of(&[
        "train",
        "--config",
        "configs/demo.toml",
        "--set",
        "optim.learning_rate=1e-3",
    ]);
    assert!(err.contains("learning_rate"), "{err}");
}

/// Every adapter kind trains from its example config, writes its PEFT-style files, reloads to
/// the trainer's final eval loss, and exports to a LoRA with that loss.
#[test]
fn every_adapter_kind_trains_and_reloads() {
    let tmp = tempfile::tempdir().unwrap();
    for (config, peft_type) in [
        ("configs/demo-prolora.toml", "PROLORA"),
        ("configs/demo-vera.toml", "VERA"),
        ("configs/demo-tied-lora.toml", "TIED_LORA"),
    ] {
        let run = tmp.path().join(peft_type);
        let o = prolora(&[
            "train",
            "--config",
            config,
            "--set",
            &format!("output_dir={}", run.display()),
            "--set",
            "train.steps=6",
            "--set",
            "train.eval_every=0",
            "--set",
            "optim.lr=1e-2",
            "--quiet",
        ]);
        assert!(o.status.success(), "{config}: {}", stderr(&o));
        let adapter_cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(adapter_cfg["peft_type"], peft_type);
        let lines = metrics(&run);
        let losses: Vec<f64> = lines.iter().filter_map(|l| l["loss"].as_f64()).collect();
        assert_eq!(losses.len(), 6);
        let evals: Vec<f64> = lines
            .iter()
            .filter_map(|l| l["eval_loss"].as_f64())
            .collect();
        let (before, after) = (evals[0], *evals.last().unwrap());
        assert!(after < before, "{config}: eval loss {before} → {after}");
        let reloaded = demo_eval_loss(&run);
        assert!(
            (reloaded - after).abs() < 1e-5,
            "{config}: {reloaded} vs {after}"
        );

        // Its LoRA export (rank at most min(in, out) = 128 on the tiny model) loads and gives
        // the same loss.
        let export = tmp.path().join(format!("{peft_type}-lora"));
        let o = prolora(&[
            "export",
            "--adapter",
            run.to_str().unwrap(),
            "--format",
            "peft-lora",
            "--model",
            "tiny",
            "--out",
            export.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{config}: {}", stderr(&o));
        let exported_cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(export.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert!(exported_cfg["r"].as_u64().unwrap() <= 128, "{exported_cfg}");
        let exported = demo_eval_loss(&export);
        assert!(
            (exported - reloaded).abs() < 1e-4,
            "{config}: export {exported} vs {reloaded}"
        );
    }
}

/// Bad adapter settings and files: one clear line each, naming the key or the tensor.
#[test]
fn bad_adapter_input_gives_one_clear_error() {
    let train_err = |sets: &[&str]| {
        let mut args = vec!["train", "--config", "configs/demo-prolora.toml"];
        for s in sets {
            args.extend(["--set", s]);
        }
        error_of(&args)
    };
    let err = train_err(&["adapter.unshared_rank=9"]);
    assert!(
        err.contains("adapter.unshared_rank = 9 exceeds adapter.rank = 8"),
        "{err}"
    );
    let err = train_err(&["adapter.sharing_rate_a=200"]);
    assert!(
        err.contains("adapter.sharing_rate_a = 200") && err.contains("128 input features"),
        "{err}"
    );
    let err = train_err(&["adapter.rank=0", "adapter.unshared_rank=0"]);
    assert!(err.contains("adapter.rank must be at least 1"), "{err}");
    let err = train_err(&["adapter.kind=lora"]);
    assert!(
        err.contains("adapter.unshared_rank applies to kind = \"prolora\" only"),
        "{err}"
    );
    let err = train_err(&["adapter.kind=dora"]);
    assert!(
        err.contains("dora") && err.contains("adapter.kind"),
        "{err}"
    );

    // A LoRA adapter for another model: the tensor and both shapes are named.
    let eval_err = |adapter: &str| {
        error_of(&[
            "eval",
            "--model",
            "tiny",
            "--adapter",
            adapter,
            "--data",
            "data/sample_chat_eval.jsonl",
        ])
    };
    let err = eval_err(&fixture("peft-vera/adapter"));
    assert!(
        err.contains("base_model.vera_A") && err.contains("[8, 64]"),
        "{err}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    std::fs::create_dir(&dir).unwrap();
    let src = root().join("tests/fixtures/peft-lora/adapter");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        cfg.replace("\"LORA\"", "\"IA3\""),
    )
    .unwrap();
    let err = eval_err(dir.to_str().unwrap());
    assert!(
        err.contains("adapter_config.json") && err.contains("\"IA3\""),
        "{err}"
    );
}

/// Export and merge of every non-LoRA kind against stock PEFT / transformers
/// (scripts/reference/check_exports.py): PEFT reading our LoRA export gives our adapter's loss;
/// transformers reading our merged checkpoint (f16, as the base) gives the loss we compute on it.
#[test]
fn export_and_merge_match_peft_and_transformers() {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("our-exports/expected.json")).unwrap(),
    )
    .unwrap();
    let base = fixture("peft-lora/base");
    let tmp = tempfile::tempdir().unwrap();
    let close = |a: f64, b: f64| ((a - b) / b).abs() < 1e-4;
    for kind in ["prolora", "vera", "tied-lora"] {
        let want = &expected[kind];
        let adapter = fixture(&format!("our-exports/{kind}"));
        let ours = eval_fixture(&base, Some(&adapter), &[])["loss"]
            .as_f64()
            .unwrap();
        let peft = want["export_loss"].as_f64().unwrap();
        assert!(
            close(ours, peft),
            "{kind}: ours {ours} vs PEFT on the export {peft}"
        );

        // The export is what PEFT read: same tensors, bit for bit.
        let export = tmp.path().join(format!("{kind}-lora"));
        let o = prolora(&[
            "export",
            "--adapter",
            &adapter,
            "--format",
            "peft-lora",
            "--model",
            &base,
            "--out",
            export.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let fresh = candle_core::safetensors::load(
            export.join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let committed = candle_core::safetensors::load(
            fixture(&format!(
                "our-exports/{kind}/peft-lora/adapter_model.safetensors"
            )),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(fresh.len(), committed.len());
        for (key, t) in &fresh {
            let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = committed[key]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(a, b, "{kind}: {key}");
        }
        assert!(close(
            eval_fixture(&base, Some(export.to_str().unwrap()), &[])["loss"]
                .as_f64()
                .unwrap(),
            peft
        ));

        let merged = tmp.path().join(format!("{kind}-merged"));
        let o = prolora(&[
            "merge",
            "--model",
            &base,
            "--adapter",
            &adapter,
            "--out",
            merged.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let weights = candle_core::safetensors::load(
            merged.join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert!(weights
            .values()
            .all(|t| t.dtype() == candle_core::DType::F16));
        let ours = eval_fixture(merged.to_str().unwrap(), None, &[])["loss"]
            .as_f64()
            .unwrap();
        let hf = want["merged_loss"].as_f64().unwrap();
        assert!(
            close(ours, hf),
            "{kind}: merged {ours} vs transformers {hf}"
        );
        assert!(
            ((ours - peft) / peft).abs() < 1e-3,
            "{kind}: merge moved the loss"
        );
    }
}

#[test]
fn params_prints_the_papers_counts() {
    for (args, want) in [
        (vec!["--method", "lora", "--rank", "2"], 4_997_120),
        (
            vec![
                "--method",
                "prolora",
                "--rank",
                "8",
                "--set",
                "adapter.unshared_rank=1",
                "--set",
                "adapter.sharing_rate_a=7",
            ],
            4_999_520,
        ),
        (vec!["--method", "vera", "--rank", "256"], 1_417_216),
        (vec!["--method", "tied-lora", "--rank", "256"], 4_595_712),
    ] {
        let mut full = vec!["params", "--model", "llama2-7b", "--json"];
        full.extend(&args);
        let out = json_of(&prolora(&full));
        assert_eq!(out["params"], want, "{args:?}");
        assert_eq!(out["method"], args[1], "the method by its name");
        assert_eq!(out["bytes_f32"], 4 * want);
        assert_eq!(out["bytes_bf16"], 2 * want);
    }
    let o = prolora(&["params", "--paper-tables"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("25,886,720") && text.contains("paper counts 32 layers"),
        "{text}"
    );
    let err = error_of(&[
        "params",
        "--model",
        "llama2-7b",
        "--method",
        "lora",
        "--set",
        "adapter.unshared_rank=1",
    ]);
    assert!(
        err.contains("adapter.unshared_rank applies to kind = \"prolora\" only"),
        "{err}"
    );
}

/// Every shipped config parses, validates and fits its model's shapes (no model download: the
/// LLaMA-2 configs are checked against the llama2-7b preset's shapes, SmolLM2's against the
/// real model of the tests).
#[test]
fn every_shipped_config_is_valid() {
    use prolora::config::RunConfig;
    let mut checked = 0;
    for entry in std::fs::read_dir(root().join("configs")).unwrap() {
        let path = entry.unwrap().path();
        let cfg =
            RunConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        // Made absolute by the loader where the file exists (a checkout that ran the config).
        let model = if cfg
            .model
            .source
            .ends_with("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        {
            let gguf = common::smollm2::smollm2_gguf();
            prolora::source::ModelSource::resolve(gguf.to_str().unwrap(), "main")
                .unwrap()
                .config
        } else {
            let shapes = match cfg.model.source.as_str() {
                "meta-llama/Llama-2-7b-hf" => "llama2-7b",
                other => other,
            };
            prolora::model::preset::preset(shapes)
                .unwrap_or_else(|| panic!("{}: unknown model", path.display()))
        };
        cfg.adapter
            .param_count(&model)
            .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        checked += 1;
    }
    assert!(checked >= 8, "{checked} configs");
}

/// Values PyTorch and PEFT refuse are refused here too, one line naming the key and the range.
#[test]
fn absurd_values_are_refused_naming_the_key() {
    for (set, says) in [
        ("optim.lr=-1e-3", "optim.lr = -0.001 must be finite and ≥ 0"),
        (
            "optim.betas=[1.5, 0.999]",
            "optim.betas[0] = 1.5 must be finite and in [0, 1)",
        ),
        (
            "optim.betas=[0.9, 1.0]",
            "optim.betas[1] = 1 must be finite and in [0, 1)",
        ),
        ("optim.eps=nan", "optim.eps = NaN must be finite"),
        (
            "optim.weight_decay=-1",
            "optim.weight_decay = -1 must be finite and ≥ 0",
        ),
        (
            "optim.max_grad_norm=-1",
            "optim.max_grad_norm = -1 must be finite and ≥ 0",
        ),
        (
            "adapter.alpha=0",
            "adapter.alpha = 0 must be a positive number",
        ),
        (
            "adapter.rank=1000",
            "adapter.rank = 1000 exceeds min(in, out) = 128 of q_proj",
        ),
        (
            "adapter.rank=4611686018427387904",
            "adapter.rank = 4611686018427387904 is beyond any model",
        ),
        (
            "adapter.targets=[\"q_proj\", \"q_proj\"]",
            "adapter.targets names \"q_proj\" twice",
        ),
        ("output_dir=", "output_dir is empty"),
        ("train.keep_last=0", "train.keep_last must be at least 1"),
        ("train.log_every=0", "train.log_every must be at least 1"),
    ] {
        let err = error_of(&["train", "--config", "configs/demo.toml", "--set", set]);
        assert!(err.contains(says), "--set {set}: {err}");
    }
    let err = error_of(&[
        "params",
        "--model",
        "llama2-7b",
        "--method",
        "vera",
        "--rank",
        "18446744073709551615",
    ]);
    assert!(err.contains("beyond any model"), "{err}");
    let data = fixture("peft-lora/data.jsonl");
    let err = error_of(&[
        "eval",
        "--model",
        "tiny",
        "--data",
        &data,
        "--batch-size",
        "0",
    ]);
    assert!(err.contains("--batch-size must be at least 1"), "{err}");
    // transformers refuses max_new_tokens = 0; a negative number is one line too.
    for n in ["0", "-1"] {
        let err = error_of(&[
            "generate",
            "--model",
            "tiny",
            "--prompt",
            "hi",
            "--max-new-tokens",
            n,
        ]);
        assert!(err.contains(&format!("'{n}'")), "{err}");
    }
}

/// PyTorch accepts eps = 0, and a parameter without gradient then becomes 0/0: the run stops at
/// the non-finite eval loss, exits non-zero and names the likely causes with the run's values.
#[test]
fn a_non_finite_eval_loss_stops_the_run_naming_the_causes() {
    let tmp = tempfile::tempdir().unwrap();
    let o = prolora(&[
        "train",
        "--config",
        "configs/demo.toml",
        "--set",
        &format!("output_dir={}", tmp.path().join("run").display()),
        "--set",
        "optim.eps=0",
        "--set",
        "train.steps=1",
        "--quiet",
    ]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    let last = err.lines().last().unwrap();
    assert!(last.contains("eval loss NaN after step 1"), "{last}");
    assert!(
        last.contains("likely causes, most likely first: the learning rate is too high (lower optim.lr = 2e-3); optim.eps = 0"),
        "{last}"
    );
    assert!(!tmp.path().join("run/adapter_model.safetensors").exists());
}

/// `merge --model tiny` writes the preset out whole and adds the adapter: the merged model's
/// loss is the adapter's on tiny; a large preset of random weights is refused in one line.
#[test]
fn merge_into_the_tiny_preset_equals_its_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let o = common::train_demo(&run, 3, &["--set", "train.eval_every=0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = run.to_str().unwrap();
    let merged = tmp.path().join("merged");
    let merged = merged.to_str().unwrap();
    let o = prolora(&[
        "merge",
        "--model",
        "tiny",
        "--adapter",
        run,
        "--out",
        merged,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let loss = |args: &[&str]| {
        let mut all = vec!["eval", "--data", "data/sample_chat_eval.jsonl", "--json"];
        all.extend(args);
        json_of(&prolora(&all))["loss"].as_f64().unwrap()
    };
    let with_adapter = loss(&["--model", "tiny", "--adapter", run]);
    let base = loss(&["--model", "tiny"]);
    let ours = loss(&["--model", merged]);
    assert!(
        ((ours - with_adapter) / with_adapter).abs() < 1e-5,
        "merged {ours} vs adapter {with_adapter}"
    );
    assert!(
        (base - with_adapter).abs() > 1e-3,
        "the adapter changed nothing"
    );
    let err = stderr(&prolora(&[
        "merge",
        "--model",
        "llama2-7b",
        "--adapter",
        run,
        "--out",
        tmp.path().join("m7").to_str().unwrap(),
    ]));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("not worth merging"), "{err}");
}

/// `train --dtype` overrides the config's model.dtype, as the other commands' --dtype does, and
/// the run's config.toml records it.
#[test]
fn train_dtype_overrides_the_configs_model_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let o = common::train_demo(&run, 1, &["--set", "train.eval_every=0", "--dtype", "f64"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let snapshot = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(snapshot.contains("dtype = \"f64\""), "{snapshot}");
    let err = error_of(&["train", "--config", "configs/demo.toml", "--dtype", "f8"]);
    assert!(err.contains("f8") && err.contains("bf16"), "{err}");
}

/// `collect` and `plot` skip a broken run with a warning naming it, read a run whose last
/// metrics line was cut short by a kill, and take the same folder of runs.
#[test]
fn collect_and_plot_skip_a_broken_run() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    let o = prolora(&[
        "train",
        "--config",
        "configs/demo.toml",
        "--set",
        &format!("output_dir={}", good.display()),
        "--set",
        "train.steps=2",
        "--set",
        "train.eval_every=0",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(good.join("metrics.jsonl"))
        .unwrap();
    std::io::Write::write_all(&mut metrics, b"{\"step\": 3, \"lo").unwrap();
    let broken = tmp.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("config.toml"), "not = [toml").unwrap();
    std::fs::write(broken.join("metrics.jsonl"), "").unwrap();

    let o = prolora(&["collect", tmp.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning: skipping") && stderr(&o).contains("broken"));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("lora r8"));
    // One seed has a mean and no spread.
    let setting_row = table.lines().find(|l| l.starts_with("| lora r8")).unwrap();
    assert!(!setting_row.contains('±'), "{table}");

    let svg = tmp.path().join("loss.svg");
    let o = prolora(&[
        "plot",
        good.to_str().unwrap(),
        broken.to_str().unwrap(),
        "--out",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("skipping") && svg.exists());

    // The folder that collect took plots the same runs.
    let sweep_svg = tmp.path().join("sweep.svg");
    let o = prolora(&[
        "plot",
        tmp.path().to_str().unwrap(),
        "--out",
        sweep_svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&sweep_svg).unwrap(),
        std::fs::read_to_string(&svg).unwrap()
    );
}

/// Every writing command refuses an output that is, contains or lies inside one of its inputs,
/// and an existing output without --overwrite; `--out -` streams to stdout; a link is written
/// through, not replaced.
#[test]
fn write_commands_never_destroy_their_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("chat.jsonl");
    std::fs::copy(root().join("data/sample_chat.jsonl"), &data).unwrap();
    let original = std::fs::read(&data).unwrap();
    let data = data.to_str().unwrap();
    let model = fixture("peft-lora/base");
    let adapter = fixture("peft-lora/adapter");
    let parent = fixture("peft-lora");
    let cases: Vec<Vec<&str>> = vec![
        vec![
            "data",
            "encode",
            "--tokenizer",
            "tiny",
            "--data",
            data,
            "--out",
            data,
        ],
        vec![
            "data", "prepare", "--format", "messages", "--in", data, "--out", data,
        ],
        vec!["quantize", "--model", &model, "--out", &model],
        vec![
            "export",
            "--adapter",
            &adapter,
            "--model",
            &model,
            "--out",
            &adapter,
        ],
        vec![
            "merge",
            "--model",
            &model,
            "--adapter",
            &adapter,
            "--out",
            &model,
        ],
        // An output that contains an input (the base and the adapter both lie in it).
        vec![
            "merge",
            "--model",
            &model,
            "--adapter",
            &adapter,
            "--out",
            &parent,
        ],
    ];
    for args in &cases {
        let err = error_of(args);
        assert!(err.contains("would overwrite the input"), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read(data).unwrap(), original);
    let err = error_of(&[
        "train",
        "--config",
        "configs/demo.toml",
        "--set",
        "output_dir=data",
    ]);
    assert!(
        err.contains("output_dir") && err.contains("would overwrite the input"),
        "{err}"
    );

    // An existing output needs --overwrite; then it is replaced whole.
    let out = tmp.path().join("prepared.jsonl");
    std::fs::write(&out, "old").unwrap();
    let out_s = out.to_str().unwrap();
    let prepare = |extra: &[&str]| {
        let mut args = vec![
            "data", "prepare", "--format", "messages", "--in", data, "--out",
        ];
        args.extend(extra);
        prolora(&args)
    };
    let o = prepare(&[out_s]);
    assert!(
        !o.status.success() && stderr(&o).contains("pass --overwrite"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "old");
    let o = prepare(&[out_s, "--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), original);

    // A link is written through.
    let link = tmp.path().join("link.jsonl");
    std::os::unix::fs::symlink(&out, &link).unwrap();
    std::fs::write(&out, "old").unwrap();
    let o = prepare(&[link.to_str().unwrap(), "--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&out).unwrap(), original);

    // `-` is stdout.
    let o = prepare(&["-"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(o.stdout, original);
}

/// NaN in any loaded tensor — embeddings of the base, a tensor of the adapter — is an error
/// naming it, not a `loss NaN` with exit 0.
#[test]
fn non_finite_tensors_are_refused_by_name() {
    use candle_core::{Device, Tensor};
    let tmp = tempfile::tempdir().unwrap();
    let poison = |from: &Path, to: &Path, tensor: &str| {
        let mut tensors = candle_core::safetensors::load(from, &Device::Cpu).unwrap();
        let t = &tensors[tensor];
        let mut v: Vec<f32> = t
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        v[1] = f32::NAN;
        let poisoned = Tensor::from_vec(v, t.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(t.dtype())
            .unwrap();
        tensors.insert(tensor.to_string(), poisoned);
        candle_core::safetensors::save(&tensors, to).unwrap();
    };
    let base = root().join("tests/fixtures/peft-lora/base");
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(base.join(f), model.join(f)).unwrap();
    }
    poison(
        &base.join("model.safetensors"),
        &model.join("model.safetensors"),
        "model.embed_tokens.weight",
    );
    let data = fixture("peft-lora/data.jsonl");
    let err = error_of(&["eval", "--model", model.to_str().unwrap(), "--data", &data]);
    assert!(
        err.contains("model.embed_tokens.weight") && err.contains("NaN"),
        "{err}"
    );

    let adapter = tmp.path().join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    let peft = root().join("tests/fixtures/peft-lora/adapter");
    std::fs::copy(
        peft.join("adapter_config.json"),
        adapter.join("adapter_config.json"),
    )
    .unwrap();
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    poison(
        &peft.join("adapter_model.safetensors"),
        &adapter.join("adapter_model.safetensors"),
        key,
    );
    let base = fixture("peft-lora/base");
    let err = error_of(&[
        "eval",
        "--model",
        &base,
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        &data,
    ]);
    assert!(err.contains(key) && err.contains("NaN"), "{err}");
}

/// `generate` stops at the model's positions unless told to go on, so a huge
/// --max-new-tokens ends.
#[test]
fn generate_stops_at_the_models_positions() {
    let tmp = tempfile::tempdir().unwrap();
    let src = root().join("tests/fixtures/peft-lora/base");
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
    }
    let cfg_path = model.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["max_position_embeddings"] = serde_json::json!(24);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let o = prolora(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "1000000",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("stopped at the model's 24 positions"),
        "{}",
        stderr(&o)
    );
    // A tokenizer with ids beyond the model's vocabulary is one clear line, not a backtrace.
    let err = error_of(&[
        "generate",
        "--model",
        &fixture("llama-tied"),
        "--tokenizer",
        "tiny",
        "--prompt",
        "Hi",
    ]);
    assert!(
        err.contains("the tokenizer has 32000 tokens but the model's vocab_size is 256"),
        "{err}"
    );
}

/// Tied-LoRA's default targets are q, k, v in `train` as in `params`.
#[test]
fn tied_lora_defaults_to_q_k_v_everywhere() {
    let cfg: prolora::config::RunConfig = toml::from_str(
        "output_dir = \"x\"\n[model]\nsource = \"tiny\"\n[adapter]\nkind = \"tied-lora\"\n\
         [data]\ntrain = \"d.jsonl\"\n[train]\nsteps = 1\n",
    )
    .unwrap();
    assert_eq!(cfg.adapter.targets, ["q_proj", "k_proj", "v_proj"]);
    let out = json_of(&prolora(&[
        "params",
        "--model",
        "tiny",
        "--method",
        "tied-lora",
        "--json",
    ]));
    assert_eq!(
        out["targets"],
        serde_json::json!(["q_proj", "k_proj", "v_proj"])
    );
}

/// A run checks what it can locally before it downloads a model: a missing data file is named
/// before the Hub (here: offline, nothing cached) is asked for the 13 GB model.
#[test]
fn a_missing_data_file_is_named_before_any_download() {
    let err = error_of(&[
        "train",
        "--config",
        "configs/superni.toml",
        "--set",
        "data.train=no/such/train.jsonl",
    ]);
    assert!(
        err.contains("data file") && err.contains("no/such/train.jsonl"),
        "{err}"
    );
}

/// `merge` into a 4-bit checkpoint says in one line why not, and writes nothing.
#[test]
fn merge_into_a_4bit_checkpoint_says_why_not() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let err = error_of(&[
        "merge",
        "--model",
        &fixture("bnb-4bit-gqa"),
        "--adapter",
        &fixture("peft-lora/adapter"),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        err.contains("stored quantized (bitsandbytes)") && err.contains("full-precision"),
        "{err}"
    );
    assert!(!out.exists());
}

/// A run that cannot fit is refused before anything large is allocated, with the estimate and
/// the knobs that lower it; no machine has the terabytes these need.
#[test]
fn a_run_too_large_for_the_machine_is_refused_with_the_estimate() {
    let tmp = tempfile::tempdir().unwrap();
    let out = format!("output_dir={}", tmp.path().join("run").display());
    let base = ["train", "--config", "configs/demo.toml", "--set", &out];

    // The base alone (from its config, before any weight exists): 70B in f64.
    let mut args = base.to_vec();
    args.extend([
        "--set",
        "model.source=llama2-70b",
        "--set",
        "model.dtype=f64",
    ]);
    let err = error_of(&args);
    assert!(
        err.contains("this run needs about") && err.contains("GiB"),
        "{err}"
    );
    assert!(err.contains("base weights 5"), "{err}");
    assert!(err.contains("set model.quantize = \"nf4\""), "{err}");
    assert!(!err.contains("micro_batch_size"), "{err}");

    // Activations: the whole data set in one pass through 13B without checkpointing.
    let mut args = base.to_vec();
    args.extend([
        "--set",
        "model.source=llama2-13b",
        "--set",
        "model.quantize=nf4",
        "--set",
        "model.dtype=f64",
        "--set",
        "train.batch_size=400",
    ]);
    let o = prolora(&args);
    let err = stderr(&o);
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    let last = err.lines().last().unwrap();
    assert!(last.starts_with("error: this run needs about"), "{err}");
    for knob in [
        "train.micro_batch_size (now 400",
        "data.max_seq_len",
        "train.gradient_checkpointing = true",
        "train.check_memory = false",
    ] {
        assert!(last.contains(knob), "{knob}: {last}");
    }
    assert!(!tmp.path().join("run").exists(), "nothing written");
}

/// Without `save_every` a run checkpoints every 5 % of its steps, so a crash loses little.
#[test]
fn checkpoints_are_written_by_default() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let o = prolora(&[
        "train",
        "--config",
        "configs/demo.toml",
        "--set",
        &format!("output_dir={}", run.display()),
        "--set",
        "train.steps=40",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.keep_last=100",
        "--set",
        "train.batch_size=2",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut steps: Vec<usize> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_prefix("step-")?.parse().ok()
        })
        .collect();
    steps.sort();
    assert_eq!(steps, (1..=20).map(|k| 2 * k).collect::<Vec<_>>());
}

/// Batch mode: prompts from a jsonl file, one completion line each, in order; sampling is
/// repeatable by seed; an existing --out is not replaced without --overwrite.
#[test]
fn generate_batch_mode_writes_one_completion_per_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"id\": \"a\", \"prompt\": \"What is 2 + 2?\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n\
         {\"id\": 7, \"prompt\": \"x\"}\n{\"id\": null, \"prompt\": \"y\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("out.jsonl");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            "tiny",
            "--prompts",
            prompts.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-new-tokens",
            "6",
            "--temperature",
            "0.8",
            "--seed",
            "3",
        ];
        args.extend(extra);
        prolora(&args)
    };
    let o = run(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let first = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<serde_json::Value> = first
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["id"], "a");
    assert_eq!(lines[1]["id"], 3, "the line number when no id is given");
    assert_eq!(lines[2]["id"], 7, "a number stays a number");
    assert_eq!(lines[3]["id"], 5, "a null id is no id");
    assert_eq!(
        lines[0]["prompt"],
        "<|user|>\nWhat is 2 + 2?\n<|assistant|>\n"
    );
    assert!(lines
        .iter()
        .all(|l| l["tokens"].as_u64().unwrap() <= 6 && l["output"].is_string()));

    let again = run(&[]);
    assert!(
        !again.status.success() && stderr(&again).contains("--out"),
        "{}",
        stderr(&again)
    );
    let o = run(&["--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        first,
        "the same seed, the same samples"
    );

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"x\"}\n").unwrap();
    let err = error_of(&[
        "generate",
        "--model",
        "tiny",
        "--prompts",
        bad.to_str().unwrap(),
    ]);
    assert!(
        err.contains("bad.jsonl:1") && err.contains("\"prompt\""),
        "{err}"
    );
    std::fs::write(&bad, "{\"id\": [1], \"prompt\": \"x\"}\n").unwrap();
    let err = error_of(&[
        "generate",
        "--model",
        "tiny",
        "--prompts",
        bad.to_str().unwrap(),
    ]);
    assert!(
        err.contains("bad.jsonl:1") && err.contains("must be a string or a number"),
        "{err}"
    );
    let err = error_of(&[
        "generate", "--model", "tiny", "--prompt", "x", "--top-p", "0",
    ]);
    assert!(err.contains("top_p = 0 must be in (0, 1]"), "{err}");
}

/// `prolora evaluate`: the README's demo line runs every benchmark on the samples and says what
/// its zeros mean; HumanEval without consent, a missing data file and an existing results file
/// are one clear error each, and nothing runs or is written.
#[test]
fn evaluate_runs_the_demo_and_refuses_what_it_must() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("all.json");
    let o = prolora(&[
        "evaluate",
        "--benchmark",
        "all",
        "--model",
        "tiny",
        "--data-dir",
        "data/eval",
        "--allow-code-execution",
        "--limit",
        "1",
        "--samples",
        "2",
        "--max-new-tokens",
        "32",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // It says what its zeros mean on the random tiny model.
    let stdout = String::from_utf8_lossy(&o.stdout);
    let note = stdout.lines().last().unwrap_or_default();
    assert!(
        note.contains("random weights") && note.contains("scores of 0 are expected"),
        "{stdout}"
    );
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for (b, key) in [
        ("mmlu", "average_acc"),
        ("gsm", "exact_match"),
        ("bbh", "average_exact_match"),
        ("humaneval", "pass@1"),
    ] {
        assert!(
            all[b]["metrics"][key].is_number(),
            "{b}: {}",
            all[b]["metrics"]
        );
        assert!(all[b]["settings"]["model"] == "tiny", "{b}");
    }
    assert!(all["tydiqa"]["metrics"]["average"]["f1"].is_number());
    // --limit 1: one example per subject, task, language, problem (× 2 samples).
    assert_eq!(all["mmlu"]["examples"].as_array().unwrap().len(), 3);
    assert_eq!(all["tydiqa"]["examples"].as_array().unwrap().len(), 9);
    assert_eq!(all["humaneval"]["examples"].as_array().unwrap().len(), 2);

    let err = error_of(&[
        "evaluate",
        "--benchmark",
        "humaneval",
        "--model",
        "tiny",
        "--data-dir",
        "data/eval",
    ]);
    assert!(
        err.contains("--allow-code-execution") && err.contains("nothing has run"),
        "{err}"
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = error_of(&[
        "evaluate",
        "--benchmark",
        "gsm",
        "--model",
        "tiny",
        "--data-dir",
        empty.to_str().unwrap(),
    ]);
    assert!(
        err.contains("gsm/test.jsonl") && err.contains("prepare_eval_data.sh"),
        "{err}"
    );
    let err = error_of(&[
        "evaluate",
        "--benchmark",
        "mmlu",
        "--model",
        "tiny",
        "--data-dir",
        "data/eval",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("--overwrite"), "{err}");
    let err = error_of(&[
        "evaluate",
        "--benchmark",
        "squad",
        "--model",
        "tiny",
        "--data-dir",
        "data/eval",
    ]);
    assert!(err.contains("mmlu, gsm, bbh, tydiqa, humaneval"), "{err}");
}

/// A killed evaluation continues where it stopped: completions are journaled as they are made,
/// the rerun generates only the rest, and its results equal an uninterrupted run's.
#[test]
fn a_killed_evaluation_continues_from_its_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, cut) = (tmp.path().join("whole.json"), tmp.path().join("cut.json"));
    let args = |out: &Path| -> Vec<String> {
        [
            "evaluate",
            "--benchmark",
            "gsm",
            "--model",
            "tiny",
            "--data-dir",
            "data/eval",
            "--batch-size",
            "1",
            "--max-new-tokens",
            "24",
            "--overwrite",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let o = Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args(args(&whole))
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let journal = tmp.path().join("cut.json.gsm.partial.jsonl");
    // Its first line names the evaluation; a completion a line after it.
    let completions =
        || std::fs::read_to_string(&journal).map_or(0, |t| t.lines().count().saturating_sub(1));
    let mut child = Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args(args(&cut))
        .current_dir(root())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while completions() < 2 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "no completion journaled"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = completions();
    assert!(kept < 8, "the run finished before it was killed");

    let o = Command::new(env!("CARGO_BIN_EXE_prolora"))
        .args(args(&cut))
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("completions made before"),
        "{}",
        stderr(&o)
    );
    assert!(
        !journal.exists(),
        "the journal is removed once the results are written"
    );
    let read = |p: &Path| -> serde_json::Value {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("seconds");
        v["settings"].as_object_mut().unwrap().remove("data_dir");
        v
    };
    assert_eq!(read(&cut), read(&whole));
}
