//! Elapsed time of work queued on a device, for benchmarks and the profiler: a [`Mark`] is a CUDA event on a GPU's
//! stream and the host clock on the CPU (where an op has finished when it returns). The time between two marks is
//! the device's time for the work queued between them; reading it waits for that work.
//!
//! Owns the marks only; callers decide what to time. Commands use this instead of `qlora_kernels`' events.

use crate::transfer::cuda_device;
use crate::{Device, Error, Result};
use qlora_kernels::cuda::timing::Event;
use std::time::Instant;

/// A point in the order of a device's work.
#[derive(Debug)]
pub enum Mark {
    Host(Instant),
    Cuda(Event),
}

impl Mark {
    /// Marks everything queued on `device` so far.
    pub fn now(device: Device) -> Result<Mark> {
        match device {
            Device::Cpu => Ok(Mark::Host(Instant::now())),
            Device::Cuda(ordinal) => {
                let dev = cuda_device(ordinal)?;
                Ok(Mark::Cuda(Event::record(&dev).map_err(Error::cuda("timing mark"))?))
            }
        }
    }

    /// Milliseconds from this mark to `end`, a later mark of the same device; waits for the work before `end`.
    pub fn elapsed_ms(&self, end: &Mark) -> Result<f64> {
        match (self, end) {
            (Mark::Host(a), Mark::Host(b)) => Ok(b.saturating_duration_since(*a).as_secs_f64() * 1e3),
            (Mark::Cuda(a), Mark::Cuda(b)) => Ok(a.elapsed_ms(b).map_err(Error::cuda("timing"))? as f64),
            _ => Err(Error::invalid("timing", "the two marks are on different devices")),
        }
    }

    /// Waits until the work before this mark has finished (a GPU fault before it is reported here).
    pub fn wait(&self) -> Result<()> {
        match self {
            Mark::Host(_) => Ok(()),
            Mark::Cuda(e) => e.synchronize().map_err(Error::cuda("timing wait")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_marks_measure_forward_time_only() {
        let a = Mark::now(Device::Cpu).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = Mark::now(Device::Cpu).unwrap();
        assert!(a.elapsed_ms(&b).unwrap() >= 1.0);
        assert_eq!(b.elapsed_ms(&a).unwrap(), 0.0, "a mark before its start measures nothing, not negative time");
        b.wait().unwrap();
    }
}
