//! Parking device buffers in pinned host memory and bringing them back, on a second stream so that the copies run
//! under compute: what memory plans use to keep checkpointed layer inputs off the GPU between forward and backward.
//!
//! Ordering, since two streams now touch memory (the allocator's reuse is ordered on the compute stream only):
//! - To the host ([`DeviceBuffer::copy_to_host`]): the copy stream waits for everything queued on the compute
//!   stream so far (the values being produced), copies, and marks `done`. The source block may be reused only after
//!   the copy has read it, so before the source is dropped [`HostCopy::fence`] makes the compute stream wait for
//!   `done`: every later use of that block by the allocator's next owner is queued after the copy. Fencing one layer
//!   later costs nothing when the copy took less than that layer's compute.
//! - Back to the device ([`HostCopy::upload`]): a new block is taken (stream-ordered on compute, so its previous
//!   owner's queued work may still run), the copy stream waits for the compute stream up to that point, copies, and
//!   marks `done`; [`Arrival::ready`] makes the compute stream wait for that mark before the first use. Started one
//!   layer ahead, the copy hides under the layer in between.
//! - Pinned blocks are only ever read or written by the copy stream, so their reuse is ordered by that stream alone;
//!   they go back to the driver only after it drains.
//!
//! Pinned memory is slow to obtain (`cuMemHostAlloc` maps and locks pages), so its blocks come from the caching
//! allocator too (`PinnedPool`: the same size classes and reuse as device blocks, over pinned host memory).

use super::alloc::{Backing, Block, CachingAllocator};
use super::arrival::Arrival;
use super::{CudaDevice, DeviceBuffer, DeviceCopy, Error, Result};
use cudarc::driver::{result as driver, sys, CudaContext, CudaEvent, CudaStream, DriverError};
use std::sync::Arc;

/// Page-locked host blocks of one device's copies: the caching allocator's size classes and reuse over
/// [`PinnedMemory`].
pub(crate) type PinnedPool = CachingAllocator<PinnedMemory>;

/// The pinned pool's backing: `cuMemHostAlloc` / `cuMemFreeHost` in the device's context.
pub(crate) struct PinnedMemory {
    pub(crate) ordinal: usize,
    pub(crate) ctx: Arc<CudaContext>,
}

impl Backing for PinnedMemory {
    fn alloc(&self, bytes: usize) -> Result<Option<u64>> {
        self.ctx.bind_to_thread().map_err(Error::driver("cuCtxSetCurrent"))?;
        // SAFETY: a plain page-locked allocation in the device's context; flags 0 (cacheable, not mapped): only DMA
        // touches it, never a kernel.
        match unsafe { driver::malloc_host(bytes, 0) } {
            Ok(ptr) => Ok(Some(ptr as u64)),
            Err(DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => Ok(None),
            Err(e) => Err(Error::Driver { op: "cuMemHostAlloc", source: e }),
        }
    }

    fn free(&self, ptr: u64) -> Result<()> {
        self.ctx.bind_to_thread().map_err(Error::driver("cuCtxSetCurrent"))?;
        // SAFETY: `ptr` came from malloc_host above and is freed once (the allocator drops it from its lists), after
        // `synchronize`, so no copy still reads or writes it.
        unsafe { driver::free_host(ptr as *mut std::ffi::c_void) }.map_err(Error::driver("cuMemFreeHost"))
    }

    /// Drains the context, the copy stream (the only user of pinned blocks) included.
    fn synchronize(&self) -> Result<()> {
        self.ctx.synchronize().map_err(Error::driver("cuCtxSynchronize"))
    }

    /// Host memory has no driver figure; [`take`] reports running out as [`Error::HostOutOfMemory`] instead.
    fn mem_info(&self) -> Result<(usize, usize)> {
        Ok((0, 0))
    }

    fn ordinal(&self) -> usize {
        self.ordinal
    }
}

/// Bytes of pinned host memory a device's copies hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinnedStats {
    /// Held by parked buffers.
    pub in_use: usize,
    /// Obtained from the driver: `in_use` plus the cache.
    pub reserved: usize,
}

/// A pinned block of at least `bytes` (> 0) from `device`'s pool, back in it when dropped.
fn take(device: &CudaDevice, bytes: usize) -> Result<PinnedBlock> {
    let block = device.pinned_pool().allocate(bytes).map_err(|e| match e {
        Error::OutOfMemory { requested, reserved, .. } => Error::HostOutOfMemory { requested, pinned: reserved },
        e => e,
    })?;
    Ok(PinnedBlock { block: Some(block), device: device.clone() })
}

/// One pinned block, back in its device's pool when dropped.
struct PinnedBlock {
    /// None once given back.
    block: Option<Block>,
    device: CudaDevice,
}

impl PinnedBlock {
    fn addr(&self) -> u64 {
        self.block.as_ref().map_or(0, |b| b.ptr)
    }
}

impl Drop for PinnedBlock {
    fn drop(&mut self) {
        if let Some(block) = self.block.take() {
            self.device.pinned_pool().release(block);
        }
    }
}

/// A buffer's bytes in pinned host memory (or on their way there: see the module docs for the ordering).
pub struct HostCopy {
    block: PinnedBlock,
    bytes: usize,
    /// Marks the end of the copy to the host on the copy stream.
    done: CudaEvent,
}

impl<T: DeviceCopy> DeviceBuffer<T> {
    /// Starts copying this buffer's values (as the compute stream will have them once the work queued so far has
    /// run) into pinned host memory, on the device's copy stream; the host does not wait. Call
    /// [`HostCopy::fence`] before this buffer can be dropped.
    pub fn copy_to_host(&self) -> Result<HostCopy> {
        HostCopy::start(self.device(), self.ptr(), self.len() * size_of::<T>())
    }
}

impl HostCopy {
    /// Starts copying `bytes` at device address `src` to a pinned block (see [`DeviceBuffer::copy_to_host`]).
    pub(crate) fn start(device: &CudaDevice, src: u64, bytes: usize) -> Result<HostCopy> {
        let block = take(device, bytes.max(1))?;
        let copies = device.copy_stream()?;
        copies.join(device.stream()).map_err(Error::driver("cuStreamWaitEvent"))?;
        if bytes > 0 {
            device.bind()?;
            // SAFETY: the pinned block holds at least `bytes`; the source block holds `bytes` and stays allocated
            // until the compute stream has waited for `done` (HostCopy::fence, which the caller owes before giving
            // it up); the copy is queued after all compute work so far.
            unsafe { sys::cuMemcpyDtoHAsync_v2(block.addr() as *mut std::ffi::c_void, src, bytes, copies.cu_stream()) }
                .result()
                .map_err(Error::driver("cuMemcpyDtoHAsync"))?;
        }
        let done = copies.record_event(None).map_err(Error::driver("cuEventRecord"))?;
        Ok(HostCopy { block, bytes, done })
    }

    /// Bytes parked.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Makes the compute stream wait until the copy to the host has read its source, so that the source buffer may
    /// be dropped (its block's next owner runs after the copy). The host does not wait.
    pub fn fence(&self) -> Result<()> {
        let device = &self.block.device;
        device.stream().wait(&self.done).map_err(Error::driver("cuStreamWaitEvent"))
    }

    /// Starts copying the values back into a new buffer of `len` elements (`len · size_of::<T>()` must be the bytes
    /// parked) on the copy stream. The buffer is handed out by [`Arrival::ready`].
    pub fn upload<T: DeviceCopy>(&self, len: usize) -> Result<Arrival<T>> {
        assert_eq!(len * size_of::<T>(), self.bytes, "HostCopy::upload: {len} elements for {} bytes", self.bytes);
        let buffer = self.block.device.alloc::<T>(len)?;
        let done = self.upload_to(buffer.ptr())?;
        Ok(Arrival::new(buffer, done))
    }

    /// Starts copying the values back to device address `dst` (a block of at least [`HostCopy::bytes`]) on the copy
    /// stream; the returned event marks the end of the copy.
    pub(crate) fn upload_to(&self, dst: u64) -> Result<CudaEvent> {
        let device = &self.block.device;
        let copies = device.copy_stream()?;
        // The block's previous owner may still have compute work queued: the copy goes after it.
        copies.join(device.stream()).map_err(Error::driver("cuStreamWaitEvent"))?;
        if self.bytes > 0 {
            device.bind()?;
            // SAFETY: both blocks hold `bytes`; the copy to the host that filled the pinned block was queued earlier
            // on this same stream, so it has completed before this one reads it.
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    dst,
                    self.block.addr() as *const std::ffi::c_void,
                    self.bytes,
                    copies.cu_stream(),
                )
            }
            .result()
            .map_err(Error::driver("cuMemcpyHtoDAsync"))?;
        }
        copies.record_event(None).map_err(Error::driver("cuEventRecord"))
    }
}

/// The stream copies run on, made on first use.
pub(crate) fn new_copy_stream(device: &CudaDevice) -> Result<Arc<CudaStream>> {
    device.stream().context().new_stream().map_err(Error::driver("cuStreamCreate"))
}
