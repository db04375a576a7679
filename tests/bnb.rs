//! bitsandbytes' serialized 4-bit checkpoints: reading transformers' `save_pretrained` output
//! (tests/fixtures/bnb-4bit-gqa, scripts/reference/make_nf4_model_goldens.py), writing our own
//! with `prolora quantize`, and clear errors for broken ones.

use candle_core::{DType, Device, Tensor};
use prolora::ctx::Ctx;
use prolora::model::config::{linear_path, BLOCK_LINEARS};
use prolora::model::nf4::{Nf4Tensor, Quantization};
use prolora::model::weights::{SafetensorsWeights, WeightSource};
use prolora::source::ModelSource;
use std::collections::HashMap;
use std::path::Path;

mod common;
use common::fixture;

fn linear_names(source: &ModelSource) -> Vec<(String, [usize; 2])> {
    let cfg = &source.config;
    (0..cfg.num_hidden_layers)
        .flat_map(|l| {
            BLOCK_LINEARS.iter().map(move |m| {
                let (o, i) = cfg.linear_shape(m).unwrap();
                (
                    format!("model.layers.{l}.{}.weight", linear_path(m)),
                    [o, i],
                )
            })
        })
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

const NF4: Quantization = Quantization::Nf4 { double_quant: true };

#[test]
fn reads_transformers_4bit_checkpoint_bit_exactly() {
    let dir = fixture("bnb-4bit-gqa");
    let source = ModelSource::resolve(dir.to_str().unwrap(), "main").unwrap();
    let weights = SafetensorsWeights::from_dir(&dir).unwrap();
    let golden =
        candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
    let names = linear_names(&source);
    assert_eq!(names.len(), 14);
    for (name, shape) in &names {
        let q = weights.get_nf4(name, shape, true).unwrap();
        let ours: Vec<u32> = q
            .to_tensor(DType::F32, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let want: Vec<u32> = golden[&format!("dequant.{name}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(ours, want, "{name}: dequantized weights");
    }
    // The whole 4-bit model gives bitsandbytes' logits, with or without --quantize.
    let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
    for quant in [NF4, Quantization::None] {
        let model = source
            .load_quantized(DType::F32, quant, &Device::Cpu)
            .unwrap();
        let err = max_diff(
            &model.logits(&ids, &Ctx::eval()).unwrap(),
            &golden["logits"],
        );
        assert!(err < 1e-4, "{quant:?}: max |Δlogit| {err}");
    }
}

#[test]
fn quantize_writes_what_loads_back_bit_identically() {
    let src = fixture("llama-gqa");
    let source = ModelSource::resolve(src.to_str().unwrap(), "main").unwrap();
    let out = tempfile::tempdir().unwrap();
    for double_quant in [true, false] {
        prolora::quantize::quantize_model(&source, out.path(), double_quant).unwrap();
        let written = SafetensorsWeights::from_dir(out.path()).unwrap();
        let original = SafetensorsWeights::from_dir(&src).unwrap();
        for (name, shape) in linear_names(&source) {
            let values: Vec<f32> = original
                .get(&name, &shape, DType::F32, &Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want = Nf4Tensor::quantize(&name, &values, &shape, double_quant).unwrap();
            // Read back as stored, whatever double-quant setting the reader asks for.
            assert_eq!(
                written.get_nf4(&name, &shape, !double_quant).unwrap(),
                want,
                "{name}"
            );
        }
    }
    // The written directory is a complete model: same logits as quantizing on load.
    let ids = Tensor::new(&[[1u32, 7, 42, 200, 3]], &Device::Cpu).unwrap();
    let on_load = source
        .load_quantized(
            DType::F32,
            Quantization::Nf4 {
                double_quant: false,
            },
            &Device::Cpu,
        )
        .unwrap()
        .logits(&ids, &Ctx::eval())
        .unwrap();
    let from_disk = ModelSource::resolve(out.path().to_str().unwrap(), "main")
        .unwrap()
        .load_quantized(DType::F32, NF4, &Device::Cpu)
        .unwrap()
        .logits(&ids, &Ctx::eval())
        .unwrap();
    assert_eq!(max_diff(&on_load, &from_disk), 0.0);
}

/// A weight source that keeps, in f32, every tensor read through it.
struct Recorder<'a> {
    inner: &'a dyn WeightSource,
    seen: std::cell::RefCell<HashMap<String, Vec<f32>>>,
}

impl WeightSource for Recorder<'_> {
    fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Tensor> {
        let t = self.inner.get(name, shape, DType::F32, &Device::Cpu)?;
        let values = t.flatten_all()?.to_vec1()?;
        self.seen.borrow_mut().insert(name.to_string(), values);
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
}

/// The 4-bit tiny preset, on load and from `prolora quantize`, is the full-precision tiny
/// model quantized: same seeded draws, then NF4.
#[test]
fn the_4bit_tiny_preset_is_the_tiny_preset_quantized() {
    let tiny = ModelSource::resolve("tiny", "main").unwrap();
    let weights = tiny.weights().unwrap();
    let recorder = Recorder {
        inner: &*weights,
        seen: Default::default(),
    };
    prolora::model::Llama::load(&tiny.config, &recorder, DType::F32, &Device::Cpu).unwrap();
    let full = recorder.seen.into_inner();

    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("tiny-nf4");
    let o = common::prolora(&[
        "quantize",
        "--model",
        "tiny",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let written = SafetensorsWeights::from_dir(&dir).unwrap();
    for (name, shape) in linear_names(&tiny) {
        let want = Nf4Tensor::quantize(&name, &full[&name], &shape, true).unwrap();
        assert_eq!(
            written.get_nf4(&name, &shape, true).unwrap(),
            want,
            "{name}"
        );
    }
    let ids = Tensor::new(&[[1u32, 7, 42, 200, 3]], &Device::Cpu).unwrap();
    let logits = |source: &ModelSource| {
        source
            .load_quantized(DType::F32, NF4, &Device::Cpu)
            .unwrap()
            .logits(&ids, &Ctx::eval())
            .unwrap()
    };
    let from_disk = ModelSource::resolve(dir.to_str().unwrap(), "main").unwrap();
    assert_eq!(max_diff(&logits(&tiny), &logits(&from_disk)), 0.0);
}

/// The fixture with one stored tensor changed by `edit`, written to a temporary copy.
fn broken_copy(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let src = fixture("bnb-4bit-gqa");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
    }
    let mut t =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    let source = ModelSource::resolve(dir.to_str().unwrap(), "main").unwrap();
    match source.load_quantized(DType::F32, NF4, &Device::Cpu) {
        Ok(_) => panic!("a broken checkpoint loaded"),
        Err(e) => format!("{e:#}"),
    }
}

const W: &str = "model.layers.1.mlp.down_proj.weight";

fn bytes(s: &str) -> Tensor {
    Tensor::from_vec(s.as_bytes().to_vec(), s.len(), &Device::Cpu).unwrap()
}

#[test]
fn broken_4bit_checkpoints_are_clear_errors_naming_the_tensor() {
    let state_key = format!("{W}.quant_state.bitsandbytes__nf4");
    let cases: Vec<(&str, Box<dyn FnOnce(&mut HashMap<String, Tensor>)>, &str)> = vec![
        (
            "shape",
            Box::new(|t| {
                let s = r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [96, 64], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.25}"#;
                t.insert(state_key.clone(), bytes(s));
            }),
            "quant_state shape [96, 64]",
        ),
        (
            "json",
            Box::new(|t| {
                t.insert(state_key.clone(), bytes("{\"quant_type\": \"nf4\", \"blo"));
            }),
            "not valid JSON",
        ),
        (
            "fp4",
            Box::new(|t| {
                let s = r#"{"quant_type": "fp4", "blocksize": 64, "shape": [64, 96]}"#;
                t.insert(state_key.clone(), bytes(s));
            }),
            "only nf4",
        ),
        (
            "short codes",
            Box::new(|t| {
                let w = t[W].narrow(0, 0, 100).unwrap();
                t.insert(W.to_string(), w);
            }),
            "100 bytes of 4-bit codes",
        ),
        (
            "missing absmax",
            Box::new(|t| {
                t.remove(&format!("{W}.absmax"));
            }),
            "lacks model.layers.1.mlp.down_proj.weight.absmax",
        ),
        (
            "nan scale",
            Box::new(|t| {
                t.insert(
                    format!("{W}.nested_absmax"),
                    Tensor::new(&[f32::NAN], &Device::Cpu).unwrap(),
                );
            }),
            "not finite",
        ),
        (
            "map",
            Box::new(|t| {
                let m = (&t[&format!("{W}.nested_quant_map")] * 2.0).unwrap();
                t.insert(format!("{W}.nested_quant_map"), m);
            }),
            "dynamic map",
        ),
    ];
    for (what, edit, want) in cases {
        let dir = broken_copy(edit);
        let e = load_error(dir.path());
        assert!(e.contains(W) && e.contains(want), "{what}: {e}");
        assert_eq!(e.lines().count(), 1, "{what}: {e}");
    }
}

#[test]
fn truncated_checkpoint_is_an_error_naming_the_file() {
    let dir = broken_copy(|_| {});
    let st = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&st).unwrap();
    f.set_len(len - 1000).unwrap();
    let e = load_error(dir.path());
    assert!(e.contains("model.safetensors"), "{e}");
}
