//! Writing a GGUF file (version 3) as gguf-py's `GGUFWriter` lays it out: header, metadata,
//! tensor infos, then each tensor's bytes at an offset that is a multiple of the alignment
//! (`general.alignment`, else 32), zero-padded between. Written atomically.

use super::ggml_type::GgmlType;
use super::read::DEFAULT_ALIGNMENT;
use super::value::Value;
use crate::atomic;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::Path;

/// The format version written.
const VERSION: u32 = 3;

/// One tensor to write: its stored bytes and its shape in row-major order (a linear's
/// (out, in)), as PyTorch and candle give it; the file stores the dimensions reversed.
pub struct TensorData {
    pub name: String,
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    pub bytes: Vec<u8>,
}

impl TensorData {
    /// An F32 tensor of `values` (row-major).
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Self {
        Self {
            name: name.into(),
            shape,
            ggml_type: GgmlType::F32,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// Writes `metadata` (in the order given) and `tensors` (in the order given) to `path`.
pub fn write(path: &Path, metadata: &[(String, Value)], tensors: &[TensorData]) -> Result<()> {
    let alignment = alignment(path, metadata)?;
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut next = 0u64;
    for t in tensors {
        check_tensor(path, t)?;
        offsets.push(next);
        next = (next + t.bytes.len() as u64).next_multiple_of(alignment);
    }
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut head, key);
        head.extend_from_slice(&value.value_type().tag().to_le_bytes());
        put_value(&mut head, value)
            .with_context(|| format!("{}: metadata key {key}", path.display()))?;
    }
    for (t, offset) in tensors.iter().zip(&offsets) {
        put_string(&mut head, &t.name);
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&t.ggml_type.id().to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
    }
    pad(&mut head, alignment);
    atomic::write_with(path, |w| {
        let io = |e| anyhow::Error::new(e).context(format!("cannot write {}", path.display()));
        w.write_all(&head).map_err(io)?;
        for t in tensors {
            w.write_all(&t.bytes).map_err(io)?;
            let padding = (t.bytes.len() as u64).next_multiple_of(alignment) - t.bytes.len() as u64;
            w.write_all(&vec![0u8; padding as usize]).map_err(io)?;
        }
        Ok(())
    })
}

/// `general.alignment` where the metadata sets it (a u32 power of two, as llama.cpp requires).
fn alignment(path: &Path, metadata: &[(String, Value)]) -> Result<u64> {
    match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => Ok(DEFAULT_ALIGNMENT),
        Some((_, Value::U32(a))) if a.is_power_of_two() => Ok(u64::from(*a)),
        Some((_, v)) => bail!(
            "{}: general.alignment must be a u32 power of two, is {} {v}",
            path.display(),
            v.value_type().name()
        ),
    }
}

fn check_tensor(path: &Path, t: &TensorData) -> Result<()> {
    if t.shape.is_empty() || t.shape.len() > 4 {
        bail!(
            "{}: tensor {} has {} dimensions; GGUF holds 1 to 4",
            path.display(),
            t.name,
            t.shape.len()
        );
    }
    let row = *t.shape.last().expect("checked non-empty");
    let block = t.ggml_type.block_size();
    if row % block != 0 {
        bail!(
            "{}: tensor {} has rows of {row} elements; {} stores whole blocks of {block}",
            path.display(),
            t.name,
            t.ggml_type
        );
    }
    let elements: u64 = t.shape.iter().map(|&d| d as u64).product();
    let want = t.ggml_type.bytes_for(elements);
    if want != Some(t.bytes.len() as u64) {
        bail!(
            "{}: tensor {} of shape {:?} in {} is {} bytes, {} given",
            path.display(),
            t.name,
            t.shape,
            t.ggml_type,
            want.unwrap_or_default(),
            t.bytes.len()
        );
    }
    Ok(())
}

fn pad(bytes: &mut Vec<u8>, alignment: u64) {
    let len = (bytes.len() as u64).next_multiple_of(alignment);
    bytes.resize(len as usize, 0);
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The value's payload: its type tag is written by the caller (an array's elements share the
/// array's one item tag; an array element of an array is its own item tag, count and items).
fn put_value(out: &mut Vec<u8>, value: &Value) -> Result<()> {
    match value {
        Value::U8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_string(out, s),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Array(item_type, items) => {
            out.extend_from_slice(&item_type.tag().to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                if item.value_type() != *item_type {
                    bail!(
                        "an array of {} holds a {}",
                        item_type.name(),
                        item.value_type().name()
                    );
                }
                put_value(out, item)?;
            }
        }
    }
    Ok(())
}
