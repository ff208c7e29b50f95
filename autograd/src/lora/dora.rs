//! DoRA's part of [`Tape::lora_linear`](crate::Tape::lora_linear) and of merging (peft 0.21 `tuners/lora/dora.py`):
//! the per-row weight norm n = ‖W + s·B·A‖, the row and column scalings by g = m/n, and the combined output with
//! what its backward keeps. Host loops in the op's precision, which is why DoRA runs on the CPU only so far.

use super::{precision, LoraAdapter};
use qlora_runtime::ops::elementwise::{add, scale};
use qlora_runtime::ops::linalg::matmul;
use qlora_runtime::ops::Compute;
use qlora_runtime::quant::BaseWeight;
use qlora_runtime::{DType, Result, Tensor};

impl LoraAdapter {
    /// n = ‖W + s·B·A‖ per output row: [out], W the dequantized base. DoRA's forward divides m by it; peft caches
    /// it at merge time because unmerging needs it and the merged weight no longer determines it.
    pub fn weight_norm(&self, base: &BaseWeight) -> Result<Tensor> {
        self.check("lora weight_norm", base)?;
        let (a, b) = (self.lora_a.value(), self.lora_b.value());
        weight_norm(&base.materialize(precision(&[&a, &b]))?, &a, &b, self.scaling())
    }
}

/// What DoRA adds to the adapter part of backward.
pub(super) struct DoraSaved {
    /// m/n [out]: scales every gradient of the correction terms.
    pub(super) g: Tensor,
    /// n [out] and h = x_d·Wᵀ + s·x_d·Aᵀ·Bᵀ [N, out], for dm = Σ_rows(dy⊙h)/n.
    pub(super) n: Option<Tensor>,
    pub(super) h: Option<Tensor>,
}

/// n = ‖W + s·B·A‖ per row (peft `get_weight_norm`): W [out, in], A [r, in], B [out, r] → [out].
pub(super) fn weight_norm(w: &Tensor, a: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
    let v = add(w, &scale(&matmul(b, a)?, s)?)?;
    in_precision!(v.dtype(), row_norms(&v))
}

/// t: [rows, cols] → [rows] of ‖t_j‖₂, accumulated in f64 and rounded once.
pub(super) fn row_norms<T: Compute>(t: &Tensor) -> Result<Tensor> {
    let cols = t.shape()[1];
    let v = t.values::<T>();
    let n = v.chunks_exact(cols).map(|row| T::c(row.iter().map(|x| x.f64() * x.f64()).sum::<f64>().sqrt())).collect();
    Tensor::from_vec(n, &[t.shape()[0]])
}

/// a / b elementwise (same shapes).
pub(super) fn div<T: Compute>(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let v = a.values::<T>().iter().zip(b.values::<T>().iter()).map(|(&a, &b)| a / b).collect();
    Tensor::from_vec(v, a.shape())
}

/// t: [rows, cols], c: [cols] → t_ij·(c_j + offset).
pub(super) fn scale_cols<T: Compute>(t: &Tensor, c: &Tensor, offset: f64) -> Result<Tensor> {
    let c: Vec<T> = c.values::<T>().iter().map(|&v| v + T::c(offset)).collect();
    let mut out = t.to_vec::<T>();
    for row in out.chunks_exact_mut(c.len()) {
        row.iter_mut().zip(&c).for_each(|(v, &s)| *v = *v * s);
    }
    Tensor::from_vec(out, t.shape())
}

/// t: [rows, cols], c: [rows] → t_ij·c_i.
pub(super) fn scale_rows<T: Compute>(t: &Tensor, c: &Tensor) -> Result<Tensor> {
    let cols = t.shape()[1];
    let c = c.values::<T>();
    let mut out = t.to_vec::<T>();
    for (row, &s) in out.chunks_exact_mut(cols).zip(c.iter()) {
        row.iter_mut().for_each(|v| *v = *v * s);
    }
    Tensor::from_vec(out, t.shape())
}

/// y = z + (g − 1)⊙z_d + g⊙sv (peft's order of terms) and, when `keep_h`, h = z_d + sv = ∂y/∂g.
/// z, z_d, sv: [rows, out], g: [out].
pub(super) fn dora_combine<T: Compute>(
    z: &Tensor,
    zd: &Tensor,
    sv: &Tensor,
    g: &Tensor,
    keep_h: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let g = g.values::<T>();
    let (zd_v, sv_v) = (zd.values::<T>(), sv.values::<T>());
    let mut y = z.to_vec::<T>();
    let rows = y.chunks_exact_mut(g.len()).zip(zd_v.chunks_exact(g.len())).zip(sv_v.chunks_exact(g.len()));
    for ((y, zd), sv) in rows {
        for j in 0..g.len() {
            y[j] = y[j] + (g[j] - T::c(1.0)) * zd[j] + g[j] * sv[j];
        }
    }
    let h = keep_h
        .then(|| Tensor::from_vec(zd_v.iter().zip(sv_v.iter()).map(|(&a, &b)| a + b).collect::<Vec<T>>(), z.shape()))
        .transpose()?;
    Ok((Tensor::from_vec(y, z.shape())?, h))
}
