//! How good a model is: per-class metrics with a confusion matrix, how far
//! its probabilities can be trusted (calibration), regression metrics.

pub mod calibration;
mod multilabel;
mod regression;
mod report;
mod table;
pub mod thresholds;

pub use multilabel::MultiLabelReport;
pub use regression::RegressionReport;
pub use report::{ClassMetrics, ClassificationReport};
