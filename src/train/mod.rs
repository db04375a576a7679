//! Training: the optimizer, the schedule and the loop.

pub mod optim;
pub mod schedule;
pub mod trainer;

pub use trainer::{train, TrainSummary};
