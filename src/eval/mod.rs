//! How good a model is: per-class metrics with a confusion matrix, how far
//! its probabilities can be trusted (calibration), regression metrics.

pub mod calibration;
mod regression;
mod report;
mod table;

pub use regression::RegressionReport;
pub use report::{ClassMetrics, ClassificationReport};
