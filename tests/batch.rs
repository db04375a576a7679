//! Length-grouped batches against HF transformers' `LengthGroupedSampler` (goldens made by
//! `scripts/reference/make_data_goldens.py sampler`), padding, held-out split, accumulation.

use candle_core::Device;
use prolora::data::batch::{length_grouped_order, split_eval, Batch, Batcher};
use prolora::data::chat::{Encoded, IGNORE_INDEX};
use prolora::data::rng::Mt19937;
use serde_json::Value;

const CASES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/length-grouped/cases.json"
);

fn cases() -> Vec<Value> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(CASES).unwrap()).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn usizes(v: &Value) -> Vec<usize> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Example `i` of length `len`: its first token is `i`, so a batch tells which examples it holds.
fn example(i: usize, len: usize) -> Encoded {
    let mut ids = vec![7u32; len];
    ids[0] = i as u32;
    Encoded {
        input_ids: ids.clone(),
        labels: ids.iter().map(|&t| t as i64).collect(),
    }
}

fn first_tokens(batch: &Batch) -> Vec<usize> {
    batch
        .input_ids(&Device::Cpu)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap()
        .iter()
        .map(|r| r[0] as usize)
        .collect()
}

#[test]
fn torch_randperm_is_replayed_bit_for_bit() {
    for c in cases() {
        let n = c["lengths"].as_array().unwrap().len();
        let mut g = Mt19937::torch(c["seed"].as_u64().unwrap());
        for (epoch, want) in c["randperm"].as_array().unwrap().iter().enumerate() {
            assert_eq!(g.randperm(n), usizes(want), "{} epoch {epoch}", c["name"]);
        }
    }
}

#[test]
fn length_grouped_order_equals_hf_given_the_permutation() {
    for c in cases() {
        let lengths = usizes(&c["lengths"]);
        let bs = c["batch_size"].as_u64().unwrap() as usize;
        for (perm, want) in c["randperm"]
            .as_array()
            .unwrap()
            .iter()
            .zip(c["epochs"].as_array().unwrap())
        {
            let got = length_grouped_order(&lengths, bs, &usizes(perm));
            assert_eq!(got, usizes(want), "{}", c["name"]);
        }
    }
}

#[test]
fn batcher_yields_hf_sampler_order_for_two_epochs() {
    for (i, c) in cases().into_iter().enumerate() {
        let lengths = usizes(&c["lengths"]);
        let bs = c["batch_size"].as_u64().unwrap() as usize;
        let examples: Vec<Encoded> = lengths
            .iter()
            .enumerate()
            .map(|(i, &l)| example(i, l))
            .collect();
        // HF groups by train_batch_size · gradient_accumulation_steps: every other case takes
        // that batch as 2 accumulated micro-batches.
        let seed = c["seed"].as_u64().unwrap();
        let mut batcher = if i % 2 == 0 {
            Batcher::new(&examples, bs, seed)
        } else {
            Batcher::with_grad_accum(&examples, bs / 2, 2, seed)
        };
        let want: Vec<usize> = c["epochs"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(usizes)
            .collect();
        let mut got = Vec::new();
        while got.len() < want.len() {
            for b in batcher.next_step() {
                assert!(b.tokens() > 0);
                got.extend(first_tokens(&b));
            }
        }
        assert_eq!(got, want, "{}", c["name"]);
        assert_eq!(batcher.epoch, 2);
    }
}

#[test]
fn steps_stop_at_the_epoch_end_and_micro_batches_are_short_there() {
    let examples: Vec<Encoded> = (0..10).map(|i| example(i, 3 + i)).collect();
    let mut b = Batcher::with_grad_accum(&examples, 3, 2, 5);
    let sizes = |step: Vec<Batch>| {
        step.iter()
            .map(|b| first_tokens(b).len())
            .collect::<Vec<_>>()
    };
    assert_eq!(sizes(b.next_step()), vec![3, 3]);
    assert_eq!(sizes(b.next_step()), vec![3, 1]);
    assert_eq!(b.epoch, 1);
    assert_eq!(sizes(b.next_step()), vec![3, 3]);
    assert_eq!(b.epoch, 2);
}

#[test]
fn padding_is_right_with_ignored_labels() {
    let a = Encoded {
        input_ids: vec![1, 5, 6],
        labels: vec![IGNORE_INDEX, 5, 6],
    };
    let b = Encoded {
        input_ids: vec![1, 9],
        labels: vec![IGNORE_INDEX, 9],
    };
    let batch = Batch::new(&[&a, &b]);
    let ids = batch
        .input_ids(&Device::Cpu)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    assert_eq!(ids, vec![vec![1, 5, 6], vec![1, 9, 0]]);
    assert_eq!(
        batch.labels(),
        &[IGNORE_INDEX, 5, 6, IGNORE_INDEX, 9, IGNORE_INDEX]
    );
    // Position t-1 predicts label t; the padded position predicts nothing.
    assert_eq!(batch.prediction_rows(), (vec![0, 1, 3], vec![5, 6, 9]));
}

#[test]
fn eval_split_is_seeded_disjoint_and_keeps_file_order() {
    let examples: Vec<Encoded> = (0..50).map(|i| example(i, 2)).collect();
    let (train, eval) = split_eval(examples.clone(), 8, 42).unwrap();
    let ids = |s: &[Encoded]| {
        s.iter()
            .map(|e| e.input_ids[0] as usize)
            .collect::<Vec<_>>()
    };
    let mut held: Vec<usize> = Mt19937::torch(42).randperm(50)[..8].to_vec();
    held.sort();
    assert_eq!(ids(&eval), held);
    let rest: Vec<usize> = (0..50).filter(|i| !held.contains(i)).collect();
    assert_eq!(ids(&train), rest);
    let (_, eval2) = split_eval(examples.clone(), 8, 43).unwrap();
    assert_ne!(ids(&eval2), ids(&eval));
    let err = split_eval(examples, 50, 42).unwrap_err().to_string();
    assert!(err.contains("data.eval_size = 50"), "{err}");
}
