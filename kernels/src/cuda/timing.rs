//! Device timing with CUDA events: an [`Event`] marks a point in a device's stream, and the time between two marks is
//! what the GPU took to run the work queued between them (gaps where the host had queued nothing included). Reading
//! it waits for both marks. Owns only the events; what is timed and how it is reported belong to the callers
//! (`runtime::timing`, `runtime::profile`, `qlora-rt bench`).

use super::{CudaDevice, Error, Result};
use cudarc::driver::{sys, CudaEvent};

/// A point in the work queued on one device's stream.
#[derive(Debug)]
pub struct Event {
    event: CudaEvent,
}

impl Event {
    /// Marks everything queued on `dev`'s stream so far. The event is created with timing on (cudarc's default,
    /// `CU_EVENT_DISABLE_TIMING`, could not be measured).
    pub fn record(dev: &CudaDevice) -> Result<Event> {
        let event = dev
            .stream()
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(Error::driver("cuEventRecord"))?;
        Ok(Event { event })
    }

    /// Waits until the marked work has finished; reports a fault of any kernel before it.
    pub fn synchronize(&self) -> Result<()> {
        self.event.synchronize().map_err(Error::driver("cuEventSynchronize"))
    }

    /// Milliseconds of device time from this mark to `end` (a later mark of the same device), after both completed.
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32> {
        self.event.elapsed_ms(&end.event).map_err(Error::driver("cuEventElapsedTime"))
    }
}
