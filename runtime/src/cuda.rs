//! The CUDA side of the runtime's ops: `Gpu`, the operand preparation that every op's CUDA branch shares (placement,
//! the compute dtype, whole buffers in it), reading a step's scalars back in one wait, and device buffers written in
//! place. How storage moves between host and device, and is made whole or cast there, is `transfer.rs`'s, below
//! `Tensor`, which this module sits above.
//!
//! Must not hold kernels (those are `qlora_kernels::cuda`) or fall back to the CPU: an op whose operands live on a GPU
//! runs there or returns an error.
//!
//! Precision on CUDA: f32 and bf16 tensors only (f64 exists for CPU gradient checks; f16 may be stored and moved but
//! no op computes in it). An op computes in bf16 when any float operand is bf16 and in f32 otherwise, casting the
//! others on the device first: f32 master adapters meet bf16 activations at bf16, as autocast does. Outputs that the
//! kernels keep in f32 whatever the input (rstd, log-sum-exp, per-row losses, sums) stay f32.

use crate::storage::{CudaElement, CudaStorage, Storage};
use crate::{DType, Device, Error, Result, Tensor};
use qlora_kernels::cuda::{self as kc, CudaDevice, DeviceBuffer, DeviceCopy};
use std::sync::Arc;

use crate::transfer::cuda_device;

/// How many times the host has waited for `device` (synchronisations and reads back) since it was opened; 0 for the
/// CPU. A training step's contract is one such wait per optimizer step (its loss and gradient norm).
pub fn synchronizations(device: Device) -> Result<u64> {
    match device {
        Device::Cpu => Ok(0),
        Device::Cuda(ordinal) => Ok(cuda_device(ordinal)?.synchronizations()),
    }
}

/// The values of one-element tensors, read back together: one synchronisation for all of them (a training step
/// reads its loss and gradient norm this way, once).
pub fn read_scalars(ts: &[&Tensor]) -> Result<Vec<f64>> {
    let Some(first) = ts.first() else { return Ok(Vec::new()) };
    let Device::Cuda(ordinal) = first.device() else {
        return ts.iter().map(|t| t.to_scalar::<f64>()).collect();
    };
    let dev = cuda_device(ordinal)?;
    let mut packed = dev.alloc::<f32>(ts.len()).map_err(Error::cuda("read_scalars"))?;
    for (i, t) in ts.iter().enumerate() {
        if t.elem_count() != 1 || t.device() != first.device() {
            return Err(Error::shape(
                "read_scalars",
                format!("{:?} on {} is not a scalar on cuda:{ordinal}", t.shape(), t.device()),
            ));
        }
        let v = to_dtype(t, DType::F32)?;
        packed.copy_from_at(i, buf::<f32>(&v)).map_err(Error::cuda("read_scalars"))?;
    }
    let values = packed.to_vec().map_err(Error::cuda("read_scalars"))?;
    Ok(values.into_iter().map(f64::from).collect())
}

/// Starts copying a whole CUDA tensor's elements to pinned host memory on the copy stream (`crate::offload`).
pub(crate) fn copy_to_host(whole: &Tensor) -> Result<kc::HostCopy> {
    let copy = match cuda_storage("offload", whole)? {
        CudaStorage::F32(b) => b.copy_to_host(),
        CudaStorage::BF16(b) => b.copy_to_host(),
        CudaStorage::F16(b) => b.copy_to_host(),
        CudaStorage::I32(b) => b.copy_to_host(),
        CudaStorage::U8(b) => b.copy_to_host(),
    };
    copy.map_err(Error::cuda("offload"))
}

fn cuda_storage<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a CudaStorage> {
    match t.storage() {
        Storage::Cuda(s) => Ok(s),
        Storage::Cpu(_) => Err(Error::invalid(op, "expected a CUDA tensor, got a CPU one")),
    }
}

/// `t` with storage of exactly its elements, row-major: itself when it already is, a strided copy of a view.
pub(crate) fn contiguous(t: &Tensor) -> Result<Tensor> {
    cuda_storage("contiguous", t)?;
    t.try_contiguous()
}

/// A whole, contiguous copy of `t` in `dtype` on its device (itself when nothing changes). Converts between f32 and
/// bf16; other pairs are an error rather than a trip through the host.
pub(crate) fn to_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    cuda_storage("to_dtype", t)?;
    t.try_to_dtype(dtype)
}

/// The buffer of `t` for writing in place: the view is made whole and shared storage copied first, so nobody else
/// observes the write (the same copy-on-write rule as [`Tensor::update`]).
pub(crate) fn buffer_mut<'a, T: CudaElement>(op: &'static str, t: &'a mut Tensor) -> Result<&'a mut DeviceBuffer<T>> {
    if t.dtype() != T::DTYPE {
        return Err(Error::DType { op, expected: T::DTYPE, got: t.dtype() });
    }
    cuda_storage(op, t)?;
    if !t.is_whole() {
        *t = contiguous(t)?;
    }
    let storage = t.storage_arc_mut();
    if Arc::get_mut(storage).is_none() {
        let copy = match &**storage {
            Storage::Cuda(s) => s.try_clone()?,
            Storage::Cpu(_) => return Err(Error::invalid(op, "expected a CUDA tensor, got a CPU one")),
        };
        *storage = Arc::new(Storage::Cuda(copy));
    }
    match Arc::get_mut(storage) {
        Some(Storage::Cuda(s)) => Ok(T::buffer_mut(s).expect("dtype checked above")),
        _ => unreachable!("storage made unique and on the device above"),
    }
}

/// Where a CUDA op runs and in what precision (see the module docs).
pub(crate) struct Gpu {
    pub(crate) op: &'static str,
    pub(crate) device: Device,
    pub(crate) dtype: DType,
    dev: CudaDevice,
}

impl Gpu {
    /// The CUDA placement of an op over float operands `xs`, or None when they are all on the CPU. Operands on
    /// different devices are an error naming the op and both devices.
    pub(crate) fn of(op: &'static str, xs: &[&Tensor]) -> Result<Option<Gpu>> {
        let first = xs[0].device();
        if let Some(x) = xs.iter().find(|x| x.device() != first) {
            return Err(Error::DeviceMismatch { op, a: first, b: x.device() });
        }
        let Device::Cuda(ordinal) = first else {
            return Ok(None);
        };
        if let Some(x) = xs.iter().find(|x| !matches!(x.dtype(), DType::F32 | DType::BF16)) {
            return Err(Error::DType { op, expected: DType::BF16, got: x.dtype() });
        }
        let dtype = DType::compute(first, xs.iter().map(|x| x.dtype()));
        Ok(Some(Gpu { op, device: first, dtype, dev: cuda_device(ordinal)? }))
    }

    /// A float operand in the op's precision, whole on the device.
    pub(crate) fn input(&self, t: &Tensor) -> Result<Tensor> {
        self.input_as(t, self.dtype)
    }

    /// A float operand in `dtype` (the f32 side inputs: rope tables, rstd, log-sum-exp), whole on the device.
    pub(crate) fn input_as(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        self.same_device(t)?;
        to_dtype(t, dtype)
    }

    /// Keys and values that a kernel reads only where sequence boundaries point (attention's): views of the leading
    /// rows of two buffers of one length, already in the op's dtype (a KV cache's filled rows ahead of its spare
    /// ones), are passed as those buffers, spare rows and all, without a copy; anything else as [`Gpu::input`].
    pub(crate) fn leading_rows(&self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let storage_len = |t: &Tensor| t.storage().len();
        let leading = |t: &Tensor| {
            let row: usize = t.shape().get(1..).map_or(0, |r| r.iter().product());
            t.device() == self.device
                && t.dtype() == self.dtype
                && t.is_contiguous()
                && t.layout().offset() == 0
                && row > 0
                && storage_len(t) % row == 0
        };
        if leading(k) && leading(v) && storage_len(k) == storage_len(v) {
            return Ok((k.clone(), v.clone()));
        }
        Ok((self.input(k)?, self.input(v)?))
    }

    /// An index operand (ids, targets, cu_seqlens): I32 on the op's device, whole.
    pub(crate) fn index(&self, what: &'static str, t: &Tensor) -> Result<Tensor> {
        self.same_device(t)?;
        if t.dtype() != DType::I32 {
            return Err(Error::invalid(self.op, format!("{what} must be I32, got {:?}", t.dtype())));
        }
        contiguous(t)
    }

    fn same_device(&self, t: &Tensor) -> Result<()> {
        if t.device() != self.device {
            return Err(Error::DeviceMismatch { op: self.op, a: self.device, b: t.device() });
        }
        Ok(())
    }

    /// `n` elements for a kernel to write.
    pub(crate) fn alloc<T: DeviceCopy>(&self, n: usize) -> Result<DeviceBuffer<T>> {
        self.dev.alloc(n).map_err(Error::cuda(self.op))
    }

    /// A launcher's outcome as this crate's error, naming the op.
    pub(crate) fn run<R>(&self, r: kc::Result<R>) -> Result<R> {
        r.map_err(Error::cuda(self.op))
    }
}

/// The buffer behind a tensor that [`Gpu::input`], [`Gpu::index`] or [`contiguous`] prepared.
pub(crate) fn buf<T: CudaElement>(t: &Tensor) -> &DeviceBuffer<T> {
    let b = match t.storage() {
        Storage::Cuda(s) => T::buffer(s),
        Storage::Cpu(_) => None,
    };
    b.expect("prepared on the device in this dtype by Gpu::input / Gpu::index")
}

/// A kernel's output buffer as a tensor of `shape`.
pub(crate) fn output<T: CudaElement>(b: DeviceBuffer<T>, shape: &[usize]) -> Tensor {
    Tensor::from_cuda(T::wrap_device(b), shape).expect("kernel output sized from the shape")
}

/// Runs `$body` with `T` bound to the element type of the op's precision.
macro_rules! with_gpu {
    ($g:expr, |$t:ident| $body:expr) => {
        match $g.dtype {
            $crate::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            _ => {
                type $t = f32;
                $body
            }
        }
    };
}
pub(crate) use with_gpu;
