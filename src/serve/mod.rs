//! `prolora serve`: many adapters on one base behind an OpenAI-compatible HTTP API.

pub mod adapters;
pub mod api;
pub mod bgmv;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod routing;
pub mod server;
pub mod text;
