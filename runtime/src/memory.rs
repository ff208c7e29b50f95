//! Device memory by what it holds: allocations made inside [`tagged`] scopes are counted under that [`Category`], and
//! [`retag`] moves a tensor's memory to another one, so that the allocator's peak can be split into weights,
//! adapters and optimizer, activations, scratch and loss (`CudaDevice::memory_stats`). On the CPU both are no-ops
//! (host memory has no such accounting).

use crate::storage::Storage;
use crate::Tensor;
pub use qlora_kernels::cuda::{tagged, Category, MemoryStats};

/// Counts `t`'s device memory under `category` from now on (a gradient kept as an adapter's, say).
pub fn retag(t: &Tensor, category: Category) {
    if let Storage::Cuda(s) = t.storage() {
        s.retag(category);
    }
}
