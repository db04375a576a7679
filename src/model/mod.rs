//! The base model: its config, weights and the decoder.

pub mod bnb;
pub mod config;
pub mod frozen;
pub mod heads;
pub mod llama;
pub mod nf4;
pub mod ops;
pub mod preset;
pub(crate) mod vecmath;
pub mod weights;

pub use config::LlamaConfig;
pub use llama::Llama;
