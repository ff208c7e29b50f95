//! Reductions: sums for losses and bias gradients, squared norms for clipping, the max for checks.

use super::{dispatch, rows_cols, same_shape, with_compute};
use crate::cuda::{buf, buffer_mut, output, with_gpu, Gpu};
use crate::op::{backward_fn, first_grad, Recorded};
use crate::{DType, Error, Result, Tensor};
use qlora_kernels::cuda::reduce as greduce;
use qlora_kernels::reduce;

/// Σ x as a rank-0 tensor (f32 on CUDA whatever x's dtype: losses are reduced in f32; it stays on the device).
pub fn sum(x: &Tensor) -> Result<Tensor> {
    if let Some(g) = Gpu::of("sum", &[x])? {
        let mut out = g.alloc::<f32>(1)?;
        with_gpu!(g, |T| g.run(greduce::sum_into::<T>(buf(&g.input(x)?), &mut out, false)))?;
        return Ok(output(out, &[]));
    }
    with_compute!("sum", [x], |T| Ok(Tensor::scalar::<T>(reduce::sum(&x.values::<T>()))))
}

/// x: [..., n] → \[n\], summed over every leading dimension (bias gradients).
pub fn sum_rows(x: &Tensor) -> Result<Tensor> {
    let (_, cols) = rows_cols("sum_rows", x)?;
    dispatch!("sum_rows", [x] -> &[cols], |T, out|
        gpu: greduce::sum_rows(x, cols, &mut out),
        cpu: reduce::sum_rows(&x, cols, &mut out),
    )
}

/// acc += Σ x² on x's device, acc a one-element f32 tensor there: a global norm over many tensors built up without
/// reading anything back (on the CPU the sum runs in f64 and is rounded into acc once per tensor).
pub fn sum_squares_into(x: &Tensor, acc: &mut Tensor) -> Result<()> {
    if acc.elem_count() != 1 || acc.dtype() != DType::F32 {
        return Err(Error::shape(
            "sum_squares_into",
            format!("acc must be one f32, got {:?} {:?}", acc.shape(), acc.dtype()),
        ));
    }
    if let Some(g) = Gpu::of("sum_squares_into", &[x])? {
        let out = buffer_mut::<f32>("sum_squares_into", acc)?;
        return with_gpu!(g, |T| g.run(greduce::sum_squares_into::<T>(buf(&g.input(x)?), out, true)));
    }
    let add = sum_squares(x)?;
    acc.update::<f32>(|a| a[0] = (a[0] as f64 + add) as f32)
}

/// [`sum_squares_into`] of every tensor of `xs` in turn; where all are f32 on `acc`'s GPU, in two launches for all of
/// them (`sum_squares_multi`: the partials of each tensor then the total, added in one fixed order).
pub fn sum_squares_multi_into(xs: &[&Tensor], acc: &mut Tensor) -> Result<()> {
    const OP: &str = "sum_squares_multi_into";
    let on_gpu = matches!(acc.device(), crate::Device::Cuda(_))
        && acc.elem_count() == 1
        && acc.dtype() == DType::F32
        && xs.iter().all(|x| x.device() == acc.device() && x.dtype() == DType::F32);
    if !on_gpu {
        return xs.iter().try_for_each(|x| sum_squares_into(x, acc));
    }
    let g = Gpu::of(OP, &[&*acc])?.expect("checked: on a GPU");
    let whole: Vec<Tensor> = xs.iter().map(|x| g.input_as(x, DType::F32)).collect::<Result<_>>()?;
    let bufs: Vec<&qlora_kernels::cuda::DeviceBuffer<f32>> = whole.iter().map(buf::<f32>).collect();
    g.run(greduce::sum_squares_multi(&bufs, buffer_mut::<f32>(OP, acc)?, true))
}

/// Σ x², in f64 (global gradient norms).
pub fn sum_squares(x: &Tensor) -> Result<f64> {
    if let Some(g) = Gpu::of("sum_squares", &[x])? {
        return with_gpu!(g, |T| g.run(greduce::sum_squares::<T>(buf(&g.input(x)?))));
    }
    with_compute!("sum_squares", [x], |T| Ok(reduce::sum_squares(&x.values::<T>()) as f64))
}

/// max |x| (NaN if any element is NaN).
pub fn max_abs(x: &Tensor) -> Result<f64> {
    if let Some(g) = Gpu::of("max_abs", &[x])? {
        return with_gpu!(g, |T| g.run(greduce::max_abs::<T>(buf(&g.input(x)?))));
    }
    with_compute!("max_abs", [x], |T| Ok(reduce::max_abs(&x.values::<T>()) as f64))
}

/// x, y: [..., n] → \[n\] = Σ over every leading dimension of x⊙y, without the product as a tensor (each product
/// unrounded): DoRA's magnitude gradient.
pub fn sum_rows_product(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    same_shape("sum_rows_product", x, y)?;
    let (_, cols) = rows_cols("sum_rows_product", x)?;
    dispatch!("sum_rows_product", [x, y] -> &[cols], |T, out|
        gpu: greduce::sum_rows_product([x, y], cols, &mut out),
        cpu: reduce::sum_rows_product([&x, &y], cols, &mut out),
    )
}

/// [`sum`] for a tape: the backward spreads the scalar gradient over x's shape, on the device.
pub fn sum_op(x: &Tensor) -> Result<Recorded> {
    let (shape, dtype) = (x.shape().to_vec(), x.dtype());
    let grad = backward_fn("sum", 0, move |g| {
        Ok(vec![Some(super::elementwise::broadcast_scaled(first_grad(g)?, 1.0, &shape, dtype)?)])
    });
    Ok((sum(x)?, grad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_norm_over_many_tensors_adds_each_to_the_accumulator() {
        let t = |x: &[f32]| Tensor::from_slice(x, &[x.len()]).unwrap();
        let xs = [t(&[1.0, -2.0]), t(&[]), t(&[3.0])];
        let mut acc = Tensor::from_slice(&[0.5f32], &[]).unwrap();
        sum_squares_multi_into(&xs.iter().collect::<Vec<_>>(), &mut acc).unwrap();
        assert_eq!(acc.to_scalar::<f32>().unwrap(), 0.5 + 1.0 + 4.0 + 9.0);
    }
}
