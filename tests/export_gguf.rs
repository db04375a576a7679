//! `prolora export --format gguf-lora` and the GGUF writer against llama.cpp's own Python
//! (scripts/reference/make_gguf_lora_goldens.py): its `convert_lora_to_gguf.py` for the
//! adapter layout, its `gguf-py` writer for the file format.

mod common;

use common::{fixture, prolora, stderr};
use prolora::gguf::write::{self, TensorData};
use prolora::gguf::{GgmlType, GgufFile, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// The converter names the file after the adapter's directory; nothing reads it.
const NAME_KEY: &str = "general.name";

fn export(adapter: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "export",
        "--format",
        "gguf-lora",
        "--adapter",
        adapter.to_str().unwrap(),
        "--model",
        "tests/fixtures/peft-lora/base",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    prolora(&args)
}

/// Metadata without the file's name, by key.
fn metadata(file: &GgufFile) -> BTreeMap<String, Value> {
    file.metadata()
        .entries()
        .iter()
        .filter(|(k, _)| k != NAME_KEY)
        .cloned()
        .collect()
}

/// Every tensor's (type, row-major shape, f32 values), by name.
fn tensors(file: &GgufFile) -> BTreeMap<String, (GgmlType, Vec<usize>, Vec<f32>)> {
    file.tensors()
        .iter()
        .map(|t| {
            assert_eq!(t.ggml_type, GgmlType::F32, "{}", t.name);
            let values = file
                .read_bytes(t)
                .unwrap()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (t.name.clone(), (t.ggml_type, t.shape(), values))
        })
        .collect()
}

fn alpha(file: &GgufFile) -> f64 {
    file.metadata().f64("adapter.lora.alpha").unwrap()
}

/// PEFT's own LoRA (r 4, alpha 8: scaling 2; 4 heads and 2 KV heads, so q and k rows are
/// permuted differently) as llama.cpp's converter writes it: the same keys, names, types and
/// shapes, A as is, and B with its rows permuted as the converter permutes them. We fold the
/// scaling into B and write alpha = r (llama.cpp's scale alpha/r is 1): B is the converter's
/// times 2, exactly, and B·A·alpha/r is the same.
#[test]
fn a_peft_lora_exports_as_llama_cpp_converts_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapter.gguf");
    let o = export(&fixture("peft-lora/adapter"), &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ours = GgufFile::open(&out).unwrap();
    let golden = GgufFile::open(&fixture("gguf-lora/peft-lora.gguf")).unwrap();

    let (mut ours_meta, mut golden_meta) = (metadata(&ours), metadata(&golden));
    assert_eq!(
        ours_meta.remove("adapter.lora.alpha"),
        Some(Value::F32(4.0))
    );
    assert_eq!(
        golden_meta.remove("adapter.lora.alpha"),
        Some(Value::F32(8.0))
    );
    assert_eq!(ours_meta, golden_meta);
    assert_eq!(ours_meta["general.type"], Value::String("adapter".into()));

    let (ours_t, golden_t) = (tensors(&ours), tensors(&golden));
    assert_eq!(ours_t.len(), 2 * 7 * 2);
    assert_eq!(
        ours_t.keys().collect::<Vec<_>>(),
        golden_t.keys().collect::<Vec<_>>()
    );
    let fold = alpha(&golden) / alpha(&ours);
    assert_eq!(fold, 2.0);
    for (name, (_, shape, values)) in &ours_t {
        let (_, golden_shape, golden_values) = &golden_t[name];
        assert_eq!(shape, golden_shape, "{name}");
        let want: Vec<f32> = if name.ends_with(".lora_b") {
            golden_values.iter().map(|v| v * fold as f32).collect()
        } else {
            golden_values.clone()
        };
        assert_eq!(values, &want, "{name}");
    }
    // The permutation is not the identity here (a no-op would pass only by accident).
    let plain = tmp.path().join("plain");
    let o = prolora(&[
        "export",
        "--adapter",
        fixture("peft-lora/adapter").to_str().unwrap(),
        "--model",
        "tests/fixtures/peft-lora/base",
        "--out",
        plain.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let peft = candle_core::safetensors::load(
        plain.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let q = peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(q, ours_t["blk.0.attn_q.weight.lora_b"].2);
}

/// Our PRoLoRA, VeRA and Tied-LoRA adapters (their LoRA equivalents, which
/// tests/cli.rs checks against PEFT) export to the very file llama.cpp's converter makes from
/// their PEFT exports: same metadata, every tensor bit for bit.
#[test]
fn every_method_exports_as_llama_cpp_converts_its_peft_export() {
    let tmp = tempfile::tempdir().unwrap();
    for kind in ["prolora", "vera", "tied-lora"] {
        let out = tmp.path().join(format!("{kind}.gguf"));
        let o = export(&fixture(&format!("our-exports/{kind}")), &out, &[]);
        assert!(o.status.success(), "{kind}: {}", stderr(&o));
        let ours = GgufFile::open(&out).unwrap();
        let golden = GgufFile::open(&fixture(&format!("gguf-lora/{kind}.gguf"))).unwrap();
        assert_eq!(metadata(&ours), metadata(&golden), "{kind}");
        assert_eq!(tensors(&ours), tensors(&golden), "{kind}");
    }
}

/// The writer lays a file out byte for byte as gguf-py's `GGUFWriter` does: all thirteen
/// value types (nested arrays among them), F32, F16 and Q8_0 tensors of 1 to 3 dimensions.
#[test]
fn the_writer_writes_what_gguf_py_writes() {
    let path = fixture("gguf-lora/values.gguf");
    let file = GgufFile::open(&path).unwrap();
    assert!(file.tensors().iter().any(|t| t.ggml_type == GgmlType::Q8_0));
    let tensors: Vec<TensorData> = file
        .tensors()
        .iter()
        .map(|t| TensorData {
            name: t.name.clone(),
            shape: t.shape(),
            ggml_type: t.ggml_type,
            bytes: file.read_bytes(t).unwrap(),
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("values.gguf");
    write::write(&out, file.metadata().entries(), &tensors).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&path).unwrap());
}

/// What the writer cannot write is an error naming the tensor or key, and no file.
#[test]
fn the_writer_refuses_inconsistent_tensors_and_values() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bad.gguf");
    let short = TensorData::f32("t", vec![2, 3], &[0.0; 5]);
    let err = write::write(&out, &[], &[short]).unwrap_err().to_string();
    assert!(
        err.contains("tensor t") && err.contains("24 bytes"),
        "{err}"
    );
    let ragged = TensorData {
        name: "q".into(),
        shape: vec![2, 16],
        ggml_type: GgmlType::Q8_0,
        bytes: vec![0; 34],
    };
    let err = write::write(&out, &[], &[ragged]).unwrap_err().to_string();
    assert!(
        err.contains("tensor q") && err.contains("blocks of 32"),
        "{err}"
    );
    let mixed = Value::Array(
        prolora::gguf::ValueType::U32,
        vec![Value::U32(1), Value::I32(2)],
    );
    let err = write::write(&out, &[("k.mixed".into(), mixed)], &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("k.mixed"), "{err}");
    let odd = ("general.alignment".to_string(), Value::U32(24));
    let err = write::write(&out, &[odd], &[]).unwrap_err().to_string();
    assert!(err.contains("general.alignment"), "{err}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

/// As the other formats: an existing output is kept unless --overwrite, and then replaced
/// whole, with no temporary left beside it.
#[test]
fn an_existing_gguf_is_replaced_only_with_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapter.gguf");
    std::fs::write(&out, b"keep me").unwrap();
    let adapter = fixture("our-exports/tied-lora");
    let o = export(&adapter, &out, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--overwrite"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    let o = export(&adapter, &out, &["--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let golden = GgufFile::open(&fixture("gguf-lora/tied-lora.gguf")).unwrap();
    assert_eq!(tensors(&GgufFile::open(&out).unwrap()), tensors(&golden));
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}
