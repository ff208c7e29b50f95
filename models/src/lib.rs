//! qlora-rt models. Owns: model definitions written with the autograd ops, checkpoint loading, adapters and
//! their PEFT files. Must not own numerics (`runtime`, `kernels`) or training loops (`cli`).
//!
//! Today it holds [`toy`], a two-layer Llama-shaped decoder trained from scratch on a synthetic task, which
//! exercises every op of the training graph end to end on CPU without any checkpoint file.

pub mod toy;
