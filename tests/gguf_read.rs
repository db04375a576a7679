//! The GGUF reader and dequantization against llama.cpp's Python package: files written by
//! `gguf.GGUFWriter`, values dequantized by `gguf.quants.dequantize`
//! (scripts/reference/make_gguf_goldens.py).

mod common;

use prolora::gguf::{quants, GgmlType, GgufFile, Value, ValueType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

fn quants_gguf() -> PathBuf {
    common::fixture("gguf/quants.gguf")
}

fn expected() -> Json {
    let text = std::fs::read_to_string(common::fixture("gguf/quants.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn value_type(gguf_name: &str) -> ValueType {
    use ValueType::*;
    match gguf_name {
        "UINT8" => U8,
        "INT8" => I8,
        "UINT16" => U16,
        "INT16" => I16,
        "UINT32" => U32,
        "INT32" => I32,
        "FLOAT32" => F32,
        "BOOL" => Bool,
        "STRING" => String,
        "ARRAY" => Array,
        "UINT64" => U64,
        "INT64" => I64,
        "FLOAT64" => F64,
        other => panic!("{other}"),
    }
}

/// Whether our value is the JSON value the script wrote (numbers compared exactly).
fn same(ours: &Value, json: &Json) -> bool {
    match ours {
        Value::Array(_, items) => {
            let json = json.as_array().unwrap();
            items.len() == json.len() && items.iter().zip(json).all(|(a, b)| same(a, b))
        }
        Value::String(s) => json.as_str() == Some(s),
        Value::Bool(b) => json.as_bool() == Some(*b),
        Value::F32(_) | Value::F64(_) => ours.as_f64() == json.as_f64(),
        Value::U64(v) => json.as_u64() == Some(*v),
        _ => ours.as_i64() == json.as_i64(),
    }
}

#[test]
fn metadata_and_tensor_infos_are_what_gguf_py_wrote() {
    let f = GgufFile::open(&quants_gguf()).unwrap();
    let want = expected();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), want["alignment"].as_u64().unwrap());
    let meta = f.metadata();
    assert_eq!(meta.str("general.architecture").unwrap(), "test");
    for entry in want["metadata"].as_array().unwrap() {
        let key = entry["key"].as_str().unwrap();
        let v = meta.require(key).unwrap();
        assert_eq!(
            v.value_type(),
            value_type(entry["type"].as_str().unwrap()),
            "{key}"
        );
        if let (Value::Array(item, _), Some(t)) = (v, entry["item_type"].as_str()) {
            assert_eq!(*item, value_type(t), "{key}");
        }
        assert!(
            same(v, &entry["value"]),
            "{key}: {v:?} vs {}",
            entry["value"]
        );
    }
    // 2 general.* keys and ours, in the order written.
    assert_eq!(
        meta.entries().len(),
        2 + want["metadata"].as_array().unwrap().len()
    );
    let infos = want["tensors"].as_array().unwrap();
    assert_eq!(f.tensors().len(), infos.len());
    for (t, info) in f.tensors().iter().zip(infos) {
        assert_eq!(t.name, info["name"].as_str().unwrap());
        assert_eq!(t.ggml_type.name(), info["type"].as_str().unwrap());
        let shape: Vec<usize> = serde_json::from_value(info["shape"].clone()).unwrap();
        assert_eq!(t.shape(), shape);
        assert_eq!(t.offset % f.alignment(), 0);
    }
}

#[test]
fn typed_accessors_name_the_key_and_the_file() {
    let f = GgufFile::open(&quants_gguf()).unwrap();
    let meta = f.metadata();
    assert_eq!(meta.u64("test.u32").unwrap(), 4_000_000_000);
    assert_eq!(meta.u64("test.u8").unwrap(), 200);
    assert_eq!(meta.f64("test.f32").unwrap(), f64::from(0.1f32));
    assert_eq!(
        meta.strings("test.strings").unwrap(),
        ["a", "", "Ġthe", "日本"]
    );
    assert_eq!(meta.i64s("test.i32s").unwrap(), [1, -2, 3]);
    assert_eq!(meta.opt_u64("test.absent").unwrap(), None);
    let err = meta.u64("test.i8").unwrap_err().to_string();
    assert!(
        err.contains("quants.gguf") && err.contains("test.i8"),
        "{err}"
    );
    let err = meta.str("test.absent").unwrap_err().to_string();
    assert!(
        err.contains("quants.gguf") && err.contains("test.absent"),
        "{err}"
    );
    let err = meta.f64s("test.strings").unwrap_err().to_string();
    assert!(err.contains("test.strings"), "{err}");
}

#[test]
fn dequantization_equals_gguf_py_bit_for_bit() {
    let stored = GgufFile::open(&quants_gguf()).unwrap();
    let golden = GgufFile::open(&common::fixture("gguf/quants_dequantized.gguf")).unwrap();
    let mut seen = Vec::new();
    for t in stored.tensors() {
        let g = golden.require_tensor(&t.name).unwrap();
        assert_eq!(g.ggml_type, GgmlType::F32);
        assert_eq!(g.shape(), t.shape());
        let want: Vec<u32> = golden
            .read_bytes(g)
            .unwrap()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let mut ours = vec![0f32; t.elements() as usize];
        quants::dequantize(t.ggml_type, &stored.read_bytes(t).unwrap(), &mut ours).unwrap();
        let differ = ours
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != **b)
            .count();
        assert_eq!(
            differ,
            0,
            "{}: {differ} of {} values differ",
            t.name,
            want.len()
        );
        seen.push(t.ggml_type);
    }
    assert_eq!(seen, quants::SUPPORTED);
}

#[test]
fn version_2_reads_as_version_3() {
    let mut bytes = std::fs::read(quants_gguf()).unwrap();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let f = GgufFile::open(&write(dir.path(), "v2.gguf", &bytes)).unwrap();
    assert_eq!(f.version(), 2);
    assert_eq!(f.tensors().len(), 9);
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Where the tensor info of `name` starts (its name's length field).
fn tensor_info_at(bytes: &[u8], name: &str) -> usize {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    needle.extend_from_slice(&2u32.to_le_bytes());
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
}

fn open_err(dir: &Path, bytes: &[u8]) -> String {
    let p = write(dir, "bad.gguf", bytes);
    let err = format!("{:#}", GgufFile::open(&p).unwrap_err());
    assert!(err.contains("bad.gguf"), "the error names the file: {err}");
    err
}

#[test]
fn damaged_files_give_one_error_naming_the_file_and_the_fault() {
    let good = std::fs::read(quants_gguf()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();

    let mut b = good.clone();
    b[0..4].copy_from_slice(b"GGML");
    assert!(open_err(dir, &b).contains("bad magic"));

    let err = open_err(dir, &good[..good.len() - 100]);
    assert!(err.contains("Q6_K") && err.contains("truncated"), "{err}");
    let err = open_err(dir, &good[..500]);
    assert!(err.contains("truncated"), "{err}");

    let info = tensor_info_at(&good, "Q4_K");
    let (type_at, offset_at) = (info + 8 + 4 + 4 + 16, info + 8 + 4 + 4 + 16 + 4);
    let mut b = good.clone();
    b[type_at..type_at + 4].copy_from_slice(&31u32.to_le_bytes());
    let err = open_err(dir, &b);
    assert!(
        err.contains("Q4_K") && err.contains("unknown ggml type 31"),
        "{err}"
    );

    let mut b = good.clone();
    b[offset_at..offset_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let err = open_err(dir, &b);
    assert!(
        err.contains("Q4_K") && err.contains("beyond the end"),
        "{err}"
    );

    // A hostile length: a key of 2⁶² bytes must not be allocated.
    let mut b = good.clone();
    b[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let err = open_err(dir, &b);
    assert!(err.contains("cannot fit"), "{err}");
    // …and a tensor count of 2⁶⁰.
    let mut b = good.clone();
    b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(open_err(dir, &b).contains("tensor infos cannot fit"));

    let mut b = good.clone();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(open_err(dir, &b).contains("big-endian"));
}

/// Every prefix of the header and hundreds of random byte changes: an error or a file, never
/// a panic (or an allocation that aborts).
#[test]
fn no_prefix_or_corruption_panics() {
    let good = std::fs::read(quants_gguf()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data_start = GgufFile::open(&quants_gguf()).unwrap().data_start() as usize;
    for len in 0..data_start {
        let p = write(dir.path(), "cut.gguf", &good[..len]);
        assert!(GgufFile::open(&p).is_err(), "prefix of {len} bytes opened");
    }
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..500 {
        let mut b = good.clone();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..data_start);
            b[at] = rng.random();
        }
        let p = write(dir.path(), "flip.gguf", &b);
        if let Ok(f) = GgufFile::open(&p) {
            for t in f.tensors() {
                let bytes = f.read_bytes(t).unwrap();
                let mut out = vec![0f32; t.elements() as usize];
                if quants::supported(t.ggml_type) {
                    quants::dequantize(t.ggml_type, &bytes, &mut out).unwrap();
                }
            }
        }
    }
}
