//! What a tensor's elements live in: host vectors ([`CpuStorage`], in `dtype`) or device buffers ([`CudaStorage`]),
//! one variant per dtype. Both `tensor` (which owns a storage) and `cuda` (which fills and reads device storage)
//! build on these types, so neither has to reach into the other for them.
//!
//! Owns: the storage enums and the element types a device buffer can hold. Must not move or convert data (that is
//! `tensor` on the host and `cuda` on the device).

use crate::dtype::{CpuStorage, Element};
use crate::{DType, Error, Result};
use half::{bf16, f16};
use qlora_kernels::cuda::{CudaDevice, DeviceBuffer, DeviceCopy};

/// Where the elements are; every match on it is in this crate.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => s.dtype(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len(),
            Storage::Cuda(s) => s.len(),
        }
    }
}

/// Device memory of one dtype.
#[derive(Debug)]
pub enum CudaStorage {
    F32(DeviceBuffer<f32>),
    BF16(DeviceBuffer<bf16>),
    F16(DeviceBuffer<f16>),
    I32(DeviceBuffer<i32>),
    U8(DeviceBuffer<u8>),
}

impl CudaStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CudaStorage::F32(_) => DType::F32,
            CudaStorage::BF16(_) => DType::BF16,
            CudaStorage::F16(_) => DType::F16,
            CudaStorage::I32(_) => DType::I32,
            CudaStorage::U8(_) => DType::U8,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            CudaStorage::F32(b) => b.len(),
            CudaStorage::BF16(b) => b.len(),
            CudaStorage::F16(b) => b.len(),
            CudaStorage::I32(b) => b.len(),
            CudaStorage::U8(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn device(&self) -> &CudaDevice {
        match self {
            CudaStorage::F32(b) => b.device(),
            CudaStorage::BF16(b) => b.device(),
            CudaStorage::F16(b) => b.device(),
            CudaStorage::I32(b) => b.device(),
            CudaStorage::U8(b) => b.device(),
        }
    }

    /// Counts this storage's device memory under `category` from now on.
    pub(crate) fn retag(&self, category: qlora_kernels::cuda::Category) {
        match self {
            CudaStorage::F32(b) => b.retag(category),
            CudaStorage::BF16(b) => b.retag(category),
            CudaStorage::F16(b) => b.retag(category),
            CudaStorage::I32(b) => b.retag(category),
            CudaStorage::U8(b) => b.retag(category),
        }
    }

    /// A device-to-device copy (what copy-on-write needs when the storage is shared).
    pub(crate) fn try_clone(&self) -> Result<CudaStorage> {
        let e = Error::cuda("copy on write");
        Ok(match self {
            CudaStorage::F32(b) => CudaStorage::F32(b.try_clone().map_err(e)?),
            CudaStorage::BF16(b) => CudaStorage::BF16(b.try_clone().map_err(e)?),
            CudaStorage::F16(b) => CudaStorage::F16(b.try_clone().map_err(e)?),
            CudaStorage::I32(b) => CudaStorage::I32(b.try_clone().map_err(e)?),
            CudaStorage::U8(b) => CudaStorage::U8(b.try_clone().map_err(e)?),
        })
    }
}

/// An element type a device buffer can hold, and its [`CudaStorage`] variant.
pub trait CudaElement: Element + DeviceCopy {
    fn wrap_device(b: DeviceBuffer<Self>) -> CudaStorage;
    fn buffer(s: &CudaStorage) -> Option<&DeviceBuffer<Self>>;
    fn buffer_mut(s: &mut CudaStorage) -> Option<&mut DeviceBuffer<Self>>;
}

macro_rules! cuda_element {
    ($t:ty, $variant:ident) => {
        impl CudaElement for $t {
            fn wrap_device(b: DeviceBuffer<Self>) -> CudaStorage {
                CudaStorage::$variant(b)
            }
            fn buffer(s: &CudaStorage) -> Option<&DeviceBuffer<Self>> {
                match s {
                    CudaStorage::$variant(b) => Some(b),
                    _ => None,
                }
            }
            fn buffer_mut(s: &mut CudaStorage) -> Option<&mut DeviceBuffer<Self>> {
                match s {
                    CudaStorage::$variant(b) => Some(b),
                    _ => None,
                }
            }
        }
    };
}

cuda_element!(f32, F32);
cuda_element!(bf16, BF16);
cuda_element!(f16, F16);
cuda_element!(i32, I32);
cuda_element!(u8, U8);
