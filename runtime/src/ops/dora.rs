//! DoRA's per-row and broadcast pieces as tensor ops (the adapter op itself, built from these and GEMMs, is
//! `autograd`'s): row norms of the adapted weight, the magnitude ratio, scaling by a vector along rows or columns,
//! and the combined output. No gradients of their own: DoRA's backward is written out in `autograd/src/lora/dora.rs`
//! (the norm is detached, as in peft).

use super::{dispatch, rows_cols, same_shape, tensor, with_compute};
use crate::cuda::{buf, output, with_gpu, Gpu};
use crate::{Error, Result, Tensor};
use qlora_kernels::cuda::dora as gdora;
use qlora_kernels::dora;
pub use qlora_kernels::dora::Axis;

/// t: [rows, cols] → \[rows\] of ‖t_i‖₂ (sums of squares in f64, one rounding).
pub fn row_norms(t: &Tensor) -> Result<Tensor> {
    let (rows, cols) = matrix("dora row_norms", t)?;
    dispatch!("dora row_norms", [t] -> &[rows], |T, out|
        gpu: gdora::row_norms(t, cols, &mut out),
        cpu: dora::row_norms(&t, cols, &mut out),
    )
}

/// a / b elementwise (same shapes): g = m / n.
pub fn ratio(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    same_shape("dora ratio", a, b)?;
    dispatch!("dora ratio", [a, b] -> a.shape(), |T, out|
        gpu: gdora::ratio(a, b, &mut out),
        cpu: dora::ratio(&a, &b, &mut out),
    )
}

/// t: [rows, cols] → t_ij·(c_k + offset), k the row index along [`Axis::Rows`] (c: \[rows\]) and the column index
/// along [`Axis::Cols`] (c: \[cols\]).
pub fn scale_by(t: &Tensor, c: &Tensor, offset: f64, axis: Axis) -> Result<Tensor> {
    let (rows, cols) = matrix("dora scale_by", t)?;
    let want = if axis == Axis::Rows { rows } else { cols };
    if c.shape() != [want] {
        return Err(Error::shape("dora scale_by", format!("{:?} along {axis:?} of {:?}", c.shape(), t.shape())));
    }
    dispatch!("dora scale_by", [t, c] -> t.shape(), |T, out|
        gpu: gdora::scale_by(t, cols, c, offset as f32, axis, &mut out),
        cpu: dora::scale_by(&t, cols, &c, offset as T, axis, &mut out),
    )
}

/// z, z_d, sv: [rows, cols], g: \[cols\] → y = z + (g − 1)⊙z_d + g⊙sv and, when `keep_h`, h = z_d + sv (= ∂y/∂g).
pub fn combine(z: &Tensor, zd: &Tensor, sv: &Tensor, g: &Tensor, keep_h: bool) -> Result<(Tensor, Option<Tensor>)> {
    let (_, cols) = matrix("dora combine", z)?;
    same_shape("dora combine", z, zd)?;
    same_shape("dora combine", z, sv)?;
    if g.shape() != [cols] {
        return Err(Error::shape("dora combine", format!("g {:?} for outputs {:?}", g.shape(), z.shape())));
    }
    if let Some(gpu) = Gpu::of("dora combine", &[z, zd, sv, g])? {
        return with_gpu!(gpu, |T| {
            let (zi, zdi, svi, gi) = (gpu.input(z)?, gpu.input(zd)?, gpu.input(sv)?, gpu.input(g)?);
            let n = z.elem_count();
            let mut y = gpu.alloc::<T>(n)?;
            let mut h = if keep_h { Some(gpu.alloc::<T>(n)?) } else { None };
            gpu.run(gdora::combine(buf::<T>(&zi), buf(&zdi), buf(&svi), buf(&gi), &mut y, h.as_mut()))?;
            Ok((output(y, z.shape()), h.map(|h| output(h, z.shape()))))
        });
    }
    with_compute!("dora combine", [z, zd, sv, g], |T| {
        let n = z.elem_count();
        let mut y = vec![T::default(); n];
        let mut h = keep_h.then(|| vec![T::default(); n]);
        let (zv, zdv, svv, gv) = (z.values::<T>(), zd.values::<T>(), sv.values::<T>(), g.values::<T>());
        dora::combine(&zv, &zdv, &svv, &gv, &mut y, h.as_deref_mut());
        Ok((tensor(y, z.shape()), h.map(|h| tensor(h, z.shape()))))
    })
}

/// (rows, cols) of a rank-2 tensor with columns.
fn matrix(op: &'static str, t: &Tensor) -> Result<(usize, usize)> {
    let (rows, cols) = rows_cols(op, t)?;
    if t.rank() != 2 || cols == 0 {
        return Err(Error::shape(op, format!("expected [rows, cols > 0], got {:?}", t.shape())));
    }
    Ok((rows, cols))
}
