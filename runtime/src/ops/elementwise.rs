//! Elementwise ops: sums, products, scaling, dropout, accumulation into a buffer, bias, scalar broadcast.

use super::{dispatch, rows_cols, same_shape, tensor, with_compute};
use crate::cuda::{buf, buffer_mut, output, with_gpu, Gpu};
use crate::op::{backward_fn, bytes_of, first_grad, keep_if, Recorded};
use crate::{DType, Error, Result, Tensor};
use qlora_kernels::cuda::elementwise as gew;
use qlora_kernels::elementwise as ew;

/// a + b (same shapes).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(Binary::Add, a, b)
}

/// a ⊙ b (same shapes).
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(Binary::Mul, a, b)
}

/// The two element-wise products of same-shaped tensors, each with its CPU and CUDA kernel.
#[derive(Clone, Copy)]
enum Binary {
    Add,
    Mul,
}

fn binary(op: Binary, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let name = match op {
        Binary::Add => "add",
        Binary::Mul => "mul",
    };
    same_shape(name, a, b)?;
    dispatch!(name, [a, b] -> a.shape(), |T, out|
        gpu: match op {
            Binary::Add => gew::add::<T>(a, b, &mut out),
            Binary::Mul => gew::mul::<T>(a, b, &mut out),
        },
        cpu: match op {
            Binary::Add => ew::add::<T>(&a, &b, &mut out),
            Binary::Mul => ew::mul::<T>(&a, &b, &mut out),
        },
    )
}

/// s·x.
pub fn scale(x: &Tensor, s: f64) -> Result<Tensor> {
    dispatch!("scale", [x] -> x.shape(), |T, out|
        gpu: gew::scale(x, s as f32, &mut out),
        cpu: ew::scale(&x, s as T, &mut out),
    )
}

/// Inverted dropout: element i (row-major) is zeroed when the i-th draw of `Rng::new(seed).uniform()` is < p and
/// scaled by 1/(1 − p) otherwise. The mask depends only on (seed, i), the same on every device and on every call.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid("dropout", format!("p must be in [0, 1), got {p}")));
    }
    dispatch!("dropout", [x] -> x.shape(), |T, out|
        gpu: gew::dropout(x, p, seed, (1.0 / (1.0 - p)) as f32, &mut out),
        cpu: ew::dropout(&x, p, seed, (1.0 / (1.0 - p)) as T, &mut out),
    )
}

/// y += alpha·x in place, keeping y's dtype (gradient accumulation into an existing buffer).
pub fn accumulate(y: &mut Tensor, alpha: f64, x: &Tensor) -> Result<()> {
    same_shape("accumulate", y, x)?;
    if let Some(g) = Gpu::of("accumulate", &[&*y, x])? {
        // x is cast to the accumulator's dtype; a bf16 accumulator adds in f32 inside the kernel and rounds once.
        let x = g.input_as(x, y.dtype())?;
        return match y.dtype() {
            DType::BF16 => g.run(gew::axpy(alpha as f32, buf(&x), buffer_mut::<half::bf16>("accumulate", y)?)),
            _ => g.run(gew::axpy(alpha as f32, buf(&x), buffer_mut::<f32>("accumulate", y)?)),
        };
    }
    with_compute!("accumulate", [&*y, x], |T| {
        if y.dtype() == <T as crate::Element>::DTYPE {
            let xv = x.values::<T>();
            y.update::<T>(|yv| ew::axpy(alpha as T, &xv, yv))
        } else {
            // A low-precision accumulator: sum in the compute type, round once.
            let mut acc = y.to_vec::<T>();
            ew::axpy(alpha as T, &x.values::<T>(), &mut acc);
            *y = tensor(acc, y.shape()).to_dtype(y.dtype());
            Ok(())
        }
    })
}

/// x: [..., n] + bias: \[n\] broadcast over the leading dimensions.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, cols) = rows_cols("add_bias", x)?;
    if bias.shape() != [cols] {
        return Err(Error::shape("add_bias", format!("bias {:?} for input {:?}", bias.shape(), x.shape())));
    }
    if let Some(g) = Gpu::of("add_bias", &[x, bias])? {
        return with_gpu!(g, |T| {
            let (mut out, bias) = (g.input(x)?, g.input(bias)?);
            g.run(gew::add_bias(buffer_mut::<T>("add_bias", &mut out)?, buf(&bias)))?;
            Ok(out)
        });
    }
    with_compute!("add_bias", [x, bias], |T| {
        let mut out = x.to_vec::<T>();
        ew::add_bias(&mut out, &bias.values::<T>());
        Ok(tensor(out, x.shape()))
    })
}

/// s: a one-element tensor → `shape` filled with scale·s in `dtype`, on s's device and never read by the host (a
/// scalar loss's gradient spread over a tensor). f32 on CUDA may be asked as bf16: the product is rounded once.
pub fn broadcast_scaled(s: &Tensor, scale: f64, shape: &[usize], dtype: DType) -> Result<Tensor> {
    if s.elem_count() != 1 {
        return Err(Error::shape("broadcast_scaled", format!("a one-element tensor, got {:?}", s.shape())));
    }
    if let Some(g) = Gpu::of("broadcast_scaled", &[s])? {
        let sv = g.input_as(s, DType::F32)?;
        let n = shape.iter().product();
        return match dtype {
            DType::BF16 => {
                let mut out = g.alloc::<half::bf16>(n)?;
                g.run(gew::broadcast_scaled(buf(&sv), scale as f32, &mut out))?;
                Ok(output(out, shape))
            }
            DType::F32 => {
                let mut out = g.alloc::<f32>(n)?;
                g.run(gew::broadcast_scaled(buf(&sv), scale as f32, &mut out))?;
                Ok(output(out, shape))
            }
            other => Err(Error::DType { op: "broadcast_scaled", expected: DType::F32, got: other }),
        };
    }
    with_compute!("broadcast_scaled", [s], |T| {
        let mut out = vec![T::default(); shape.iter().product()];
        ew::broadcast_scaled(s.values::<T>()[0], scale as T, &mut out);
        Ok(tensor(out, shape).to_dtype(dtype))
    })
}

/// [`add`] for a tape: the gradient passes to both.
pub fn add_op(a: &Tensor, b: &Tensor) -> Result<Recorded> {
    let grad = backward_fn("add", 0, |g| {
        let g = first_grad(g)?;
        Ok(vec![Some(g.clone()), Some(g.clone())])
    });
    Ok((add(a, b)?, grad))
}

/// [`mul`] for a tape; `needs` marks which inputs want a gradient. Each gradient needs the other input, kept only
/// when that gradient is wanted.
pub fn mul_op(a: &Tensor, b: &Tensor, needs: [bool; 2]) -> Result<Recorded> {
    let y = mul(a, b)?;
    let (a, b) = (keep_if(needs[1], a), keep_if(needs[0], b));
    let grad = backward_fn("mul", bytes_of([&a, &b]), move |g| {
        let g = first_grad(g)?;
        let da = b.as_ref().map(|b| mul(g, b)).transpose()?;
        let db = a.as_ref().map(|a| mul(g, a)).transpose()?;
        Ok(vec![da, db])
    });
    Ok((y, grad))
}

/// [`scale`] for a tape.
pub fn scale_op(x: &Tensor, s: f64) -> Result<Recorded> {
    Ok((scale(x, s)?, backward_fn("scale", 0, move |g| Ok(vec![Some(scale(first_grad(g)?, s)?)]))))
}

/// A view of x with another shape, for a tape: the gradient is reshaped back.
pub fn reshape_op(x: &Tensor, shape: &[usize]) -> Result<Recorded> {
    let x_shape = x.shape().to_vec();
    Ok((x.reshape(shape)?, backward_fn("reshape", 0, move |g| Ok(vec![Some(first_grad(g)?.reshape(&x_shape)?)]))))
}
