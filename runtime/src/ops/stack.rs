//! Stacking tensors along their first dimension, cast on the way: what turns a LoRA group's adapter matrices
//! (A_q, A_k, A_v: [rᵢ, in] each, f32 masters) into the one [Σ rᵢ, in] operand of its shared GEMM, in one pass.

use super::tensor;
use crate::cuda::{buf, contiguous, cuda_device, output, GpuElement};
use crate::{DType, Device, Element, Error, Result, Tensor};
use half::{bf16, f16};
use qlora_kernels::cuda::{copy, DeviceBuffer};

const OP: &str = "stack_rows";

/// parts: [rᵢ, d...] each (the same d...) → [Σ rᵢ, d...] in `dtype`, each value converted once (rounded to nearest
/// even when narrowing). On CUDA between f32 and bf16, every part on the same device.
pub fn stack_rows(parts: &[&Tensor], dtype: DType) -> Result<Tensor> {
    let Some(first) = parts.first() else {
        return Err(Error::invalid(OP, "nothing to stack"));
    };
    if first.rank() == 0 {
        return Err(Error::shape(OP, "a scalar has no rows"));
    }
    let tail = &first.shape()[1..];
    for p in parts {
        if p.rank() == 0 || p.shape()[1..] != *tail {
            return Err(Error::shape(OP, format!("{:?} beside {:?}", p.shape(), first.shape())));
        }
        if p.device() != first.device() {
            return Err(Error::DeviceMismatch { op: OP, a: first.device(), b: p.device() });
        }
    }
    let mut shape = first.shape().to_vec();
    shape[0] = parts.iter().map(|p| p.shape()[0]).sum();
    match (first.device(), dtype) {
        (Device::Cpu, DType::F64) => Ok(cpu::<f64>(parts, &shape)),
        (Device::Cpu, DType::F32) => Ok(cpu::<f32>(parts, &shape)),
        (Device::Cpu, DType::BF16) => Ok(cpu::<bf16>(parts, &shape)),
        (Device::Cpu, DType::F16) => Ok(cpu::<f16>(parts, &shape)),
        (Device::Cuda(n), DType::F32) => gpu::<f32>(n, parts, &shape),
        (Device::Cuda(n), DType::BF16) => gpu::<bf16>(n, parts, &shape),
        (device, _) => {
            Err(Error::Unsupported { op: OP, device, why: "stacks into float dtypes (f32 or bf16 on CUDA)" })
        }
    }
}

fn cpu<T: Element>(parts: &[&Tensor], shape: &[usize]) -> Tensor {
    let mut out = Vec::with_capacity(shape.iter().product());
    for p in parts {
        out.extend_from_slice(&p.values::<T>());
    }
    tensor(out, shape)
}

fn gpu<D: GpuElement>(ordinal: usize, parts: &[&Tensor], shape: &[usize]) -> Result<Tensor> {
    let mut out: DeviceBuffer<D> = cuda_device(ordinal)?.alloc(shape.iter().product()).map_err(Error::cuda(OP))?;
    let mut at = 0;
    for p in parts {
        let p = contiguous(p)?;
        match p.dtype() {
            DType::F32 => copy::cast_into(buf::<f32>(&p), &mut out, at),
            DType::BF16 => copy::cast_into(buf::<bf16>(&p), &mut out, at),
            other => return Err(Error::DType { op: OP, expected: DType::F32, got: other }),
        }
        .map_err(Error::cuda(OP))?;
        at += p.elem_count();
    }
    Ok(output(out, shape))
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlora_kernels::Rng;

    #[test]
    fn stacks_rows_converting_each_value_once() {
        let mut rng = Rng::new(3);
        let a = Tensor::randn(&[3, 5], 1.0, DType::F32, &mut rng);
        let b = Tensor::randn(&[1, 5], 1.0, DType::F64, &mut rng);
        let c = Tensor::randn(&[5, 4], 1.0, DType::F32, &mut rng).t().unwrap();
        let s = stack_rows(&[&a, &b, &c], DType::BF16).unwrap();
        assert_eq!((s.shape(), s.dtype()), (&[8, 5][..], DType::BF16));
        let want: Vec<f32> = [a.to_vec::<f64>(), b.to_vec::<f64>(), c.to_vec::<f64>()]
            .concat()
            .iter()
            .map(|&v| bf16::from_f64(v).to_f32())
            .collect();
        assert_eq!(s.to_vec::<f32>(), want);
        assert_eq!(stack_rows(&[&a], DType::F32).unwrap().to_vec::<f32>(), a.to_vec::<f32>());
        let e = stack_rows(&[&a, &Tensor::zeros(&[2, 4], DType::F32)], DType::F32).unwrap_err().to_string();
        assert!(e.contains("[2, 4]") && e.contains("[3, 5]"), "{e}");
        assert!(stack_rows(&[], DType::F32).is_err());
    }
}
