//! bertrt: fine-tune and serve BERT-family encoders.
//!
//! Layers, top to bottom (dependencies point down only):
//! - [`embed`]: text in, pooled vectors out (what `bertrt embed` runs);
//! - [`model`]: BERT written once over the [`backend`] op set;
//! - [`tokenize`], [`checkpoint`], [`config`]: Hugging Face files in;
//! - [`backend`]: the ops, on the CPU (SIMD) today.

pub mod artifact;
pub mod backend;
pub mod checkpoint;
pub mod classify;
pub mod config;
pub mod data;
pub mod embed;
pub mod error;
pub mod eval;
pub mod lora;
pub mod model;
pub mod quant;
pub mod rng;
pub mod serve;
pub mod tag;
pub mod tokenize;
pub mod train;

pub use error::{Error, Result};

/// The version recorded in artifacts and reported by `/info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
