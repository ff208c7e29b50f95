//! The data pipeline: dataset records (JSONL, JSON arrays, Parquet) → (template → tokens → loss mask) → packed
//! batches.

pub mod files;
pub mod jsonl;
pub mod pack;
mod parquet;
pub mod template;
pub mod tokenize;
