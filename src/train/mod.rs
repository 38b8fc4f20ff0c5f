//! Fine-tuning: parameters and optimiser state, the training model with its
//! backward pass, the loop.

pub mod classifier;
pub mod params;
