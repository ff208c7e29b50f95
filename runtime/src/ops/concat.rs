//! Joining row blocks and cutting them apart: parts computed chunk by chunk (the fused loss's dx, a layer's MLP run a
//! block of tokens at a time) laid end to end, with the tape ops of both directions.

use crate::cuda::{buf, output, with_gpu, Gpu};
use crate::op::{backward_fn, first_grad, Backward, Recorded};
use crate::{DType, Device, Error, Result, Tensor};

/// `parts` (each [rows_i, cols...], in `dtype` on `device`) stacked along the first dimension into `shape`, whose
/// element count they must fill exactly.
pub fn cat_rows(parts: &[Tensor], shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
    let total: usize = shape.iter().product();
    let have: usize = parts.iter().map(Tensor::elem_count).sum();
    if have != total || parts.iter().any(|p| p.dtype() != dtype || p.device() != device) {
        return Err(Error::shape(
            "cat_rows",
            format!("{} parts of {have} elements for {shape:?} {dtype:?}", parts.len()),
        ));
    }
    let Some(first) = parts.first() else { return Tensor::zeros_on(shape, dtype, device) };
    if let Some(g) = Gpu::of("cat_rows", &[first])? {
        return with_gpu!(g, |T| {
            let mut out = g.alloc::<T>(total)?;
            let mut at = 0;
            for p in parts {
                let p = g.input(p)?;
                g.run(out.copy_from_at(at, buf::<T>(&p)))?;
                at += p.elem_count();
            }
            Ok(output(out, shape))
        });
    }
    let mut values = Vec::with_capacity(total);
    for p in parts {
        values.extend(p.to_vec::<f64>());
    }
    Ok(Tensor::from_vec(values, shape)?.to_dtype(dtype))
}

/// x: [rows, ...] cut into blocks of `chunk` rows (the last one shorter): views of x, no copy.
pub fn split_rows(x: &Tensor, chunk: usize) -> Result<Vec<Tensor>> {
    let rows = *x.shape().first().ok_or_else(|| Error::shape("split_rows", "a scalar has no rows"))?;
    if chunk == 0 {
        return Err(Error::invalid("split_rows", "chunks of 0 rows"));
    }
    (0..rows).step_by(chunk).map(|start| x.narrow(0, start, chunk.min(rows - start))).collect()
}

/// [`split_rows`] for a tape: the blocks, and a backward joining their gradients into x's (zeros for a block that got
/// none). Saves nothing but shapes.
pub fn split_rows_op(x: &Tensor, chunk: usize) -> Result<(Vec<Tensor>, Box<dyn Backward>)> {
    let parts = split_rows(x, chunk)?;
    let shapes: Vec<Vec<usize>> = parts.iter().map(|p| p.shape().to_vec()).collect();
    let (shape, dtype, device) = (x.shape().to_vec(), x.dtype(), x.device());
    let grad = backward_fn("split_rows", 0, move |g| {
        let grads = g
            .iter()
            .zip(&shapes)
            .map(|(g, s)| g.clone().map_or_else(|| Tensor::zeros_on(s, dtype, device), |g| g.try_to_dtype(dtype)))
            .collect::<Result<Vec<_>>>()?;
        Ok(vec![Some(cat_rows(&grads, &shape, dtype, device)?)])
    });
    Ok((parts, grad))
}

/// [`cat_rows`] of same-dtype parts on one device for a tape: the parts joined, and a backward handing each part its
/// row block of the gradient (views). Saves nothing but row counts.
pub fn cat_rows_op(parts: &[Tensor]) -> Result<Recorded> {
    let first = parts.first().ok_or_else(|| Error::invalid("cat_rows", "no parts"))?;
    let mut shape = first.shape().to_vec();
    if shape.is_empty() || parts.iter().any(|p| p.rank() != shape.len() || p.shape()[1..] != shape[1..]) {
        let shapes: Vec<&[usize]> = parts.iter().map(Tensor::shape).collect();
        return Err(Error::shape("cat_rows", format!("parts of shapes {shapes:?}")));
    }
    let rows: Vec<usize> = parts.iter().map(|p| p.shape()[0]).collect();
    shape[0] = rows.iter().sum();
    let y = cat_rows(parts, &shape, first.dtype(), first.device())?;
    let grad = backward_fn("cat_rows", 0, move |g| {
        let g = first_grad(g)?;
        let mut start = 0;
        rows.iter()
            .map(|&n| {
                let part = g.narrow(0, start, n);
                start += n;
                part.map(Some)
            })
            .collect()
    });
    Ok((y, grad))
}
