//! GGUF, llama.cpp's model file: reading its metadata and tensors.
//!
//! The value model ([`Value`], [`ValueType`]) and the tensor types ([`GgmlType`]) are shared
//! by the reader and the writer.

pub mod ggml_type;
pub mod quants;
pub mod read;
pub mod value;

pub use ggml_type::GgmlType;
pub use read::{GgufFile, Metadata, TensorInfo};
pub use value::{Value, ValueType};
