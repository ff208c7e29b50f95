//! CUDA storage moved and reshaped below the tensor: host to device and back, a fill, the strided copy that makes a
//! view whole, and the f32 ↔ bf16 cast. On storages and layouts only, so that `tensor.rs` builds its device methods
//! on them while `cuda.rs`, which prepares the operands of ops, sits above `Tensor` (no module cycle between them).
//!
//! Owns: the GPU registry lookup ([`cuda_device`]) and these five moves. Must not know about ops or tensors.

use crate::dtype::CpuStorage;
use crate::layout::Layout;
use crate::storage::{CudaElement, CudaStorage};
use crate::{DType, Device, Error, Result};
use half::bf16;
use qlora_kernels::cuda::{self as kc, CudaDevice, DeviceBuffer};

/// The GPU `cuda:{ordinal}`, opened on first use and then shared by the whole process (one context, stream and
/// caching allocator per ordinal: `CudaDevice::new` keeps the registry). A missing driver, GPU or NVRTC is an error
/// saying what to install.
pub fn cuda_device(ordinal: usize) -> Result<CudaDevice> {
    CudaDevice::new(ordinal).map_err(Error::cuda("cuda device"))
}

fn f64_unsupported(op: &'static str, ordinal: usize) -> Error {
    Error::Unsupported {
        op,
        device: Device::Cuda(ordinal),
        why: "f64 (for CPU gradient checks) has no CUDA kernels: convert to f32 first",
    }
}

/// Row-major host values copied to `cuda:{ordinal}`, same dtype.
pub(crate) fn upload(values: &CpuStorage, ordinal: usize) -> Result<CudaStorage> {
    fn go<T: CudaElement>(dev: &CudaDevice, v: &[T]) -> Result<CudaStorage> {
        Ok(T::wrap_device(dev.upload(v).map_err(Error::cuda("to_device"))?))
    }
    let dev = cuda_device(ordinal)?;
    match values {
        CpuStorage::F32(v) => go(&dev, v),
        CpuStorage::BF16(v) => go(&dev, v),
        CpuStorage::F16(v) => go(&dev, v),
        CpuStorage::I32(v) => go(&dev, v),
        CpuStorage::U8(v) => go(&dev, v),
        CpuStorage::F64(_) => Err(f64_unsupported("to_device", ordinal)),
    }
}

/// A whole device storage's elements copied to the host (waits for the device's queued work).
pub(crate) fn download(s: &CudaStorage) -> Result<CpuStorage> {
    fn go<T: CudaElement>(b: &DeviceBuffer<T>) -> Result<CpuStorage> {
        Ok(T::wrap(b.to_vec().map_err(Error::cuda("to_device"))?))
    }
    match s {
        CudaStorage::F32(b) => go(b),
        CudaStorage::BF16(b) => go(b),
        CudaStorage::F16(b) => go(b),
        CudaStorage::I32(b) => go(b),
        CudaStorage::U8(b) => go(b),
    }
}

/// `len` elements of `value` in `dtype` on `cuda:{ordinal}`: a memset of the value's bits, no upload.
pub(crate) fn fill(len: usize, value: f64, dtype: DType, ordinal: usize) -> Result<CudaStorage> {
    fn go<T: CudaElement>(dev: &CudaDevice, len: usize, value: T) -> Result<CudaStorage> {
        let mut b = dev.alloc::<T>(len).map_err(Error::cuda("full"))?;
        b.fill(value).map_err(Error::cuda("full"))?;
        Ok(T::wrap_device(b))
    }
    let dev = cuda_device(ordinal)?;
    match dtype {
        DType::F32 => go(&dev, len, value as f32),
        DType::BF16 => go(&dev, len, crate::dtype::bf16_from_f64(value)),
        DType::F16 => go(&dev, len, crate::dtype::f16_from_f64(value)),
        DType::I32 => go(&dev, len, value as i32),
        DType::U8 => go(&dev, len, value as u8),
        DType::F64 => Err(f64_unsupported("full", ordinal)),
    }
}

/// The elements `layout` picks from `s`, row-major, in a storage of their own.
pub(crate) fn strided(s: &CudaStorage, layout: &Layout) -> Result<CudaStorage> {
    fn go<T: CudaElement>(src: &DeviceBuffer<T>, l: &Layout) -> Result<CudaStorage> {
        let mut dst = src.device().alloc::<T>(l.elem_count()).map_err(Error::cuda("contiguous"))?;
        kc::copy::strided_copy(src, l.offset(), l.shape(), l.strides(), &mut dst).map_err(Error::cuda("contiguous"))?;
        Ok(T::wrap_device(dst))
    }
    if layout.shape().len() > kc::copy::MAX_RANK {
        let what = format!("a CUDA view of rank {} (at most {})", layout.shape().len(), kc::copy::MAX_RANK);
        return Err(Error::shape("contiguous", what));
    }
    match s {
        CudaStorage::F32(b) => go(b, layout),
        CudaStorage::BF16(b) => go(b, layout),
        CudaStorage::F16(b) => go(b, layout),
        CudaStorage::I32(b) => go(b, layout),
        CudaStorage::U8(b) => go(b, layout),
    }
}

/// A whole storage converted to `dtype` on its device: f32 ↔ bf16 (other pairs are an error rather than a trip
/// through the host).
pub(crate) fn cast(s: &CudaStorage, dtype: DType, device: Device) -> Result<CudaStorage> {
    fn go<S: CudaElement + kc::GpuFloat, D: CudaElement + kc::GpuFloat>(src: &DeviceBuffer<S>) -> Result<CudaStorage> {
        let mut dst = src.device().alloc::<D>(src.len()).map_err(Error::cuda("to_dtype"))?;
        kc::copy::cast(src, &mut dst).map_err(Error::cuda("to_dtype"))?;
        Ok(D::wrap_device(dst))
    }
    match (s, dtype) {
        (CudaStorage::F32(b), DType::BF16) => go::<f32, bf16>(b),
        (CudaStorage::BF16(b), DType::F32) => go::<bf16, f32>(b),
        _ => Err(Error::Unsupported {
            op: "to_dtype",
            device,
            why: "CUDA tensors convert between f32 and bf16 only (move to the CPU for other dtypes)",
        }),
    }
}
