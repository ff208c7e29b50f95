//! Op dispatch: validate user-facing shapes and dtypes, pick the compute precision, call the kernel.
//!
//! Every op has its backward beside it (as a plain function): `autograd` decides *when* to call them, this
//! module only knows *how*. Each op first asks [`crate::cuda::Gpu::of`] whether its operands live on a GPU and, if
//! so, runs its CUDA launcher there (see `crate::cuda` for the precision rule); the CPU code below that branch is
//! unchanged by the CUDA backend.

pub mod elementwise;
pub mod linalg;
pub mod nn;
pub mod optim;
pub mod stack;

use crate::{DType, Device, Element, Error, Result, Tensor};
use qlora_kernels::Float;

/// The precisions CPU kernels run in.
pub trait Compute: Float + Element {}
impl Compute for f32 {}
impl Compute for f64 {}

/// f64 when any input is f64 (gradient checks), f32 otherwise; errors on non-float inputs or mixed devices.
pub(crate) fn compute_dtype(op: &'static str, xs: &[&Tensor]) -> Result<DType> {
    let mut dtype = DType::F32;
    for x in xs {
        if !x.dtype().is_float() {
            return Err(Error::DType { op, expected: DType::F32, got: x.dtype() });
        }
        if x.device() != xs[0].device() {
            return Err(Error::DeviceMismatch { op, a: xs[0].device(), b: x.device() });
        }
        if x.device() != Device::Cpu {
            // Ops with a CUDA path dispatched before reaching here: this one runs on the CPU only.
            return Err(Error::Unsupported { op, device: x.device(), why: "this op has no CUDA implementation" });
        }
        if x.dtype() == DType::F64 {
            dtype = DType::F64;
        }
    }
    Ok(dtype)
}

/// Runs `$body` with `T` bound to the compute type of `$xs`.
macro_rules! with_compute {
    ($op:expr, [$($x:expr),+], |$t:ident| $body:expr) => {
        match $crate::ops::compute_dtype($op, &[$($x),+])? {
            $crate::DType::F64 => {
                type $t = f64;
                $body
            }
            _ => {
                type $t = f32;
                $body
            }
        }
    };
}
pub(crate) use with_compute;

pub(crate) fn tensor<T: Element>(v: Vec<T>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape).expect("kernel output sized from the shape")
}

pub(crate) fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::shape(op, format!("{:?} vs {:?}", a.shape(), b.shape())));
    }
    Ok(())
}

/// An index tensor (token ids, targets, positions, cu_seqlens) as i32 values.
pub(crate) fn indices<'a>(op: &'static str, what: &'static str, t: &'a Tensor) -> Result<std::borrow::Cow<'a, [i32]>> {
    if t.dtype() != DType::I32 {
        return Err(Error::invalid(op, format!("{what} must be I32, got {:?}", t.dtype())));
    }
    match t.device() {
        Device::Cpu => Ok(t.values::<i32>()),
        // Validation reads the indices on the host: a small download of ids, targets or boundaries.
        Device::Cuda(_) => Ok(std::borrow::Cow::Owned(t.try_to_vec::<i32>()?)),
    }
}

/// Splits a shape into (rows, last dimension), the layout row-wise kernels take.
pub(crate) fn rows_cols(op: &'static str, t: &Tensor) -> Result<(usize, usize)> {
    let Some(&cols) = t.shape().last() else {
        return Err(Error::shape(op, "expected rank ≥ 1, got a scalar"));
    };
    Ok((t.elem_count().checked_div(cols).unwrap_or(0), cols))
}
