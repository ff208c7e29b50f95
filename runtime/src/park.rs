//! Parking what a closure leaves alive on the GPU (a layer's saved activations) in pinned host memory until its
//! backward: the tensors' side of `qlora_kernels::cuda::park`, which moves buffers under the tensors that share them.
//! On the CPU nothing moves: host memory is where the tensors already are, so a set parks nothing.

use crate::storage::{CudaStorage, Storage};
use crate::{Error, Result, Tensor};
use qlora_kernels::cuda::park::{self, ParkedSet, Recorded};

/// Runs `f`, noting the activation buffers it allocates on the GPU (see [`Parked::park`]).
pub fn recording<R>(f: impl FnOnce() -> R) -> (R, Recorded) {
    park::recording(f)
}

/// Buffers read while parked, since the process started: each is brought back on the spot, so a nonzero count means a
/// slower step, never a wrong one.
pub fn faults() -> u64 {
    park::faults()
}

/// The buffers a [`recording`] saw, on their way to, in, or back from host memory.
pub struct Parked(ParkedSet);

impl Parked {
    /// Starts copying to pinned host memory every activation buffer of `recorded` still alive, except the memory of
    /// `keep` (the closure's outputs, which the next computation reads); they stay readable on the device until
    /// [`Parked::release`].
    pub fn park(recorded: Recorded, keep: &[&Tensor]) -> Result<Parked> {
        let keep: Vec<usize> = keep.iter().filter_map(|t| park_id(t)).collect();
        ParkedSet::park(recorded, &keep).map(Parked).map_err(Error::cuda("park"))
    }

    /// Bytes parked (of the buffers still alive).
    pub fn bytes(&self) -> usize {
        self.0.bytes()
    }

    /// Lets the device copies go once the compute stream has waited for the copies out (on the device, not the host):
    /// call it once the work that overlaps the copies is queued.
    pub fn release(&self) -> Result<()> {
        self.0.release().map_err(Error::cuda("park"))
    }

    /// Starts the copies back (call it one step ahead of [`Parked::restore`], so that they run under that step).
    pub fn prefetch(&self) -> Result<()> {
        self.0.prefetch().map_err(Error::cuda("park"))
    }

    /// Every buffer on the device again, the compute stream waiting for the copies back.
    pub fn restore(&self) -> Result<()> {
        self.0.restore().map_err(Error::cuda("park"))
    }
}

/// The identity of a CUDA tensor's memory (None on the CPU).
fn park_id(t: &Tensor) -> Option<usize> {
    match t.storage() {
        Storage::Cpu(_) => None,
        Storage::Cuda(s) => Some(match s {
            CudaStorage::F32(b) => b.park_id(),
            CudaStorage::BF16(b) => b.park_id(),
            CudaStorage::F16(b) => b.park_id(),
            CudaStorage::I32(b) => b.park_id(),
            CudaStorage::U8(b) => b.park_id(),
        }),
    }
}
