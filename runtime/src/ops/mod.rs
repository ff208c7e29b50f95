//! Op dispatch: validate user-facing shapes and dtypes, pick the compute precision, call the kernel.
//!
//! One file per op (or per family of small ones): its shape checks, its forward and backward, and what a tape
//! records for it (an `*_op` function returning the output and a [`crate::op::Backward`] holding exactly what the
//! backward reads); `autograd` decides *when* a backward runs, these files know *how*. Each op first asks
//! `Gpu::of` (`crate::cuda`) whether its operands live on a GPU and, if so, runs its CUDA launcher there (see
//! `crate::cuda` for the precision rule); the CPU code below that branch is unchanged by the CUDA backend.
//!
//! The execution contract on a GPU: no op reads device memory back. Index tensors are checked on the host where
//! they are made (batches), scalars stay device tensors, and the few values a step needs on the host (its loss and
//! gradient norm) are read once per optimizer step by the caller.

pub mod activation;
pub mod attention;
pub mod concat;
pub mod cross_entropy;
pub mod dora;
pub mod elementwise;
pub mod embedding;
pub mod linalg;
pub mod linear_cross_entropy;
pub mod lora;
pub mod optim;
pub mod reduce;
pub mod rms_norm;
pub mod rope;

use crate::{DType, Device, Element, Error, Result, Tensor};
use qlora_kernels::Float;

/// The precisions CPU kernels run in.
pub trait Compute: Float + Element {}
impl Compute for f32 {}
impl Compute for f64 {}

/// The CPU's compute dtype for `xs` ([`DType::compute`]: f64 for gradient checks, f32 otherwise); errors on non-float
/// inputs, mixed devices, or a GPU operand (every op with a CUDA path dispatched before reaching here).
pub(crate) fn compute_dtype(op: &'static str, xs: &[&Tensor]) -> Result<DType> {
    for x in xs {
        if !x.dtype().is_float() {
            return Err(Error::DType { op, expected: DType::F32, got: x.dtype() });
        }
        if x.device() != xs[0].device() {
            return Err(Error::DeviceMismatch { op, a: xs[0].device(), b: x.device() });
        }
        if x.device() != Device::Cpu {
            return Err(Error::Unsupported { op, device: x.device(), why: "this op has no CUDA implementation" });
        }
    }
    Ok(DType::compute(Device::Cpu, xs.iter().map(|x| x.dtype())))
}

/// Runs `$body` with `T` bound to the compute type of the inputs, listed or (for an op with optional inputs) a slice.
macro_rules! with_compute {
    ($op:expr, [$($x:expr),+], |$t:ident| $body:expr) => {
        $crate::ops::with_compute!($op, &[$($x),+], |$t| $body)
    };
    ($op:expr, $xs:expr, |$t:ident| $body:expr) => {
        match $crate::ops::compute_dtype($op, $xs)? {
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

/// The device dispatch of an op that writes one fresh output, of shape `$shape`, from same-dtype tensor inputs: on a
/// GPU `$gpu` runs with each input bound to its device buffer, on the CPU `$cpu` with each bound to its values. Both
/// see the element type in play and the output to fill, under the names the caller gives them (`|T, out|`); scalars a
/// CUDA kernel takes as f32 the CPU twin takes as `T`. Written once so that each op states only its kernels.
macro_rules! dispatch {
    ($op:expr, [$($x:ident),+] -> $shape:expr, |$t:ident, $out:ident| gpu: $gpu:expr, cpu: $cpu:expr $(,)?) => {{
        let shape: &[usize] = $shape;
        let len: usize = shape.iter().product();
        if let Some(g) = $crate::cuda::Gpu::of($op, &[$($x),+])? {
            return $crate::cuda::with_gpu!(g, |$t| {
                $(let $x = g.input($x)?;)+
                $(let $x = $crate::cuda::buf::<$t>(&$x);)+
                let mut $out = g.alloc::<$t>(len)?;
                g.run($gpu)?;
                Ok($crate::cuda::output($out, shape))
            });
        }
        $crate::ops::with_compute!($op, [$($x),+], |$t| {
            $(let $x = $x.values::<$t>();)+
            let mut $out = vec![<$t>::default(); len];
            $cpu;
            Ok($crate::ops::tensor($out, shape))
        })
    }};
}
pub(crate) use dispatch;

pub(crate) fn tensor<T: Element>(v: Vec<T>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape).expect("kernel output sized from the shape")
}

pub(crate) fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::shape(op, format!("{:?} vs {:?}", a.shape(), b.shape())));
    }
    Ok(())
}

/// A host index tensor (token ids, targets, positions) as i32 values. Ops never read device indices back (the
/// execution contract above): a CUDA tensor here is an error.
pub(crate) fn indices<'a>(op: &'static str, what: &'static str, t: &'a Tensor) -> Result<std::borrow::Cow<'a, [i32]>> {
    if t.dtype() != DType::I32 {
        return Err(Error::invalid(op, format!("{what} must be I32, got {:?}", t.dtype())));
    }
    match t.device() {
        Device::Cpu => Ok(t.values::<i32>()),
        device => Err(Error::Unsupported { op, device, why: "these indices are read on the host: pass a CPU tensor" }),
    }
}

/// Splits a shape into (rows, last dimension), the layout row-wise kernels take.
pub(crate) fn rows_cols(op: &'static str, t: &Tensor) -> Result<(usize, usize)> {
    let Some(&cols) = t.shape().last() else {
        return Err(Error::shape(op, "expected rank ≥ 1, got a scalar"));
    };
    Ok((t.elem_count().checked_div(cols).unwrap_or(0), cols))
}
