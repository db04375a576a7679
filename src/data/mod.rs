//! Instruction data: chat encoding and batching.

pub mod batch;
pub mod chat;
pub mod convert;
pub mod dataset;
pub mod inspect;
pub mod jsonl;
pub mod rng;
pub mod spans;
pub mod template;
