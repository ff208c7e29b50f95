//! Folding an adapter into its base weight and taking it out again (peft 0.21 `get_delta_weight`, `merge`/`unmerge`
//! and `DoraLinearVariant.merge_safe`/`unmerge`): what `qlora-rt merge` writes and the tests check against peft.

use super::{precision, LoraAdapter};
use qlora_runtime::ops::dora::{ratio, row_norms, scale_by, Axis};
use qlora_runtime::ops::elementwise::{add, scale};
use qlora_runtime::quant::BaseWeight;
use qlora_runtime::{DType, Error, Result, Tensor};

/// W' = W + s·B·A, or with DoRA (m/n)⊙(W + s·B·A) row-wise (peft `merge_safe`): [out, in] in `dtype`.
/// Computed in f32 from the dequantized base, the weights the adapter was trained against, and rounded once.
pub fn merged_weight(base: &BaseWeight, adapter: &LoraAdapter, dtype: DType) -> Result<Tensor> {
    let delta = adapter.delta_weight(base)?;
    let sum = add(&base.materialize(precision(&[&delta]))?, &delta)?;
    let merged = match &adapter.magnitude {
        None => sum,
        Some(m) => {
            // The delta already carries s, so the norm is ‖W + ΔW‖ (peft passes scaling=1 here).
            let n = row_norms(&sum)?;
            scale_by(&sum, &ratio(&m.value(), &n)?, 0.0, Axis::Rows)?
        }
    };
    Ok(merged.to_dtype(dtype))
}

/// W = W' − s·B·A, or with DoRA W'⊙(n/m) − s·B·A row-wise (peft `DoraLinearVariant.unmerge`): [out, in], f32.
/// `dora_weight_norm` is n as [`LoraAdapter::weight_norm`] gave it at merge time (what peft caches as
/// `{adapter}-weight_norm`): every row of W' has norm |m| whatever n was, so n cannot be recovered from W'.
/// Plain LoRA does not read it.
pub fn unmerged_weight(merged: &Tensor, adapter: &LoraAdapter, dora_weight_norm: Option<&Tensor>) -> Result<Tensor> {
    let [out_f, in_f] = *merged.shape() else {
        return Err(Error::shape("lora unmerge", format!("merged weight must be [out, in], got {:?}", merged.shape())));
    };
    let as_base = BaseWeight::Dense(merged.clone());
    let delta = adapter.delta_weight(&as_base)?;
    let merged = merged.to_dtype(delta.dtype());
    let scaled = match &adapter.magnitude {
        None => merged,
        Some(m) => {
            let n = dora_weight_norm.ok_or_else(|| {
                Error::invalid(
                    "lora unmerge",
                    format!("{}: unmerging DoRA needs the weight norm from merge time", m.name()),
                )
            })?;
            if n.shape() != [out_f] {
                return Err(Error::shape(
                    "lora unmerge",
                    format!("{}: weight norm {:?} for merged weight [{out_f}, {in_f}]", m.name(), n.shape()),
                ));
            }
            scale_by(&merged, &ratio(n, &m.value())?, 0.0, Axis::Rows)?
        }
    };
    add(&scaled, &scale(&delta, -1.0)?)
}
