//! Joining row blocks: parts computed chunk by chunk (the fused loss's dx) laid end to end.

use crate::cuda::{buf, output, with_gpu, Gpu};
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
