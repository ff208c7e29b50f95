//! RMSNorm over the last dimension: y = x·rstd·(offset + w), offset 0 for Llama and 1 for Gemma's (1 + w). Forward
//! returns rstd beside y so that backward reads it instead of recomputing the norm.

use super::{rows_cols, same_shape, tensor, with_compute};
use crate::cuda::{buf, output, with_gpu, Gpu};
use crate::op::{backward_fn, bytes, first_grad, Recorded};
use crate::{DType, Error, Result, Tensor};
use qlora_kernels::cuda::rms_norm as grms;
use qlora_kernels::rms_norm as rms;

/// x: [..., dim], weight: \[dim\] → (y: [..., dim], rstd: \[rows\]); y = x·rstd·(offset + w).
/// offset 0 is Llama's RMSNorm, 1 is Gemma's (1 + w). On CUDA rstd is f32 whatever x's dtype.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, offset: f64) -> Result<(Tensor, Tensor)> {
    let (rows, dim) = rows_cols("rms_norm", x)?;
    if weight.shape() != [dim] {
        return Err(Error::shape("rms_norm", format!("weight {:?} for input {:?}", weight.shape(), x.shape())));
    }
    if let Some(g) = Gpu::of("rms_norm", &[x, weight])? {
        return with_gpu!(g, |T| {
            let (xi, w) = (g.input(x)?, g.input(weight)?);
            let (mut y, mut rstd) = (g.alloc::<T>(x.elem_count())?, g.alloc::<f32>(rows)?);
            g.run(grms::rms_norm_forward(buf::<T>(&xi), buf(&w), dim, eps as f32, offset as f32, &mut y, &mut rstd))?;
            Ok((output(y, x.shape()), output(rstd, &[rows])))
        });
    }
    with_compute!("rms_norm", [x, weight], |T| {
        let (mut y, mut rstd) = (vec![T::default(); x.elem_count()], vec![T::default(); rows]);
        rms::rms_norm_forward(&x.values::<T>(), &weight.values::<T>(), dim, eps as T, offset as T, &mut y, &mut rstd);
        Ok((tensor(y, x.shape()), tensor(rstd, &[rows])))
    })
}

/// → (dx, dw) of [`rms_norm`].
pub fn rms_norm_backward(
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    offset: f64,
    need_dw: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    same_shape("rms_norm_backward", x, dy)?;
    let (rows, dim) = rows_cols("rms_norm_backward", x)?;
    if rstd.elem_count() != rows || weight.shape() != [dim] {
        return Err(Error::shape(
            "rms_norm_backward",
            format!("x {:?} with weight {:?} and rstd {:?}", x.shape(), weight.shape(), rstd.shape()),
        ));
    }
    if let Some(g) = Gpu::of("rms_norm_backward", &[x, weight, rstd, dy])? {
        return with_gpu!(g, |T| {
            let (xi, w, dyi) = (g.input(x)?, g.input(weight)?, g.input(dy)?);
            let r = g.input_as(rstd, DType::F32)?;
            let mut dx = g.alloc::<T>(x.elem_count())?;
            let mut dw = if need_dw { Some(g.alloc::<T>(dim)?) } else { None };
            let (xb, wb, rb, dyb) = (buf::<T>(&xi), buf(&w), buf(&r), buf(&dyi));
            g.run(grms::rms_norm_backward(xb, wb, rb, dyb, dim, offset as f32, &mut dx, dw.as_mut()))?;
            Ok((output(dx, x.shape()), dw.map(|dw| output(dw, &[dim]))))
        });
    }
    with_compute!("rms_norm_backward", [x, weight, rstd, dy], |T| {
        let (mut dx, mut dw) = (vec![T::default(); x.elem_count()], need_dw.then(|| vec![T::default(); dim]));
        let (xv, wv, rv, dyv) = (x.values::<T>(), weight.values::<T>(), rstd.values::<T>(), dy.values::<T>());
        rms::rms_norm_backward(&xv, &wv, &rv, &dyv, dim, offset as T, &mut dx, dw.as_deref_mut());
        Ok((tensor(dx, x.shape()), dw.map(|dw| tensor(dw, &[dim]))))
    })
}

/// [`rms_norm`] for a tape: y, and a backward for the inputs `needs` marks (x, weight), reading x, the weight and
/// rstd (the weight is a parameter, alive anyway: not counted as saved).
pub fn rms_norm_op(x: &Tensor, w: &Tensor, eps: f64, offset: f64, needs: [bool; 2]) -> Result<Recorded> {
    let (y, rstd) = rms_norm(x, w, eps, offset)?;
    let (x, w) = (x.clone(), w.clone());
    let grad = backward_fn("rms_norm", bytes([&x, &rstd]), move |g| {
        let (dx, dw) = rms_norm_backward(&x, &w, &rstd, first_grad(g)?, offset, needs[1])?;
        Ok(vec![needs[0].then_some(dx), dw])
    });
    Ok((y, grad))
}
