//! qlora-rt: fine-tune Llama and Gemma models with QLoRA (frozen 4-bit NF4 base weights plus trainable
//! low-rank adapters), on CPU or CUDA.
//!
//! This facade re-exports the workspace's crates so a library user depends on one crate:
//! - [`kernels`]: CPU reference kernels over slices (and their CUDA twins), the seedable [`kernels::Rng`].
//! - [`runtime`]: [`Tensor`], [`DType`], [`Device`] and op dispatch.
//! - [`autograd`]: the [`Tape`] of coarse ops with hand-written backward, [`Param`], checkpointing.
//! - [`models`]: model definitions.
//! - [`optim`]: AdamW, schedules, gradient clipping.

pub use qlora_autograd as autograd;
pub use qlora_kernels as kernels;
pub use qlora_models as models;
pub use qlora_optim as optim;
pub use qlora_runtime as runtime;

pub use qlora_autograd::{Param, Tape, Var};
pub use qlora_runtime::{DType, Device, Error, Result, Tensor};
