//! The data pipeline: JSONL records → (template → tokens → loss mask) → packed batches.

pub mod jsonl;
pub mod pack;
pub mod template;
pub mod tokenize;
