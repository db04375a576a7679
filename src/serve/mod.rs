//! `prolora serve`: many adapters on one base behind an OpenAI-compatible HTTP API.

pub mod adapters;
pub mod engine;
pub mod metrics;
pub mod routing;
pub mod sampling;
