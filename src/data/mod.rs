//! Instruction data: chat encoding and batching.

pub mod batch;
pub mod chat;
pub mod rng;
