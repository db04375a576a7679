//! Training: the optimizer, the schedule and the loop.

pub mod checkpoint;
pub mod memory;
pub mod optim;
pub mod run_dir;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use run_dir::{RunDir, Start};
pub use trainer::{train, TrainSummary};
