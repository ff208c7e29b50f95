//! A buffer that work on a side stream (a copy back from pinned host memory, a collective) is still writing: the
//! compute stream, not the host, waits for it before its first use. What offloading and NCCL's started gathers hand
//! out.

use super::{DeviceBuffer, DeviceCopy, Error, Result};
use cudarc::driver::CudaEvent;

/// A buffer on its way; [`Arrival::ready`] hands it out once the compute stream waits for it.
pub struct Arrival<T: DeviceCopy> {
    /// None once handed out.
    buffer: Option<DeviceBuffer<T>>,
    /// Marks the end of the side stream's writes.
    done: CudaEvent,
}

impl<T: DeviceCopy> Arrival<T> {
    /// `buffer`, written by side-stream work whose end `done` marks.
    pub(crate) fn new(buffer: DeviceBuffer<T>, done: CudaEvent) -> Self {
        Arrival { buffer: Some(buffer), done }
    }

    /// The buffer, once the compute stream waits for it (the host does not).
    pub fn ready(mut self) -> Result<DeviceBuffer<T>> {
        let buffer = self.buffer.take().expect("an arrival is handed out once");
        buffer.device().stream().wait(&self.done).map_err(Error::driver("cuStreamWaitEvent"))?;
        Ok(buffer)
    }
}

impl<T: DeviceCopy> Drop for Arrival<T> {
    fn drop(&mut self) {
        // Dropped without `ready` (an error between prefetch and use, a prefetch nobody used): the side stream may
        // still be writing the block that goes back to the allocator now, so the compute stream waits for it first.
        // A failure here has nowhere to go but the next driver call, which reports the context's error.
        if let Some(buffer) = &self.buffer {
            let _ = buffer.device().stream().wait(&self.done);
        }
    }
}
