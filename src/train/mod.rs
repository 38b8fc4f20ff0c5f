//! Fine-tuning: parameters and optimiser state, the training model with its
//! backward pass, the recipe and the loop.

pub mod classifier;
pub mod loss;
pub mod loss_scale;
pub mod params;
mod progress;
pub mod recipe;
mod run;

pub use recipe::{Metric, Task, TrainRecipe};
pub use run::{finetune, finetune_seeds, Evaluation, Report, TrainSummary};
