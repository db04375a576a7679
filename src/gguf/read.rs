//! Reading a GGUF file: header, metadata and tensor infos at open; tensor bytes on demand with
//! positioned reads, so a tensor costs only its own bytes in memory.
//!
//! Every length in the file is checked against the bytes that remain before anything is
//! allocated for it, so a damaged or hostile file gives one error naming the file and what is
//! wrong, never a panic or a huge allocation.

use super::ggml_type::GgmlType;
use super::value::{Value, ValueType};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// "GGUF" as the first four bytes.
const MAGIC: [u8; 4] = *b"GGUF";
/// The alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are allowed by the format; deeper nesting than this is not a real file.
const MAX_NESTING: usize = 4;

/// One tensor's entry in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// As GGUF stores them: the first is the fastest-varying one (the length of a row).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Where the data starts, counted from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The shape in row-major order, as PyTorch and candle write it (`dims` reversed): a
    /// linear's (out, in).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of the tensor's data.
    pub fn byte_len(&self) -> u64 {
        self.elements() / self.ggml_type.block_size() as u64 * self.ggml_type.type_size() as u64
    }
}

/// The metadata key/values, in file order, with typed accessors whose errors name the key
/// and the file.
#[derive(Clone, Debug)]
pub struct Metadata {
    path: PathBuf,
    entries: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

impl Metadata {
    /// Metadata of `entries`; `path` names the file in errors.
    pub fn new(path: &Path, entries: Vec<(String, Value)>) -> Self {
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        Self {
            path: path.to_path_buf(),
            entries,
            index,
        }
    }

    /// Every key and value, in file order.
    pub fn entries(&self) -> &[(String, Value)] {
        &self.entries
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    /// The value of `key`, or an error saying the file lacks it.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .with_context(|| format!("{}: no metadata key {key}", self.path.display()))
    }

    fn wrong_type(&self, key: &str, want: &str, got: &Value) -> anyhow::Error {
        anyhow!(
            "{}: metadata key {key} should be {want}, is {} {got}",
            self.path.display(),
            got.value_type().name()
        )
    }

    /// A non-negative integer of any width.
    pub fn u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    /// A float of either width.
    pub fn f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| self.wrong_type(key, "a float", v))
    }

    pub fn bool(&self, key: &str) -> Result<bool> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| self.wrong_type(key, "a bool", v))
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str()
            .ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    pub fn array(&self, key: &str) -> Result<&[Value]> {
        let v = self.require(key)?;
        v.as_array()
            .ok_or_else(|| self.wrong_type(key, "an array", v))
    }

    /// An array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<&str>> {
        self.array(key)?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong_type(key, "an array of strings", v))
            })
            .collect()
    }

    /// An array of floats.
    pub fn f64s(&self, key: &str) -> Result<Vec<f64>> {
        self.array(key)?
            .iter()
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.wrong_type(key, "an array of floats", v))
            })
            .collect()
    }

    /// An array of integers.
    pub fn i64s(&self, key: &str) -> Result<Vec<i64>> {
        self.array(key)?
            .iter()
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| self.wrong_type(key, "an array of integers", v))
            })
            .collect()
    }

    /// [`u64`](Self::u64) of a key that may be absent.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key).map(|_| self.u64(key)).transpose()
    }

    /// [`f64`](Self::f64) of a key that may be absent.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|_| self.f64(key)).transpose()
    }

    /// [`bool`](Self::bool) of a key that may be absent.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|_| self.bool(key)).transpose()
    }

    /// [`str`](Self::str) of a key that may be absent.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|_| self.str(key)).transpose()
    }
}

/// An open GGUF file: its metadata and tensor infos in memory, its tensor data on disk.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    file: File,
    version: u32,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: u64,
    /// Absolute offset of the data section.
    data_start: u64,
}

impl GgufFile {
    /// Opens `path` and reads everything but the tensor data.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        let mut r = Reader {
            inner: BufReader::new(&file),
            pos: 0,
            len,
        };
        let header = read_header(&mut r)
            .with_context(|| format!("{}: not a usable GGUF file", path.display()))?;
        let Header {
            version,
            metadata,
            tensors,
        } = header;
        let metadata = Metadata::new(path, metadata);
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(_) => {
                let a = metadata.u64("general.alignment")?;
                if a == 0 || !a.is_power_of_two() {
                    bail!(
                        "{}: general.alignment is {a}, not a power of two",
                        path.display()
                    );
                }
                a
            }
        };
        let data_start = r.pos.next_multiple_of(alignment);
        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if by_name.insert(t.name.clone(), i).is_some() {
                bail!("{}: tensor {} is listed twice", path.display(), t.name);
            }
            if t.offset % alignment != 0 {
                bail!(
                    "{}: tensor {} starts at offset {}, not a multiple of the alignment {alignment}",
                    path.display(),
                    t.name,
                    t.offset
                );
            }
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.byte_len()));
            if end.is_none_or(|e| e > len) {
                bail!(
                    "{}: tensor {} ({} bytes at data offset {}) lies beyond the end of the file \
                     ({len} bytes): the file is truncated or damaged",
                    path.display(),
                    t.name,
                    t.byte_len(),
                    t.offset
                );
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            version,
            metadata,
            tensors,
            by_name,
            alignment,
            data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The alignment of tensor data (`general.alignment`, else 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Where the data section starts in the file (tensor offsets count from here).
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// The tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor `name`'s info, or an error naming the file.
    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name)
            .with_context(|| format!("{}: no tensor {name}", self.path.display()))
    }

    /// The stored bytes of `t` (one of this file's tensors).
    pub fn read_bytes(&self, t: &TensorInfo) -> Result<Vec<u8>> {
        self.read_range(t, 0, t.byte_len())
    }

    /// `len` bytes of `t`'s data from byte `start` of it.
    pub fn read_range(&self, t: &TensorInfo, start: u64, len: u64) -> Result<Vec<u8>> {
        if start.saturating_add(len) > t.byte_len() {
            bail!(
                "{}: bytes {start}..{} of tensor {} asked for, it has {}",
                self.path.display(),
                start + len,
                t.name,
                t.byte_len()
            );
        }
        let mut bytes = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut bytes, self.data_start + t.offset + start)
            .with_context(|| format!("{}: cannot read tensor {}", self.path.display(), t.name))?;
        Ok(bytes)
    }
}

struct Header {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
}

fn read_header(r: &mut Reader) -> Result<Header> {
    let magic: [u8; 4] = r.array().context("too short for a GGUF header")?;
    if magic != MAGIC {
        bail!("bad magic {magic:02x?} (a GGUF file starts with \"GGUF\")");
    }
    let version = r.u32()?;
    match version {
        2 | 3 => {}
        1 => bail!("GGUF version 1 is not supported (convert it again with a current llama.cpp)"),
        v if v.swap_bytes() <= 3 => bail!("big-endian GGUF files are not supported"),
        v => bail!("GGUF version {v} is not supported (2 and 3 are)"),
    }
    let tensor_count = r.u64()?;
    let kv_count = r.u64()?;
    // Each key/value takes at least 12 bytes, each tensor info at least 24: counts that
    // cannot fit are refused before anything is reserved for them.
    r.check_fits(kv_count, 12, "metadata key/values")?;
    r.check_fits(tensor_count, 24, "tensor infos")?;
    let mut metadata = Vec::with_capacity(kv_count as usize);
    for i in 0..kv_count {
        let key = r.string().with_context(|| format!("metadata key #{i}"))?;
        let value = r
            .typed_value(0)
            .with_context(|| format!("metadata key {key}"))?;
        metadata.push((key, value));
    }
    let mut tensors = Vec::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        let name = r.string().with_context(|| format!("tensor info #{i}"))?;
        let t = read_tensor_info(r, name.clone()).with_context(|| format!("tensor {name}"))?;
        tensors.push(t);
    }
    Ok(Header {
        version,
        metadata,
        tensors,
    })
}

fn read_tensor_info(r: &mut Reader, name: String) -> Result<TensorInfo> {
    let n_dims = r.u32()?;
    if n_dims > MAX_DIMS {
        bail!("{n_dims} dimensions (ggml has at most {MAX_DIMS})");
    }
    let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
    let type_id = r.u32()?;
    let ggml_type = GgmlType::from_id(type_id)
        .with_context(|| format!("unknown ggml type {type_id} (a newer llama.cpp's?)"))?;
    let offset = r.u64()?;
    let elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d).filter(|&n| n < 1 << 60))
        .with_context(|| format!("dimensions {dims:?} overflow"))?;
    let row = dims.first().copied().unwrap_or(1);
    if row % ggml_type.block_size() as u64 != 0 || elements % ggml_type.block_size() as u64 != 0 {
        bail!(
            "rows of {row} elements are not whole {ggml_type} blocks of {}",
            ggml_type.block_size()
        );
    }
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        offset,
    })
}

/// Little-endian reads that know how many bytes remain.
struct Reader<'a> {
    inner: BufReader<&'a File>,
    pos: u64,
    len: u64,
}

impl Reader<'_> {
    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    /// Refuses `count` items of at least `min_size` bytes each where fewer bytes remain.
    fn check_fits(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        if count.saturating_mul(min_size) > self.remaining() {
            bail!(
                "{count} {what} cannot fit in the {} bytes left after offset {}: the file is \
                 truncated or damaged",
                self.remaining(),
                self.pos
            );
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        if buf.len() as u64 > self.remaining() {
            bail!(
                "truncated: {} bytes needed at offset {}, the file has {}",
                buf.len(),
                self.pos,
                self.len
            );
        }
        self.inner.read_exact(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.fill(&mut b)?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        self.check_fits(n, 1, "string bytes")?;
        let mut b = vec![0u8; n as usize];
        self.fill(&mut b)?;
        String::from_utf8(b).map_err(|_| anyhow!("string at offset {} is not UTF-8", self.pos - n))
    }

    fn typed_value(&mut self, depth: usize) -> Result<Value> {
        let tag = self.u32()?;
        let ty = ValueType::from_tag(tag).with_context(|| format!("unknown value type {tag}"))?;
        self.value(ty, depth)
    }

    fn value(&mut self, ty: ValueType, depth: usize) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>()?[0]),
            ValueType::I8 => Value::I8(self.array::<1>()?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array()?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array()?)),
            ValueType::U32 => Value::U32(self.u32()?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array()?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array()?)),
            ValueType::Bool => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!(
                    "bool value {b} at offset {} is neither 0 nor 1",
                    self.pos - 1
                ),
            },
            ValueType::String => Value::String(self.string()?),
            ValueType::U64 => Value::U64(self.u64()?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array()?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array()?)),
            ValueType::Array => {
                if depth >= MAX_NESTING {
                    bail!("arrays nested deeper than {MAX_NESTING}");
                }
                let tag = self.u32()?;
                let item = ValueType::from_tag(tag)
                    .with_context(|| format!("unknown array element type {tag}"))?;
                let count = self.u64()?;
                self.check_fits(count, item.min_size(), "array elements")?;
                let items = (0..count)
                    .map(|_| self.value(item, depth + 1))
                    .collect::<Result<Vec<_>>>()?;
                Value::Array(item, items)
            }
        })
    }
}
