//! Adapters at inference time over one loaded base: attaching any of several adapters in turn without reloading
//! the base (adapter swapping), and folding an adapter into the base weights once, so that each generated token
//! runs plain dense products instead of dequantizing the NF4 base and adding the adapter's two thin products.
//! Must not own the adapter math (autograd's `lora`: [`merged_weight`] is the very fold `qlora-rt merge --from
//! nf4` writes) or adapter files (`formats::peft`).

use crate::error::{Error, Result};
use crate::transformer::{CausalLm, Projection};
use qlora_autograd::{merged_weight, LoraAdapter};
use qlora_runtime::quant::BaseWeight;
use qlora_runtime::DType;
use std::collections::BTreeMap;

/// One adapter of a whole model: the adapter of each projection it adapts, by module path (what
/// [`read_adapter`](crate::formats::peft::read_adapter) returns).
pub type ModelAdapter = BTreeMap<String, LoraAdapter>;

impl CausalLm {
    /// This model with `adapter` attached in peft's eval mode (no adapter dropout) instead of whatever adapters it
    /// had; `None` leaves every projection plain. Frozen weights are shared with `self`, not copied, so one base
    /// serves any number of adapters; adapter values move to the device of the base they sit on. Every module of
    /// `adapter` must be a projection of the model.
    pub fn with_adapter(&self, adapter: Option<&ModelAdapter>) -> Result<CausalLm> {
        if let Some(stray) = adapter.and_then(|a| a.keys().find(|m| !self.projections().iter().any(|p| &p.name == *m)))
        {
            return Err(invalid(format!("the adapter adapts {stray}, which is not a projection of this model")));
        }
        self.map(
            |p| Ok(p.clone()),
            |p| {
                let adapter = adapter
                    .and_then(|a| a.get(&p.name))
                    .map(|ad| ad.without_dropout().to_device(p.base.device()))
                    .transpose()?;
                Ok(Projection { name: p.name.clone(), base: p.base.clone(), bias: p.bias.clone(), adapter })
            },
        )
    }

    /// This model for inference with dense f32 products: each projection's base dequantized once, with its adapter
    /// folded in as `qlora-rt merge` folds it (W + s·B·A, or DoRA's row-scaled sum, computed in f32 from the weights
    /// the adapter was trained against), and no adapter left. Generation runs it at the speed of a plain dense
    /// model, and never dequantizes NF4 per token. Costs one dense copy of the projections (a dense f32 base is
    /// shared, not copied, where no adapter sits on it).
    pub fn fold_adapters(&self) -> Result<CausalLm> {
        self.map(
            |p| Ok(p.clone()),
            |p| {
                let dense = match &p.adapter {
                    Some(ad) => merged_weight(&p.base, ad, DType::F32)?,
                    None => p.base.materialize(DType::F32)?,
                };
                Ok(Projection {
                    name: p.name.clone(),
                    base: BaseWeight::Dense(dense),
                    bias: p.bias.clone(),
                    adapter: None,
                })
            },
        )
    }
}

fn invalid(msg: String) -> Error {
    Error::Runtime(qlora_runtime::Error::invalid("adapter", msg))
}
