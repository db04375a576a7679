//! Training: the optimizer, the schedule and the loop.

pub mod checkpoint;
pub mod optim;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use trainer::{train, Start, TrainSummary};
