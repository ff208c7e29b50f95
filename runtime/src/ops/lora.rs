//! LoRA's delta weight as a tensor op: s·B·A in one fixed order of operations (`qlora_kernels::lora`), so that
//! `qlora-rt merge` writes the same bytes on the GPU as on any CPU. Training's adapter products are GEMMs
//! (`linalg`); this op has no gradient.

use super::dispatch;
use crate::{Error, Result, Tensor};
use qlora_kernels::cuda::lora as glora;
use qlora_kernels::lora;

/// b: [out, r], a: [r, in] → [out, in] = s·(Σ_k b_ik·a_kj), summed from k = 0 with every operation rounded.
pub fn lora_delta(b: &Tensor, a: &Tensor, s: f64) -> Result<Tensor> {
    let (&[rows, r], &[r_a, cols]) = (b.shape(), a.shape()) else {
        return Err(Error::shape("lora delta", format!("b {:?} and a {:?} must be matrices", b.shape(), a.shape())));
    };
    if r != r_a || r == 0 {
        return Err(Error::shape(
            "lora delta",
            format!("b {:?} · a {:?}: the rank must match and be ≥ 1", b.shape(), a.shape()),
        ));
    }
    dispatch!("lora delta", [b, a] -> &[rows, cols], |T, out|
        gpu: glora::delta(b, a, r, s as f32, &mut out),
        cpu: lora::delta(&b, &a, r, s as T, &mut out),
    )
}
