//! The optimizer against PyTorch, and the trainer's gradient paths against each other.

mod common;

use candle_core::{Device, Tensor, Var};
use prolora::ctx::Ctx;
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
            .zip(&vars)
            .map(|(n, v)| (n.to_string(), v.clone(), 1.0))
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
    let (model, set) = common::tiny_lora_model(dropout);
    let vars: Vec<Var> = set.trainable().into_iter().map(|(_, v, _)| v).collect();
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

/// The training forward computes the real tokens alone (padding packed away); the padded
/// forward (every position through every layer) gives the same loss and gradients.
#[test]
fn packing_the_padding_away_gives_the_padded_loss_and_gradients() {
    use prolora::loss::{summed_loss, summed_loss_of_hidden};
    let (model, set) = common::tiny_lora_model(0.0);
    let vars: Vec<Var> = set.trainable().into_iter().map(|(_, v, _)| v).collect();
    let ex = examples();
    let batch = Batch::new(&ex.iter().collect::<Vec<_>>());
    let ctx = Ctx::train(7);
    let ids = batch.input_ids(&Device::Cpu).unwrap();
    let (padded, n) = summed_loss_of_hidden(
        &model,
        &model.hidden(&ids, &ctx).unwrap(),
        &batch,
        None,
        true,
    )
    .unwrap();
    let (packed, m) = summed_loss(&model, &batch, &ctx, true).unwrap();
    assert_eq!(n, m);
    let scalar = |t: &Tensor| t.to_scalar::<f64>().unwrap();
    assert!((scalar(&packed) - scalar(&padded)).abs() <= 1e-12 * scalar(&padded).abs());
    let grads = |t: &Tensor| -> Vec<Vec<f64>> {
        let store = t.backward().unwrap();
        vars.iter()
            .map(|v| {
                let g = store.get(v.as_tensor()).expect("a gradient");
                g.flatten_all().unwrap().to_vec1().unwrap()
            })
            .collect()
    };
    assert_close(&grads(&packed), &grads(&padded), "packed vs padded");
}

#[test]
fn accumulated_micro_batches_give_the_whole_batch_gradient() {
    let ex = examples();
    let whole = grads_of(&[&ex], false, 0.0);
    let split = grads_of(&[&ex[..2], &ex[2..]], false, 0.0);
    assert_close(&split, &whole, "2 micro-batches vs one batch");
}

fn optimizer_for(set: &prolora::adapters::AdapterSet) -> AdamW {
    AdamW::new(
        set.trainable(),
        AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )
}

#[test]
fn checkpoints_round_trip_and_a_half_written_one_is_never_used() {
    use prolora::train::checkpoint::{self, TrainerState};
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path();
    let (model, set) = common::tiny_lora_model(0.0);
    let mut opt = optimizer_for(&set);
    // One real update so the moments are non-zero.
    let vars: Vec<Var> = set.trainable().into_iter().map(|(_, v, _)| v).collect();
    let batch = Batch::new(&examples().iter().collect::<Vec<_>>());
    let mut acc: Grads = vec![None; vars.len()];
    accumulate_grads(&model, &batch, &Ctx::eval(), &vars, 1.0, false, &mut acc).unwrap();
    opt.step(&acc, 1e-2, 1.0).unwrap();
    let state = TrainerState {
        step: 3,
        samples_consumed: 12,
        optimizer_updates: 1,
    };
    checkpoint::save(run, &set, "tiny", &opt, &state, 2).unwrap();

    // A save killed half-way leaves only a temporary directory, which is never listed.
    let half = run.join("checkpoints/.step-0000006.tmp");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("adapter_model.safetensors"), b"trunc").unwrap();
    let listed = checkpoint::list(run).unwrap();
    assert_eq!(listed.iter().map(|c| c.0).collect::<Vec<_>>(), vec![3]);

    // Restoring into a freshly initialised model gives back the values and the moments.
    let (_, fresh) = common::tiny_lora_model(0.0);
    let mut fresh_opt = optimizer_for(&fresh);
    let restored = checkpoint::load(&listed[0].1, &fresh, &mut fresh_opt).unwrap();
    assert_eq!(restored, state);
    for ((name, a, _), (_, b, _)) in set.trainable().iter().zip(fresh.trainable().iter()) {
        let (a, b): (Vec<f64>, Vec<f64>) = (
            a.flatten_all().unwrap().to_vec1().unwrap(),
            b.flatten_all().unwrap().to_vec1().unwrap(),
        );
        // Saved as f32: equal to f32 precision.
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-6 * x.abs().max(1e-3),
                "{name}: {x} vs {y}"
            );
        }
    }
    let (sa, sb) = (
        opt.state_tensors().unwrap(),
        fresh_opt.state_tensors().unwrap(),
    );
    for (k, t) in &sa {
        let d = (t - &sb[k])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{k}");
    }

    // A failing write (here: the target path is blocked by a file) is a clear error and keeps
    // the good checkpoint.
    let blocked = run.join("checkpoints/.step-0000009.tmp");
    std::fs::write(&blocked, b"not a directory").unwrap();
    let later = TrainerState { step: 9, ..state };
    let err = checkpoint::save(run, &set, "tiny", &opt, &later, 2).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("step 9") && msg.contains("earlier checkpoints are kept"),
        "{msg}"
    );
    assert_eq!(
        checkpoint::list(run)
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>(),
        vec![3]
    );
}

#[test]
fn a_batcher_restored_from_its_count_continues_identically() {
    use prolora::data::batch::{Batcher, Order};
    let data: Vec<Encoded> = (0..23)
        .map(|i| Encoded {
            input_ids: vec![1; 3 + (i * 7) % 11],
            labels: vec![i as i64; 3 + (i * 7) % 11],
        })
        .collect();
    let ids = |b: &Batch| b.input_ids(&Device::Cpu).unwrap().dims().to_vec();
    for order in [Order::LengthGrouped, Order::Shuffle, Order::File] {
        for steps_before in [0, 1, 5, 6, 13] {
            let mut a = Batcher::with_grad_accum(&data, 2, 2, 9).with_order(order);
            for _ in 0..steps_before {
                a.next_step();
            }
            let mut b = Batcher::with_grad_accum(&data, 2, 2, 9).with_order(order);
            b.skip_to(a.consumed());
            for _ in 0..12 {
                let (x, y) = (a.next_step(), b.next_step());
                assert_eq!(x.len(), y.len());
                for (p, q) in x.iter().zip(&y) {
                    assert_eq!(ids(p), ids(q), "{order:?} after {steps_before} steps");
                    assert_eq!(p.prediction_rows(), q.prediction_rows());
                }
            }
            assert_eq!(a.epoch, b.epoch);
        }
    }
}

#[test]
fn dropout_drops_p_scales_the_rest_and_is_reproducible() {
    let x = Tensor::ones(200_000, candle_core::DType::F32, &Device::Cpu).unwrap();
    let draw = |seed| -> Vec<f32> {
        Ctx::train(seed)
            .dropout(&x, 0.1)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let a = draw(5);
    let dropped = a.iter().filter(|v| **v == 0.0).count() as f64 / a.len() as f64;
    assert!((dropped - 0.1).abs() < 0.003, "dropped {dropped}");
    assert!(a.iter().all(|v| *v == 0.0 || (*v - 1.0 / 0.9).abs() < 1e-6));
    assert_eq!(a, draw(5));
    assert_ne!(a, draw(6));
    // Eval mode is the identity.
    let e: Vec<f32> = Ctx::eval().dropout(&x, 0.1).unwrap().to_vec1().unwrap();
    assert!(e.iter().all(|v| *v == 1.0));
}
