//! qlora-rt models. Owns the model definitions written with the autograd ops ([`config`], [`transformer`], [`rope`],
//! [`kv_cache`], [`generate`], [`toy`]), the base sharded across the ranks of a group ([`sharded`]), adapters at
//! inference time ([`adapters`]: swapping, folding), the files models and adapters are read from and written to
//! ([`formats`]), and the training-data pipeline ([`data`]). Must not own numerics (`runtime`, `kernels`) or training
//! loops (`cli`).
//!
//! [`toy`] is the decoder at two layers, trained from scratch on a synthetic task, which exercises every op of the
//! training graph end to end on CPU without any checkpoint file.

pub mod adapters;
pub mod batch;
pub mod config;
pub mod data;
pub mod decoder;
pub mod error;
pub mod formats;
pub mod generate;
pub mod kv_cache;
mod layer;
pub mod rope;
pub mod sharded;
pub mod synthetic;
pub mod toy;
pub mod transformer;

pub use config::ModelConfig;
pub use error::{Error, Result};
