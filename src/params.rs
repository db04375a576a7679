//! `prolora params`: exact trainable-parameter counts from the model's shapes alone (no
//! weights), and the paper's parameter tables recomputed.

use crate::adapters::registry;
use crate::adapters::{AdapterConfig, ProloraConfig, TiedLoraConfig, VeraConfig};
use crate::model::{preset, LlamaConfig};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The adapter config `prolora params` counts: `method` with `rank`, `targets` (default: the
/// method's) and `adapter.KEY=VALUE` options, read exactly as a run config's `[adapter]`.
pub fn adapter_config(
    method: &str,
    rank: usize,
    targets: Option<Vec<String>>,
    overrides: &[String],
) -> Result<AdapterConfig> {
    let reg = registry::by_kind(method).context("--method")?;
    let targets =
        targets.unwrap_or_else(|| reg.default_targets.iter().map(|s| s.to_string()).collect());
    let mut table = toml::Table::new();
    let mut adapter = toml::Table::new();
    adapter.insert("kind".into(), method.into());
    let rank =
        i64::try_from(rank).map_err(|_| anyhow::anyhow!("--rank {rank} is beyond any model"))?;
    adapter.insert("rank".into(), rank.into());
    adapter.insert("targets".into(), targets.into());
    table.insert("adapter".into(), adapter.into());
    for o in overrides {
        if !o.starts_with("adapter.") {
            bail!("--set {o:?}: params takes adapter options only, e.g. --set adapter.unshared_rank=1");
        }
        crate::config::apply_override(&mut table, o)?;
    }
    let adapter = table.remove("adapter").expect("inserted above");
    Ok(adapter.try_into::<AdapterConfig>()?)
}

/// The count of `cfg` on `model` with its size in f32 and bf16.
pub fn report(model_name: &str, model: &LlamaConfig, cfg: &AdapterConfig) -> Result<Value> {
    let n = cfg.param_count(model)?;
    let mut v = json!({
        "model": model_name,
        "method": cfg.kind(),
        "rank": cfg.rank,
        "targets": cfg.targets,
        "layers": model.num_hidden_layers,
        "params": n,
        "bytes_f32": 4 * n,
        "bytes_bf16": 2 * n,
    });
    // The method's own options (PRoLoRA's u, m, n, …).
    v["options"] = serde_json::to_value(cfg.method.to_table())?;
    Ok(v)
}

/// One line of text for a report.
pub fn describe(r: &Value) -> String {
    let n = r["params"].as_u64().unwrap_or(0);
    let extra: String = r["options"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(key, value)| format!(", {key} {value}"))
        .collect();
    format!(
        "{}: {} rank {}{extra}, {} linears × {} layers: {} trainable parameters \
         ({} f32, {} bf16)",
        r["model"].as_str().unwrap_or(""),
        r["method"].as_str().unwrap_or(""),
        r["rank"],
        r["targets"].as_array().map_or(0, |t| t.len()),
        r["layers"],
        grouped(n),
        mib(4 * n),
        mib(2 * n),
    )
}

/// 4997120 → "4,997,120".
pub fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn millions(n: usize) -> String {
    format!("{:.2}M", n as f64 / 1e6)
}

fn lora(rank: usize) -> AdapterConfig {
    AdapterConfig {
        rank,
        ..Default::default()
    }
}

fn prolora(rank: usize, unshared: usize, sharing: usize) -> AdapterConfig {
    AdapterConfig {
        rank,
        ..AdapterConfig::of(ProloraConfig {
            unshared_rank: unshared,
            sharing_rate_a: sharing,
            ..Default::default()
        })
    }
}

/// The paper's Table 1 and the parameter column of its Table 2, computed here, with the
/// paper's figure beside ours and a note where they differ.
pub fn paper_tables() -> Result<String> {
    let shape = |name: &str| preset::preset(name).expect("a preset");
    let mut out = String::from(
        "Table 1: LoRA on all seven linears (bytes: f32, MiB)\n\
         model       rank  ours                                paper            note\n",
    );
    let table1 = [
        (
            "llama2-7b",
            [
                (2, "5.00M 19MB"),
                (16, "39.98M 153MB"),
                (64, "159.91M 610MB"),
            ],
        ),
        (
            "llama2-13b",
            [
                (2, "6.26M 24MB"),
                (16, "50.07M 191MB"),
                (64, "200.28M 764MB"),
            ],
        ),
        (
            "llama2-70b",
            [
                (2, "11.27M 43MB"),
                (16, "90.18M 344MB"),
                (64, "360.71M 1,376MB"),
            ],
        ),
    ];
    for (model, rows) in table1 {
        let m = shape(model);
        for (rank, paper) in rows {
            let n = lora(rank).param_count(&m)?;
            let ours = format!(
                "{} ({}) {}",
                millions(n),
                grouped(n as u64),
                mib(4 * n as u64)
            );
            let note = match model {
                "llama2-13b" => "paper counts 32 layers (13B has 40)",
                "llama2-70b" => {
                    "paper counts 32 layers and full-width k/v (70B: 80 layers, k/v out 1024)"
                }
                _ => "",
            };
            out += &format!("{model:<11} {rank:>4}  {ours:<35} {paper:<16} {note}\n");
        }
    }
    out += "\nTable 2: trainable parameters on LLaMA-2-7B\n\
            method     setting                ours                    paper   note\n";
    let m7 = shape("llama2-7b");
    let qkv: Vec<String> = ["q_proj", "k_proj", "v_proj"].map(String::from).to_vec();
    let table2: Vec<(&str, &str, AdapterConfig, &str, &str)> = vec![
        ("LoRA", "r 2", lora(2), "5.00M", ""),
        ("LoRA", "r 8", lora(8), "19.99M", ""),
        (
            "LoRA",
            "r 16",
            lora(16),
            "40.98M",
            "paper's Table 1 has 39.98M for the same setting",
        ),
        (
            "VeRA",
            "r 256",
            AdapterConfig {
                rank: 256,
                ..AdapterConfig::of(VeraConfig::default())
            },
            "1.42M",
            "",
        ),
        (
            "Tied LoRA",
            "r 256, q/k/v",
            AdapterConfig {
                rank: 256,
                targets: qkv,
                ..AdapterConfig::of(TiedLoraConfig::default())
            },
            "4.60M",
            "",
        ),
        ("PRoLoRA", "r 8, u 1, m 7", prolora(8, 1, 7), "5.00M", ""),
        (
            "PRoLoRA",
            "r 4, u 1, m 3",
            prolora(4, 1, 3),
            "5.00M",
            "paper gives r 4/8 only; u, m ours",
        ),
        (
            "PRoLoRA",
            "r 16, u 7, m 9",
            prolora(16, 7, 9),
            "19.99M",
            "paper gives r 16/32 only; u, m ours",
        ),
        (
            "PRoLoRA",
            "r 32, u 7, m 25",
            prolora(32, 7, 25),
            "19.99M",
            "paper gives r 16/32 only; u, m ours",
        ),
    ];
    for (method, setting, cfg, paper, note) in table2 {
        let n = cfg.param_count(&m7)?;
        let ours = format!("{} ({})", millions(n), grouped(n as u64));
        out += &format!("{method:<10} {setting:<22} {ours:<23} {paper:<7} {note}\n");
    }
    Ok(out)
}
