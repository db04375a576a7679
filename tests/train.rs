//! The optimizer against PyTorch, and the trainer's gradient paths against each other.

mod common;

use candle_core::{Device, Tensor, Var};
use prolora::adapters::Ctx;
use prolora::data::batch::Batch;
use prolora::data::chat::Encoded;
use prolora::train::optim::{clip_factor, AdamW, AdamWParams};
use prolora::train::schedule::linear_with_warmup;
use prolora::train::step::{accumulate_grads, Grads};
use std::path::PathBuf;

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Six steps of AdamW + clipping + warm-up schedule equal torch.optim.AdamW,
/// clip_grad_norm_ and get_linear_schedule_with_warmup (scripts/reference/optim_golden.py).
#[test]
fn adamw_clipping_and_schedule_match_pytorch() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/optim/adamw_golden.json");
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let names = ["p0", "p1"];
    let vars: Vec<Var> = names
        .iter()
        .map(|n| {
            let shape: Vec<usize> = serde_json::from_value(g["shapes"][n].clone()).unwrap();
            Var::from_tensor(&Tensor::from_vec(floats(&g["init"][n]), shape, &Device::Cpu).unwrap())
                .unwrap()
        })
        .collect();
    let betas = g["betas"].as_array().unwrap();
    let mut opt = AdamW::new(
        names
            .iter()
            .map(|n| n.to_string())
            .zip(vars.iter().cloned())
            .collect(),
        AdamWParams {
            beta1: betas[0].as_f64().unwrap(),
            beta2: betas[1].as_f64().unwrap(),
            eps: g["eps"].as_f64().unwrap(),
            weight_decay: g["weight_decay"].as_f64().unwrap(),
        },
    );
    let (base_lr, warmup, total) = (
        g["base_lr"].as_f64().unwrap(),
        g["warmup"].as_u64().unwrap() as usize,
        g["total"].as_u64().unwrap() as usize,
    );
    for (t, step) in g["steps"].as_array().unwrap().iter().enumerate() {
        let lr = linear_with_warmup(base_lr, t, total, warmup);
        assert!(
            (lr - step["lr"].as_f64().unwrap()).abs() < 1e-12,
            "lr of step {t}"
        );
        let grads: Grads = names
            .iter()
            .zip(&vars)
            .map(|(n, v)| {
                Some(Tensor::from_vec(floats(&step["grads"][n]), v.shape(), &Device::Cpu).unwrap())
            })
            .collect();
        let (norm, scale) = clip_factor(&grads, g["max_norm"].as_f64().unwrap()).unwrap();
        let want_norm = step["grad_norm"].as_f64().unwrap();
        assert!(
            ((norm - want_norm) / want_norm).abs() < 1e-6,
            "norm {norm} vs {want_norm}"
        );
        opt.step(&grads, lr, scale).unwrap();
        for (n, v) in names.iter().zip(&vars) {
            let ours: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
            for (i, (a, b)) in ours
                .iter()
                .zip(floats(&step["params_after"][n]))
                .enumerate()
            {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "step {t} {n}[{i}]: {a} vs torch {b}"
                );
            }
        }
    }
}

fn examples() -> Vec<Encoded> {
    vec![
        Encoded {
            input_ids: vec![1, 5, 7, 3, 9, 2],
            labels: vec![-100, -100, 7, 3, 9, 2],
        },
        Encoded {
            input_ids: vec![1, 4, 4, 10],
            labels: vec![-100, -100, -100, 10],
        },
        Encoded {
            input_ids: vec![1, 6, 2, 8, 8],
            labels: vec![-100, 6, 2, -100, 8],
        },
        Encoded {
            input_ids: vec![1, 3, 3, 3, 3, 3, 5],
            labels: vec![-100, -100, -100, -100, 3, 3, 5],
        },
    ]
}

fn grads_of(micro: &[&[Encoded]], checkpointing: bool, dropout: f64) -> Vec<Vec<f64>> {
    let model = common::tiny_f64_model_with_dropout(dropout);
    let vars: Vec<Var> = model.trainable().into_iter().map(|(_, v)| v).collect();
    let batches: Vec<Batch> = micro
        .iter()
        .map(|m| Batch::new(&m.iter().collect::<Vec<_>>()))
        .collect();
    let labels: usize = batches.iter().map(|b| b.label_tokens()).sum();
    let mut acc: Grads = vec![None; vars.len()];
    for (k, b) in batches.iter().enumerate() {
        let ctx = Ctx::train(100 + k as u64);
        accumulate_grads(
            &model,
            b,
            &ctx,
            &vars,
            labels as f64,
            checkpointing,
            &mut acc,
        )
        .unwrap();
    }
    acc.into_iter()
        .map(|g| g.unwrap().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

fn assert_close(a: &[Vec<f64>], b: &[Vec<f64>], what: &str) {
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            assert!(
                (p - q).abs() <= 1e-10 * (1.0 + q.abs()),
                "{what}: {p} vs {q}"
            );
        }
    }
}

#[test]
fn activation_checkpointing_gives_the_full_graph_gradients_even_with_dropout() {
    let ex = examples();
    let all: &[&[Encoded]] = &[&ex];
    let full = grads_of(all, false, 0.3);
    let recomputed = grads_of(all, true, 0.3);
    assert_close(&recomputed, &full, "checkpointed vs full graph");
    // Dropout is really on: without it the gradients differ.
    let no_dropout = grads_of(all, false, 0.0);
    assert!(no_dropout
        .iter()
        .flatten()
        .zip(full.iter().flatten())
        .any(|(a, b)| (a - b).abs() > 1e-6));
}

#[test]
fn accumulated_micro_batches_give_the_whole_batch_gradient() {
    let ex = examples();
    let whole = grads_of(&[&ex], false, 0.0);
    let split = grads_of(&[&ex[..2], &ex[2..]], false, 0.0);
    assert_close(&split, &whole, "2 micro-batches vs one batch");
}
