//! RMSNorm over the last dimension: y = x·rstd·(offset + w), offset 0 for Llama and 1 for Gemma's (1 + w). Forward
//! returns rstd beside y so that backward reads it instead of recomputing the norm.

use super::linalg::matmul;
use super::{rows_cols, same_shape, tensor, with_compute};
use crate::cuda::{buf, output, with_gpu, Gpu};
use crate::op::{backward_fn, bytes, first_grad, Recorded};
use crate::{DType, Error, Result, Tensor};
use qlora_kernels::cuda::matmul as gmm;
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
            let (xb, wb) = (buf::<T>(&xi), buf(&w));
            g.run(grms::rms_norm_forward(xb, None, wb, dim, eps as f32, offset as f32, &mut y, &mut rstd))?;
            Ok((output(y, x.shape()), output(rstd, &[rows])))
        });
    }
    with_compute!("rms_norm", [x, weight], |T| {
        let (mut y, mut rstd) = (vec![T::default(); x.elem_count()], vec![T::default(); rows]);
        rms::rms_norm_forward(&x.values::<T>(), &weight.values::<T>(), dim, eps as T, offset as T, &mut y, &mut rstd);
        Ok((tensor(y, x.shape()), tensor(rstd, &[rows])))
    })
}

/// → (dx, dw) of [`rms_norm`]; or of [`add_rms_norm`] with x = h and `dh` what reached h from its other readers,
/// dx then being the gradient of both x and the residual: dh plus the norm's backward of `dy`.
pub fn rms_norm_backward(
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    dh: Option<&Tensor>,
    offset: f64,
    need_dw: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (_, dim) = backward_shapes("rms_norm_backward", x, weight, rstd, dy)?;
    if let Some(dh) = dh {
        same_shape("rms_norm_backward", x, dh)?;
    }
    let inputs: Vec<&Tensor> = [x, weight, rstd, dy].into_iter().chain(dh).collect();
    if let Some(g) = Gpu::of("rms_norm_backward", &inputs)? {
        return with_gpu!(g, |T| {
            let (xi, w, dyi) = (g.input(x)?, g.input(weight)?, g.input(dy)?);
            let dhi = dh.map(|dh| g.input(dh)).transpose()?;
            let r = g.input_as(rstd, DType::F32)?;
            let mut dx = g.alloc::<T>(x.elem_count())?;
            let mut dw = if need_dw { Some(g.alloc::<T>(dim)?) } else { None };
            let (xb, wb, rb, dyb, dhb) = (buf::<T>(&xi), buf(&w), buf(&r), buf(&dyi), dhi.as_ref().map(buf));
            g.run(grms::rms_norm_backward(xb, wb, rb, dyb, dhb, dim, offset as f32, &mut dx, dw.as_mut()))?;
            Ok((output(dx, x.shape()), dw.map(|dw| output(dw, &[dim]))))
        });
    }
    with_compute!("rms_norm_backward", &inputs, |T| {
        let (mut dx, mut dw) = (vec![T::default(); x.elem_count()], need_dw.then(|| vec![T::default(); dim]));
        let (xv, wv, rv, dyv) = (x.values::<T>(), weight.values::<T>(), rstd.values::<T>(), dy.values::<T>());
        let dhv = dh.map(|dh| dh.values::<T>());
        rms::rms_norm_backward(&xv, &wv, &rv, &dyv, dhv.as_deref(), dim, offset as T, &mut dx, dw.as_deref_mut());
        Ok((tensor(dx, x.shape()), dw.map(|dw| tensor(dw, &[dim]))))
    })
}

/// (rows, dim) of a norm's backward after checking its operands: x and dy alike, a weight of dim, an rstd per row.
fn backward_shapes(
    op: &'static str,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
) -> Result<(usize, usize)> {
    same_shape(op, x, dy)?;
    let (rows, dim) = rows_cols(op, x)?;
    if rstd.elem_count() != rows || weight.shape() != [dim] {
        return Err(Error::shape(
            op,
            format!("x {:?} with weight {:?} and rstd {:?}", x.shape(), weight.shape(), rstd.shape()),
        ));
    }
    Ok((rows, dim))
}

/// [`rms_norm`] for a tape: y, and a backward for the inputs `needs` marks (x, weight), reading x, the weight and
/// rstd (the weight is a parameter, alive anyway: not counted as saved).
pub fn rms_norm_op(x: &Tensor, w: &Tensor, eps: f64, offset: f64, needs: [bool; 2]) -> Result<Recorded> {
    let (y, rstd) = rms_norm(x, w, eps, offset)?;
    let (x, w) = (x.clone(), w.clone());
    let grad = backward_fn("rms_norm", bytes([&x, &rstd]), move |g| {
        let (dx, dw) = rms_norm_backward(&x, &w, &rstd, first_grad(g)?, None, offset, needs[1])?;
        Ok(vec![needs[0].then_some(dx), dw])
    });
    Ok((y, grad))
}

/// x, residual: [..., dim], weight: \[dim\] → (h = x + residual, y = rms_norm(h), rstd): the residual stream's add
/// fused with the norm that reads it, one pass over the rows instead of two (h is rounded to its dtype before it is
/// normalized, as the unfused pair stores it).
pub fn add_rms_norm(x: &Tensor, residual: &Tensor, weight: &Tensor, eps: f64, offset: f64) -> Result<[Tensor; 3]> {
    same_shape("add_rms_norm", x, residual)?;
    let (rows, dim) = rows_cols("add_rms_norm", x)?;
    if weight.shape() != [dim] {
        return Err(Error::shape("add_rms_norm", format!("weight {:?} for input {:?}", weight.shape(), x.shape())));
    }
    if let Some(g) = Gpu::of("add_rms_norm", &[x, residual, weight])? {
        return with_gpu!(g, |T| {
            let (xi, ri, w) = (g.input(x)?, g.input(residual)?, g.input(weight)?);
            let n = x.elem_count();
            let (mut h, mut y, mut rstd) = (g.alloc::<T>(n)?, g.alloc::<T>(n)?, g.alloc::<f32>(rows)?);
            let (xb, rb, wb) = (buf::<T>(&xi), buf(&ri), buf(&w));
            let add = Some((rb, &mut h));
            g.run(grms::rms_norm_forward(xb, add, wb, dim, eps as f32, offset as f32, &mut y, &mut rstd))?;
            Ok([output(h, x.shape()), output(y, x.shape()), output(rstd, &[rows])])
        });
    }
    with_compute!("add_rms_norm", [x, residual, weight], |T| {
        let n = x.elem_count();
        let (mut h, mut y, mut rstd) = (vec![T::default(); n], vec![T::default(); n], vec![T::default(); rows]);
        let (xv, rv, wv) = (x.values::<T>(), residual.values::<T>(), weight.values::<T>());
        rms::add_rms_norm_forward(&xv, &rv, &wv, dim, eps as T, offset as T, &mut h, &mut y, &mut rstd);
        Ok([tensor(h, x.shape()), tensor(y, x.shape()), tensor(rstd, &[rows])])
    })
}

/// The norm before a LoRA group and the group's U: x (\[rows, dim\]) plus `residual` normed by `weight`
/// ([`add_rms_norm`]; [`rms_norm`] without a residual), then the normed rows times aᵀ (a: \[n, dim\]). Returns
/// (h, y, y·aᵀ): h = x + residual (x itself without one), y the norm's output, the product \[rows, n\]; the values
/// of the norm then [`matmul`] bit for bit. On a GPU, for a decoding step's few rows (the adapters' U after a layer's
/// norms; every operand in one dtype), one launch forms all three.
pub fn rms_norm_matmul_t(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    (eps, offset): (f64, f64),
    a: &Tensor,
) -> Result<[Tensor; 3]> {
    const OP: &str = "rms_norm_matmul_t";
    let (rows, dim) = rows_cols(OP, x)?;
    if let Some(r) = residual {
        same_shape(OP, x, r)?;
    }
    let &[n, a_dim] = a.shape() else {
        return Err(Error::shape(OP, format!("a {:?} must be a matrix", a.shape())));
    };
    if weight.shape() != [dim] || a_dim != dim {
        let shapes = format!("x {:?}, weight {:?}, a {:?}", x.shape(), weight.shape(), a.shape());
        return Err(Error::shape(OP, shapes));
    }
    let operands: Vec<&Tensor> = [x, weight, a].into_iter().chain(residual).collect();
    if let Some(g) = Gpu::of(OP, &operands)? {
        let one_dtype = operands.iter().all(|t| t.dtype() == x.dtype());
        if one_dtype && gmm::takes_norm_few_rows(rows, n, dim) {
            let fused = with_gpu!(g, |T| {
                let (xi, w, ai) = (g.input(x)?, g.input(weight)?, g.input(a)?);
                let ri = residual.map(|r| g.input(r)).transpose()?;
                let mut h = residual.map(|_| g.alloc::<T>(rows * dim)).transpose()?;
                let (mut y, mut u) = (g.alloc::<T>(rows * dim)?, g.alloc::<T>(rows * n)?);
                let add = ri.as_ref().map(buf::<T>).zip(h.as_mut());
                let (xb, wb, ab) = (buf::<T>(&xi), buf(&w), buf(&ai));
                let norm = (eps as f32, offset as f32);
                let done = g.run(gmm::norm_few_rows(xb, add, wb, norm, ab, &mut y, &mut u, (rows, n, dim)))?;
                done.then(|| {
                    let h = h.map_or_else(|| x.clone(), |h| output(h, x.shape()));
                    [h, output(y, x.shape()), output(u, &[rows, n])]
                })
            });
            if let Some(all) = fused {
                return Ok(all);
            }
        }
    }
    let (h, y) = match residual {
        Some(r) => {
            let [h, y, _] = add_rms_norm(x, r, weight, eps, offset)?;
            (h, y)
        }
        None => (x.clone(), rms_norm(x, weight, eps, offset)?.0),
    };
    let product = matmul(&y, &a.t()?)?;
    Ok([h, y, product])
}

/// [`add_rms_norm`] for a tape: (h, y), and a backward for x, the residual (both get dx) and the weight as `needs`
/// marks them, reading h, the weight and rstd. Either output may go without a gradient.
pub fn add_rms_norm_op(
    x: &Tensor,
    residual: &Tensor,
    w: &Tensor,
    eps: f64,
    offset: f64,
    needs: [bool; 3],
) -> Result<(Vec<Tensor>, Box<dyn crate::op::Backward>)> {
    let [h, y, rstd] = add_rms_norm(x, residual, w, eps, offset)?;
    let (saved_h, w) = (h.clone(), w.clone());
    let grad = backward_fn("add_rms_norm", bytes([&saved_h, &rstd]), move |g| {
        let (dx, dw) = match (&g[0], &g[1]) {
            (dh, Some(dy)) => rms_norm_backward(&saved_h, &w, &rstd, dy, dh.as_ref(), offset, needs[2])?,
            (Some(dh), None) => (dh.clone(), None),
            (None, None) => return Ok(vec![None, None, None]),
        };
        Ok(vec![needs[0].then(|| dx.clone()), needs[1].then_some(dx), dw])
    });
    Ok((vec![h, y], grad))
}
