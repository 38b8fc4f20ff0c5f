//! How good a model is: per-class metrics with a confusion matrix, how far
//! its probabilities can be trusted (calibration), regression metrics,
//! entity-level scores of BIO tagging.

pub mod calibration;
mod entities;
mod multilabel;
mod regression;
mod report;
mod table;
pub mod thresholds;

pub use entities::{entities, Entity, EntityReport, EntityScores};
pub use multilabel::MultiLabelReport;
pub use regression::RegressionReport;
pub use report::{ClassMetrics, ClassificationReport};
