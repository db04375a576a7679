//! Gradient accumulation: a step split into micro-batches gives the loss and the gradients of the
//! same examples as one batch (the mean over all label tokens of the step), padding aside.

use candle_core::{DType, Device, Tensor};
use prolora::adapters::{AdapterConfig, Ctx};
use prolora::data::batch::Batch;
use prolora::data::chat::Encoded;
use prolora::loss::step_loss_and_grads;
use prolora::model::weights::RandomWeights;
use prolora::model::{Llama, LlamaConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// A tiny f64 model with LoRA everywhere and non-zero B.
fn tiny_f64_model() -> Llama {
    let cfg = LlamaConfig::from_json(
        r#"{"vocab_size": 11, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
            "rope_theta": 100.0, "tie_word_embeddings": false}"#,
    )
    .unwrap();
    let mut model = Llama::load(&cfg, &RandomWeights::new(3), DType::F64, &Device::Cpu).unwrap();
    let adapter = AdapterConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        ..Default::default()
    };
    let mut rng = StdRng::seed_from_u64(7);
    model
        .attach(|_, _, shape| {
            Ok(Some(adapter.build(
                shape,
                DType::F64,
                &Device::Cpu,
                &mut rng,
            )?))
        })
        .unwrap();
    for (name, var) in model.trainable() {
        if name.ends_with("lora_B.weight") {
            let v: Vec<f64> = prolora::adapters::uniform(var.elem_count(), 0.5, &mut rng)
                .into_iter()
                .map(f64::from)
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    model
}

#[test]
fn micro_batches_accumulate_to_the_whole_batch() {
    let model = tiny_f64_model();
    let vars: Vec<_> = model.trainable().into_iter().map(|(_, v)| v).collect();
    let ex = |ids: &[u32], trained_from: usize| Encoded {
        input_ids: ids.to_vec(),
        labels: ids
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if i >= trained_from {
                    i64::from(t)
                } else {
                    -100
                }
            })
            .collect(),
    };
    // Different lengths and label counts, so a per-micro-batch mean would weigh them wrongly.
    let examples = [
        ex(&[1, 5, 7, 3, 9, 2], 2),
        ex(&[1, 4, 4, 10], 3),
        ex(&[1, 6, 2, 8, 8, 8, 3, 2], 4),
        ex(&[1, 9, 2], 1),
    ];
    let batch = |idx: &[usize]| Batch::new(&idx.iter().map(|&i| &examples[i]).collect::<Vec<_>>());
    let ctx = Ctx::eval();
    let (loss, count, whole) =
        step_loss_and_grads(&model, &[batch(&[0, 1, 2, 3])], &ctx, &vars).unwrap();
    for split in [
        vec![batch(&[0, 1]), batch(&[2, 3])],
        vec![batch(&[0]), batch(&[1, 2, 3])],
    ] {
        let (l, c, acc) = step_loss_and_grads(&model, &split, &ctx, &vars).unwrap();
        assert_eq!(c, count);
        assert!((l - loss).abs() < 1e-12, "loss {l} vs {loss}");
        for v in &vars {
            let a: Vec<f64> = acc
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let w: Vec<f64> = whole
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (x, y) in a.iter().zip(&w) {
                assert!((x - y).abs() < 1e-12 + 1e-10 * y.abs(), "{x} vs {y}");
            }
        }
    }
}
