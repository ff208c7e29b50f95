//! [`DeviceBuffer`]: `len` elements of one type in device memory, on one [`CudaDevice`], from its caching allocator.
//! `runtime` holds these as its CUDA storage (one variant per dtype, as `CpuStorage` holds `Vec`s).

use super::alloc::Category;
use super::park::{slot_id, Slot};
use super::{CudaDevice, Error, Result};
use cudarc::driver::result as driver;
use half::{bf16, f16};
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

/// Element types that live in device memory: plain data for which every bit pattern is a valid value, so memory
/// written by any kernel (or by none) reads back as values, never as undefined behaviour.
pub trait DeviceCopy: Copy + Default + Send + Sync + 'static + private::Sealed {}

impl DeviceCopy for f32 {}
impl DeviceCopy for bf16 {}
impl DeviceCopy for f16 {}
impl DeviceCopy for i32 {}
impl DeviceCopy for u8 {}

mod private {
    /// The element's bits, for filling memory with it.
    pub trait Sealed {
        fn fill_bits(self) -> u32;
    }
    impl Sealed for f32 {
        fn fill_bits(self) -> u32 {
            self.to_bits()
        }
    }
    impl Sealed for half::bf16 {
        fn fill_bits(self) -> u32 {
            self.to_bits() as u32
        }
    }
    impl Sealed for half::f16 {
        fn fill_bits(self) -> u32 {
            self.to_bits() as u32
        }
    }
    impl Sealed for i32 {
        fn fill_bits(self) -> u32 {
            self as u32
        }
    }
    impl Sealed for u8 {
        fn fill_bits(self) -> u32 {
            self as u32
        }
    }
}

pub struct DeviceBuffer<T: DeviceCopy> {
    /// Where the values are: a block that parking may swap ([`super::park`]). None for an empty buffer (the driver
    /// allocates no zero-byte blocks).
    slot: Option<Arc<Slot>>,
    len: usize,
    device: CudaDevice,
    _elem: PhantomData<T>,
}

impl<T: DeviceCopy> DeviceBuffer<T> {
    /// `len` elements whose values are whatever the memory's previous owner left.
    pub(crate) fn uninit(device: &CudaDevice, len: usize) -> Result<Self> {
        let bytes = len.checked_mul(size_of::<T>()).expect("buffer size overflows usize");
        let slot = if bytes == 0 { None } else { Some(Slot::new(device.allocator().allocate(bytes)?, bytes, device)) };
        Ok(DeviceBuffer { slot, len, device: device.clone(), _elem: PhantomData })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// The device address, for kernel arguments (0 for an empty buffer, which no kernel is launched on).
    pub(crate) fn ptr(&self) -> u64 {
        self.slot.as_ref().map_or(0, |s| s.ptr())
    }

    /// The identity of this buffer's memory, shared by every handle to it (0 for an empty buffer): what
    /// [`super::park::ParkedSet::park`] is told to leave alone.
    pub fn park_id(&self) -> usize {
        self.slot.as_ref().map_or(0, slot_id)
    }

    fn bytes(&self) -> usize {
        self.len * size_of::<T>()
    }

    /// Counts this buffer's memory under `category` from now on (a gradient kept as an adapter's, say).
    pub fn retag(&self, category: Category) {
        if let Some(slot) = &self.slot {
            slot.retag(category);
        }
    }

    /// Overwrites the whole buffer with `src`.
    pub fn copy_from_host(&mut self, src: &[T]) -> Result<()> {
        assert_eq!(src.len(), self.len, "copy_from_host: {} values for a buffer of {}", src.len(), self.len);
        if self.is_empty() {
            return Ok(());
        }
        self.device.bind()?;
        // SAFETY: the buffer holds `len` elements = size_of_val(src) bytes. `src` is pageable host memory, which the
        // driver copies to a staging buffer before the call returns, so it may be dropped right after; the transfer
        // is ordered on the device's stream after all earlier work on this block.
        unsafe { driver::memcpy_htod_async(self.ptr(), src, self.device.cu_stream()) }
            .map_err(Error::driver("cuMemcpyHtoDAsync"))
    }

    /// The buffer's values, after all work queued on the device so far has finished: a synchronisation, counted
    /// by [`CudaDevice::synchronizations`].
    pub fn to_vec(&self) -> Result<Vec<T>> {
        let mut out = vec![T::default(); self.len];
        if self.is_empty() {
            return Ok(out);
        }
        self.device.bind()?;
        // SAFETY: `out` holds `len` elements, the buffer's size. The copy is ordered after earlier work on the
        // stream, and `out` is not touched until the stream has drained (below), so the copy has completed.
        unsafe { driver::memcpy_dtoh_async(&mut out, self.ptr(), self.device.cu_stream()) }
            .map_err(Error::driver("cuMemcpyDtoHAsync"))?;
        self.device.synchronize()?;
        Ok(out)
    }

    /// A new buffer with the same values (a device-to-device copy, queued on the stream).
    pub fn try_clone(&self) -> Result<Self> {
        let copy = Self::uninit(&self.device, self.len)?;
        if !self.is_empty() {
            self.device.bind()?;
            // SAFETY: both blocks hold `bytes()` bytes, on this device; the copy is stream-ordered.
            unsafe { driver::memcpy_dtod_async(copy.ptr(), self.ptr(), self.bytes(), self.device.cu_stream()) }
                .map_err(Error::driver("cuMemcpyDtoDAsync"))?;
        }
        Ok(copy)
    }

    /// Copies all of `src` into elements `at..at + src.len()` (stream-ordered, device to device).
    pub fn copy_from_at(&mut self, at: usize, src: &DeviceBuffer<T>) -> Result<()> {
        self.copy_range_from(at, src, 0..src.len)
    }

    /// Copies `src[range]` into elements `at..at + range.len()` (stream-ordered, device to device): a view's rows
    /// without gathering the view into a buffer of its own first.
    pub fn copy_range_from(&mut self, at: usize, src: &DeviceBuffer<T>, range: Range<usize>) -> Result<()> {
        assert!(range.start <= range.end && range.end <= src.len, "copy_range_from: {range:?} of {}", src.len);
        let n = range.len();
        assert!(at + n <= self.len, "copy_range_from: {n} elements at {at} into {}", self.len);
        if n == 0 {
            return Ok(());
        }
        self.device.bind()?;
        let bytes = size_of::<T>();
        // SAFETY: the asserted ranges of both blocks, on the device's stream after earlier work on both.
        unsafe {
            driver::memcpy_dtod_async(
                self.ptr() + (at * bytes) as u64,
                src.ptr() + (range.start * bytes) as u64,
                n * bytes,
                self.device.cu_stream(),
            )
        }
        .map_err(Error::driver("cuMemcpyDtoDAsync"))
    }

    /// Sets every element to `value` (a memset of its bits, queued on the stream).
    pub fn fill(&mut self, value: T) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        self.device.bind()?;
        let (bits, ptr, n, stream) = (value.fill_bits(), self.ptr(), self.len, self.device.cu_stream());
        // SAFETY: the block holds `len` elements of size_of::<T>() bytes each, and every DeviceCopy bit pattern is a
        // value; the memset is ordered on the device's stream after earlier work on this block.
        let r = unsafe {
            match size_of::<T>() {
                1 => cudarc::driver::sys::cuMemsetD8Async(ptr, bits as u8, n, stream),
                2 => cudarc::driver::sys::cuMemsetD16Async(ptr, bits as u16, n, stream),
                _ => cudarc::driver::sys::cuMemsetD32Async(ptr, bits, n, stream),
            }
        };
        r.result().map_err(Error::driver("cuMemsetAsync"))
    }

    /// Sets every byte to zero (0.0 for the float types, 0 for the integers).
    pub fn zero(&mut self) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        self.device.bind()?;
        // SAFETY: the block holds `bytes()` bytes; all-zero bits are a valid value of every DeviceCopy type.
        unsafe { driver::memset_d8_async(self.ptr(), 0, self.bytes(), self.device.cu_stream()) }
            .map_err(Error::driver("cuMemsetD8Async"))
    }
}

impl<T: DeviceCopy> fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceBuffer<{}>[{}] on cuda:{}", std::any::type_name::<T>(), self.len, self.device.ordinal())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `runtime` keeps storage in an `Arc` shared across threads.
    #[test]
    fn buffers_and_devices_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<DeviceBuffer<f32>>();
        send_sync::<DeviceBuffer<bf16>>();
        send_sync::<CudaDevice>();
    }
}
