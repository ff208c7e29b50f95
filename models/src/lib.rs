//! qlora-rt models. Owns: model definitions written with the autograd ops, checkpoint loading, adapters and
//! their PEFT files. Must not own numerics (`runtime`, `kernels`) or training loops (`cli`).
//!
//! [`toy`] is a two-layer Llama-shaped decoder trained from scratch on a synthetic task, which exercises every
//! op of the training graph end to end on CPU without any checkpoint file.

pub mod config;
pub mod data;
pub mod error;
pub mod formats;
pub mod generate;
pub mod kv_cache;
pub mod rope;
pub mod toy;
pub mod transformer;

pub use config::ModelConfig;
pub use error::{Error, Result};
