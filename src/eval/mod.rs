//! How good a classifier is: per-class metrics with a confusion matrix, and
//! how far its probabilities can be trusted (calibration).

pub mod calibration;
mod report;
mod table;

pub use report::{ClassMetrics, ClassificationReport};
