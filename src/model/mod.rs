//! The base model: its config, weights and the decoder.

pub mod bnb;
pub mod config;
pub mod frozen;
mod huge_pages;
pub mod kv_cache;
pub mod llama;
pub mod lora_linear;
pub mod nf4;
pub mod packing;
pub mod preset;
pub mod weights;

pub use config::LlamaConfig;
pub use llama::Llama;
