//! qlora-rt runtime: the tensor type, dtypes, devices, and op dispatch to `qlora-kernels`.
//!
//! Owns: what a tensor is and which kernel computes each op for it. Must not know about gradients (that is
//! `autograd`) or models. CPU compute runs in f32 (f64 when an input is f64, for gradient checks); bf16/f16
//! inputs are upcast on the fly, as the design's CPU backend does.

pub mod cuda;
pub mod dist;
pub mod dtype;
pub mod error;
pub mod layout;
pub mod memory;
pub mod offload;
pub mod op;
pub mod ops;
pub mod park;
pub mod profile;
pub mod quant;
pub mod storage;
pub mod tensor;
pub mod testing;
pub mod timing;
mod transfer;

mod device;

pub use device::Device;
pub use dtype::{CpuStorage, DType, Element};
pub use error::{Error, Result};
pub use layout::Layout;
pub use storage::{CudaStorage, Storage};
pub use tensor::Tensor;
pub use transfer::cuda_device;

// What the crates above use of `qlora-kernels` as it is, so that none of them depends on it: the seedable Rng, NF4's
// constants and sizes, rope's inverse frequencies, AdamW's host step (optim runs it on f64 moments), the GPU count,
// and the test helpers (tolerances, gradient checks, the GPU switch) that every crate's tests share.
pub use qlora_kernels::cuda::device_count;
pub use qlora_kernels::rope::rope_inv_freq;
pub use qlora_kernels::{adamw, nf4, Rng};
