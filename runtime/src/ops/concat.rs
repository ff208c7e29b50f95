//! Joining row blocks and cutting them apart: parts computed chunk by chunk (the fused loss's dx, a layer's MLP run a
//! block of tokens at a time) laid end to end, with the tape ops of both directions; and rows written in place into a
//! buffer with spare rows (a KV cache growing by a token).

use crate::cuda::{buf, buffer_mut, output, with_gpu, Gpu};
use crate::op::{backward_fn, first_grad, Backward, Recorded};
use crate::storage::CudaElement;
use crate::{DType, Device, Element, Error, Result, Tensor};
use qlora_kernels::cuda::DeviceBuffer;

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
                copy_rows_at(&g, &mut out, at, p)?;
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

/// dst: [rows, cols...] ← src: [n, cols...] at rows `at..at + n`, in place, same dtype and device: how a buffer with
/// spare rows (a KV cache) grows without copying the rows it already holds. Storage dst shares with another tensor
/// is copied first, so nobody else observes the write (the rule of [`Tensor::update`]).
pub fn write_rows(dst: &mut Tensor, at: usize, src: &Tensor) -> Result<()> {
    let (rows, n) = (dst.shape().first().copied(), src.shape().first().copied());
    let fits = matches!((rows, n), (Some(rows), Some(n)) if at + n <= rows);
    if !fits || src.shape()[1..] != dst.shape()[1..] || src.dtype() != dst.dtype() {
        return Err(Error::shape(
            "write_rows",
            format!("{:?} {:?} at row {at} of {:?} {:?}", src.shape(), src.dtype(), dst.shape(), dst.dtype()),
        ));
    }
    let at = at * dst.shape()[1..].iter().product::<usize>();
    if let Some(g) = Gpu::of("write_rows", &[&*dst, src])? {
        return with_gpu!(g, |T| copy_rows_at(&g, buffer_mut::<T>("write_rows", dst)?, at, src));
    }
    match dst.dtype() {
        DType::F64 => write_host::<f64>(dst, at, src),
        DType::F32 => write_host::<f32>(dst, at, src),
        DType::BF16 => write_host::<half::bf16>(dst, at, src),
        DType::F16 => write_host::<half::f16>(dst, at, src),
        DType::I32 => write_host::<i32>(dst, at, src),
        DType::U8 => write_host::<u8>(dst, at, src),
    }
}

fn write_host<T: Element>(dst: &mut Tensor, at: usize, src: &Tensor) -> Result<()> {
    let values = src.values::<T>();
    dst.update::<T>(|d| d[at..at + values.len()].copy_from_slice(&values))
}

/// `part`'s elements into `out` from element `at`: straight from its storage when it is a contiguous view in the op's
/// dtype (a row block of a larger tensor is not gathered into a buffer of its own first), else from a whole copy.
fn copy_rows_at<T: CudaElement>(g: &Gpu, out: &mut DeviceBuffer<T>, at: usize, part: &Tensor) -> Result<()> {
    let whole;
    let (src, start) = if part.is_contiguous() && part.dtype() == g.dtype {
        (part, part.layout().offset())
    } else {
        whole = g.input(part)?;
        (&whole, 0)
    };
    g.run(out.copy_range_from(at, buf::<T>(src), start..start + part.elem_count()))
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
