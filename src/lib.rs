//! prolora: QLoRA-style finetuning of LLaMA-family models with LoRA-family adapters.

pub mod adapters;
pub mod atomic;
pub mod choice;
pub mod cli;
pub mod collect;
pub mod config;
pub mod ctx;
pub mod data;
pub mod device;
pub mod eval;
pub mod evaluate;
pub mod export;
pub mod generate;
pub mod hub;
pub mod kernels;
pub mod loss;
pub mod model;
pub mod params;
pub mod plot;
pub mod quantize;
pub mod runs;
pub mod signals;
pub mod source;
pub mod sweep;
pub mod train;
