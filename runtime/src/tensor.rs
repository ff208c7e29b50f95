//! The tensor: a layout over shared, copy-on-write storage.

use crate::dtype::{convert, CpuStorage, Element};
use crate::layout::Layout;
use crate::storage::CudaStorage;
use crate::transfer;
use crate::{DType, Device, Error, Result};
use qlora_kernels::Rng;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

// `ops` names the storage by this path.
pub(crate) use crate::storage::Storage;

/// Cheap to clone (the storage is shared). Views share storage; writers go through [`Tensor::update`], which
/// copies first if someone else still holds the storage, so a value saved for backward is never mutated.
///
/// ```
/// use qlora_runtime::ops::linalg::matmul;
/// use qlora_runtime::{DType, Tensor};
///
/// let a = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])?;
/// let b = Tensor::ones(&[3, 2], DType::F32);
/// let c = matmul(&a, &b)?; // [2, 3] · [3, 2] → [2, 2]
/// assert_eq!(c.shape(), [2, 2]);
/// assert_eq!(c.to_vec::<f32>(), vec![6.0, 6.0, 15.0, 15.0]);
/// // A view shares the storage: no copy.
/// let row = a.narrow(0, 1, 1)?;
/// assert!(row.shares_storage(&a) && row.to_vec::<f32>() == [4.0, 5.0, 6.0]);
/// # Ok::<(), qlora_runtime::Error>(())
/// ```
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    layout: Layout,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({:?}, {:?}, {})", self.shape(), self.dtype(), self.device())
    }
}

impl Tensor {
    /// A CPU tensor over `storage` (row-major); errors when the length does not match the shape.
    pub fn from_cpu_storage(storage: CpuStorage, shape: &[usize]) -> Result<Self> {
        Self::from_storage(storage, shape)
    }

    pub(crate) fn from_storage(storage: CpuStorage, shape: &[usize]) -> Result<Self> {
        Self::over(Storage::Cpu(storage), shape, "values")
    }

    /// A CUDA tensor over `storage` (row-major).
    pub(crate) fn from_cuda(storage: CudaStorage, shape: &[usize]) -> Result<Self> {
        Self::over(Storage::Cuda(storage), shape, "device values")
    }

    /// `storage` as a row-major tensor of `shape`; `what` names its elements when the lengths differ.
    fn over(storage: Storage, shape: &[usize], what: &str) -> Result<Self> {
        let layout = Layout::contiguous(shape);
        if layout.elem_count() != storage.len() {
            return Err(Error::shape(
                "tensor",
                format!("{} {what} for shape {shape:?} ({} elements)", storage.len(), layout.elem_count()),
            ));
        }
        Ok(Tensor { storage: Arc::new(storage), layout })
    }

    pub(crate) fn storage(&self) -> &Storage {
        &self.storage
    }

    pub(crate) fn storage_arc_mut(&mut self) -> &mut Arc<Storage> {
        &mut self.storage
    }

    /// A CPU tensor holding `values` in row-major order.
    pub fn from_vec<T: Element>(values: Vec<T>, shape: &[usize]) -> Result<Self> {
        Self::from_storage(T::wrap(values), shape)
    }

    pub fn from_slice<T: Element>(values: &[T], shape: &[usize]) -> Result<Self> {
        Self::from_vec(values.to_vec(), shape)
    }

    pub fn scalar<T: Element>(v: T) -> Self {
        Self::from_vec(vec![v], &[]).expect("one value for a rank-0 shape")
    }

    pub fn full(shape: &[usize], value: f64, dtype: DType) -> Self {
        let n = shape.iter().product();
        let s = convert(&CpuStorage::F64(vec![value; n]), dtype);
        Self::from_storage(s, shape).expect("length computed from the shape")
    }

    pub fn zeros(shape: &[usize], dtype: DType) -> Self {
        Self::full(shape, 0.0, dtype)
    }

    pub fn ones(shape: &[usize], dtype: DType) -> Self {
        Self::full(shape, 1.0, dtype)
    }

    /// [`Tensor::full`] made on `device` (a memset there: nothing crosses from the host).
    pub fn full_on(shape: &[usize], value: f64, dtype: DType, device: Device) -> Result<Self> {
        match device {
            Device::Cpu => Ok(Self::full(shape, value, dtype)),
            Device::Cuda(ordinal) => {
                Self::from_cuda(transfer::fill(shape.iter().product(), value, dtype, ordinal)?, shape)
            }
        }
    }

    pub fn zeros_on(shape: &[usize], dtype: DType, device: Device) -> Result<Self> {
        Self::full_on(shape, 0.0, dtype, device)
    }

    /// Normal(0, std²) values from `rng`.
    pub fn randn(shape: &[usize], std: f64, dtype: DType, rng: &mut Rng) -> Self {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| std * rng.normal()).collect();
        Self::from_storage(convert(&CpuStorage::F64(v), dtype), shape).expect("length computed from the shape")
    }

    /// Uniform values in [lo, hi) from `rng`.
    pub fn uniform(shape: &[usize], lo: f64, hi: f64, dtype: DType, rng: &mut Rng) -> Self {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.uniform_range(lo, hi)).collect();
        Self::from_storage(convert(&CpuStorage::F64(v), dtype), shape).expect("length computed from the shape")
    }

    pub fn shape(&self) -> &[usize] {
        self.layout.shape()
    }

    pub fn rank(&self) -> usize {
        self.shape().len()
    }

    /// Size of dimension `d`, counting from the end when negative is needed: use `dim(rank - 1)`.
    pub fn dim(&self, d: usize) -> Result<usize> {
        self.shape().get(d).copied().ok_or_else(|| Error::shape("dim", format!("dim {d} of shape {:?}", self.shape())))
    }

    pub fn elem_count(&self) -> usize {
        self.layout.elem_count()
    }

    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => Device::Cuda(s.device().ordinal()),
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn is_contiguous(&self) -> bool {
        self.layout.is_contiguous()
    }

    /// Bytes this tensor's elements occupy (what saving it for backward costs, views included at full price).
    pub fn size_in_bytes(&self) -> usize {
        self.elem_count() * self.dtype().size_in_bytes()
    }

    /// True when both tensors view the same storage.
    pub fn shares_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    fn cpu(&self) -> Option<&CpuStorage> {
        match &*self.storage {
            Storage::Cpu(s) => Some(s),
            Storage::Cuda(_) => None,
        }
    }

    /// Panics unless the tensor is on the CPU: the callers dispatched on the device first.
    fn host(&self) -> &CpuStorage {
        self.cpu().expect("a CPU tensor (the caller checked the device)")
    }

    /// True when the storage is exactly this tensor's elements in row-major order: what a kernel can read as a
    /// buffer.
    pub(crate) fn is_whole(&self) -> bool {
        self.is_contiguous() && self.layout.offset() == 0 && self.elem_count() == self.storage.len()
    }

    /// The CPU storage from this view's offset to its end, when it holds `T` (strided readers such as GEMM index it
    /// with the layout's strides).
    pub(crate) fn raw<T: Element>(&self) -> Option<&[T]> {
        T::slice(self.cpu()?).map(|s| &s[self.layout.offset()..])
    }

    /// The elements in row-major order as `T`: borrowed when the dtype matches and the layout is a contiguous
    /// range, converted (one rounding) or gathered otherwise. A CUDA tensor is downloaded (a copy, after the
    /// device's queued work); a failing device panics here, so use [`Tensor::try_to_vec`] where that must be an
    /// error.
    pub fn values<T: Element>(&self) -> Cow<'_, [T]> {
        let Some(cpu) = self.cpu() else {
            return Cow::Owned(
                self.try_to_vec().unwrap_or_else(|e| panic!("values of a {} tensor: {e}", self.device())),
            );
        };
        let n = self.elem_count();
        if self.is_contiguous() {
            let start = self.layout.offset();
            if let Some(s) = T::slice(cpu) {
                return Cow::Borrowed(&s[start..start + n]);
            }
        }
        // One pass, one allocation of exactly the view's elements: converting the whole storage first would hold
        // two copies at once (model loading upcasts every bf16 tensor through here).
        fn gather<S: Element, T: Element>(src: &[S], l: &Layout, n: usize) -> Vec<T> {
            let start = l.offset();
            if l.is_contiguous() {
                src[start..start + n].iter().map(|&x| T::from_f64(x.to_f64())).collect()
            } else {
                l.storage_indices().map(|i| T::from_f64(src[i].to_f64())).collect()
            }
        }
        let l = &self.layout;
        Cow::Owned(match cpu {
            CpuStorage::F64(v) => gather(v, l, n),
            CpuStorage::F32(v) => gather(v, l, n),
            CpuStorage::BF16(v) => gather(v, l, n),
            CpuStorage::F16(v) => gather(v, l, n),
            CpuStorage::I32(v) => gather(v, l, n),
            CpuStorage::U8(v) => gather(v, l, n),
        })
    }

    /// The elements as a `Vec<T>`, converting from any dtype (a download for a CUDA tensor; see [`Tensor::values`]).
    pub fn to_vec<T: Element>(&self) -> Vec<T> {
        self.values::<T>().into_owned()
    }

    /// [`Tensor::to_vec`] with a device failure as an error.
    pub fn try_to_vec<T: Element>(&self) -> Result<Vec<T>> {
        match &*self.storage {
            Storage::Cpu(_) => Ok(self.to_vec()),
            Storage::Cuda(_) => Ok(self.download()?.to_vec()),
        }
    }

    /// The single value of a one-element tensor.
    pub fn to_scalar<T: Element>(&self) -> Result<T> {
        if self.elem_count() != 1 {
            return Err(Error::shape(
                "to_scalar",
                format!("shape {:?} has {} elements", self.shape(), self.elem_count()),
            ));
        }
        Ok(self.try_to_vec::<T>()?[0])
    }

    /// A contiguous copy in another dtype (or `self` when nothing changes). On CUDA it stays on the device and
    /// panics when the device fails or the pair has no device conversion: use [`Tensor::try_to_dtype`] there.
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if self.cpu().is_none() {
            return self.try_to_dtype(dtype).unwrap_or_else(|e| panic!("{e}"));
        }
        if dtype == self.dtype() && self.is_contiguous() {
            return self.clone();
        }
        let s = match dtype {
            DType::F64 => f64::wrap(self.to_vec()),
            DType::F32 => f32::wrap(self.to_vec()),
            DType::BF16 => half::bf16::wrap(self.to_vec()),
            DType::F16 => half::f16::wrap(self.to_vec()),
            DType::I32 => i32::wrap(self.to_vec()),
            DType::U8 => u8::wrap(self.to_vec()),
        };
        Self::from_storage(s, self.shape()).expect("same element count")
    }

    /// [`Tensor::to_dtype`] with device failures as errors (CUDA converts between f32 and bf16 only).
    pub fn try_to_dtype(&self, dtype: DType) -> Result<Tensor> {
        match &*self.storage {
            Storage::Cpu(_) => Ok(self.to_dtype(dtype)),
            Storage::Cuda(s) => {
                let whole = self.whole_on_device(s)?;
                if whole.dtype() == dtype {
                    return Ok(whole);
                }
                let Storage::Cuda(ws) = &*whole.storage else { unreachable!("a copy on the same device") };
                Self::from_cuda(transfer::cast(ws, dtype, self.device())?, self.shape())
            }
        }
    }

    /// A CUDA tensor with storage of exactly its elements, row-major: itself when it already is, a strided copy of a
    /// view.
    fn whole_on_device(&self, s: &CudaStorage) -> Result<Tensor> {
        if self.is_whole() {
            return Ok(self.clone());
        }
        Self::from_cuda(transfer::strided(s, &self.layout)?, self.shape())
    }

    /// A CUDA tensor's elements copied to the host (waits for the device's queued work).
    fn download(&self) -> Result<Tensor> {
        let whole = self.try_contiguous()?;
        let Storage::Cuda(s) = &*whole.storage else { unreachable!("a copy on the same device") };
        Self::from_storage(transfer::download(s)?, self.shape())
    }

    /// A CPU tensor's elements copied to `cuda:{ordinal}`.
    fn upload(&self, ordinal: usize) -> Result<Tensor> {
        let whole = if self.is_whole() { self.clone() } else { self.contiguous_copy() };
        Self::from_cuda(transfer::upload(whole.host(), ordinal)?, self.shape())
    }

    pub fn contiguous(&self) -> Tensor {
        self.to_dtype(self.dtype())
    }

    /// [`Tensor::contiguous`] with device failures as errors.
    pub fn try_contiguous(&self) -> Result<Tensor> {
        self.try_to_dtype(self.dtype())
    }

    /// A copy on `device` (`self` when it is already there). Moving between two GPUs goes through the host.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        match (self.device(), device) {
            (from, to) if from == to => Ok(self.clone()),
            (Device::Cpu, Device::Cuda(n)) => self.upload(n),
            (Device::Cuda(_), Device::Cpu) => self.download(),
            (Device::Cuda(_), Device::Cuda(n)) => self.download()?.upload(n),
            (Device::Cpu, Device::Cpu) => unreachable!("equal devices returned above"),
        }
    }

    /// A view with another shape (copies first when the layout is not contiguous).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let base = if self.is_contiguous() { self.clone() } else { self.try_contiguous()? };
        let layout = base.layout.reshape(shape)?;
        Ok(Tensor { storage: base.storage, layout })
    }

    pub fn transpose(&self, a: usize, b: usize) -> Result<Tensor> {
        Ok(Tensor { storage: self.storage.clone(), layout: self.layout.transpose(a, b)? })
    }

    /// Swaps the last two dimensions.
    pub fn t(&self) -> Result<Tensor> {
        let r = self.rank();
        if r < 2 {
            return Err(Error::shape("t", format!("needs rank ≥ 2, got shape {:?}", self.shape())));
        }
        self.transpose(r - 2, r - 1)
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        Ok(Tensor { storage: self.storage.clone(), layout: self.layout.narrow(dim, start, len)? })
    }

    /// Mutates the elements in place as `T` (the tensor's own dtype). Storage shared with another tensor, or a
    /// view that is not the whole storage, is copied first, so nobody else observes the write. A CUDA tensor is
    /// downloaded, modified on the host and uploaded into fresh device storage (a round trip: fine for the odd
    /// edit, not for a hot loop, which wants a kernel).
    pub fn update<T: Element>(&mut self, f: impl FnOnce(&mut [T])) -> Result<()> {
        if T::DTYPE != self.dtype() {
            return Err(Error::DType { op: "update", expected: self.dtype(), got: T::DTYPE });
        }
        if self.cpu().is_none() {
            let mut v = self.try_to_vec::<T>()?;
            f(&mut v);
            *self = Tensor::from_vec(v, self.shape())?.to_device(self.device())?;
            return Ok(());
        }
        if !self.is_whole() {
            *self = self.contiguous_copy();
        }
        if Arc::get_mut(&mut self.storage).is_none() {
            self.storage = Arc::new(Storage::Cpu(self.host().clone()));
        }
        let Some(Storage::Cpu(s)) = Arc::get_mut(&mut self.storage) else {
            unreachable!("made unique on the CPU above")
        };
        f(T::slice_mut(s).expect("dtype checked above"));
        Ok(())
    }

    fn contiguous_copy(&self) -> Tensor {
        let s = self.host();
        let gathered = match s {
            CpuStorage::F64(v) => CpuStorage::F64(self.layout.storage_indices().map(|i| v[i]).collect()),
            CpuStorage::F32(v) => CpuStorage::F32(self.layout.storage_indices().map(|i| v[i]).collect()),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.layout.storage_indices().map(|i| v[i]).collect()),
            CpuStorage::F16(v) => CpuStorage::F16(self.layout.storage_indices().map(|i| v[i]).collect()),
            CpuStorage::I32(v) => CpuStorage::I32(self.layout.storage_indices().map(|i| v[i]).collect()),
            CpuStorage::U8(v) => CpuStorage::U8(self.layout.storage_indices().map(|i| v[i]).collect()),
        };
        Self::from_storage(gathered, self.shape()).expect("same element count")
    }

    /// Raw little-endian bytes of a contiguous copy (for writing files; a CUDA tensor is downloaded, and a failing
    /// device panics as in [`Tensor::values`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        if self.cpu().is_none() {
            let host =
                self.to_device(Device::Cpu).unwrap_or_else(|e| panic!("to_bytes of a {} tensor: {e}", self.device()));
            return host.to_bytes();
        }
        let c = if self.is_whole() { self.clone() } else { self.contiguous_copy() };
        c.host().as_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_share_storage_and_read_correctly() {
        let t = Tensor::from_vec((0..6).map(|x| x as f32).collect(), &[2, 3]).unwrap();
        let tt = t.t().unwrap();
        assert!(tt.shares_storage(&t));
        assert_eq!(tt.shape(), &[3, 2]);
        assert_eq!(tt.to_vec::<f32>(), vec![0., 3., 1., 4., 2., 5.]);
        let col = t.narrow(1, 2, 1).unwrap();
        assert_eq!(col.to_vec::<f32>(), vec![2., 5.]);
        let r = tt.reshape(&[6]).unwrap();
        assert!(!r.shares_storage(&t), "reshape of a transposed view must copy");
        assert_eq!(r.to_vec::<f32>(), vec![0., 3., 1., 4., 2., 5.]);
        assert!(t.reshape(&[3, 2]).unwrap().shares_storage(&t));
        assert!(t.reshape(&[4]).is_err());
    }

    #[test]
    fn update_is_copy_on_write() {
        let a = Tensor::from_vec(vec![1.0f32, 2.0], &[2]).unwrap();
        let mut b = a.clone();
        b.update::<f32>(|v| v[0] = 10.0).unwrap();
        assert_eq!(a.to_vec::<f32>(), vec![1.0, 2.0], "the saved copy is untouched");
        assert_eq!(b.to_vec::<f32>(), vec![10.0, 2.0]);
        assert!(b.update::<f64>(|_| ()).is_err());
        let mut view = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], &[3]).unwrap().narrow(0, 1, 2).unwrap();
        view.update::<f32>(|v| v[1] = 7.0).unwrap();
        assert_eq!(view.to_vec::<f32>(), vec![2.0, 7.0]);
    }

    #[test]
    fn dtype_conversion_and_errors() {
        let t = Tensor::from_vec(vec![1.5f32, -2.25], &[2]).unwrap();
        assert_eq!(t.to_dtype(DType::BF16).to_vec::<f32>(), vec![1.5, -2.25]);
        assert_eq!(t.to_dtype(DType::BF16).size_in_bytes(), 4);
        assert!(Tensor::from_vec(vec![1.0f32; 5], &[2, 3]).is_err());
        assert!(t.to_scalar::<f32>().is_err());
        if crate::cuda_device(0).is_err() {
            assert!(t.to_device(Device::Cuda(0)).is_err(), "no GPU: moving there is an error, not a panic");
        }
        assert_eq!(Tensor::zeros(&[2, 2], DType::I32).to_vec::<i32>(), vec![0; 4]);
    }
}
