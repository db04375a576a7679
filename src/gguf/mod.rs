//! GGUF, llama.cpp's model file: reading and writing its metadata and tensors, and a LLaMA
//! model (config, weights) from one.
//!
//! The value model ([`Value`], [`ValueType`]) and the tensor types ([`GgmlType`]) are shared
//! by the reader and the writer.

pub mod config;
pub mod ggml_type;
pub mod quants;
pub mod read;
pub mod tokenizer;
pub mod value;
pub mod weights;
pub mod write;

pub use ggml_type::GgmlType;
pub use read::{GgufFile, Metadata, TensorInfo};
pub use value::{Value, ValueType};

use std::path::Path;

/// Whether `path` is a GGUF file: a file named `*.gguf` or starting with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|_| magic == *b"GGUF")
}
