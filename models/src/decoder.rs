//! A decoder layer's weights: its projections (frozen base, optional frozen bias, optional trainable adapter) with
//! their forward passes, its norms, and moving them between devices. The layer's forward is `layer.rs`'s, the model
//! around the layers `transformer.rs`'s.

use crate::config::LayerKind;
use qlora_autograd::{Glu, LoraAdapter, LoraProjection, Param, Tape, Var};
use qlora_runtime::memory::{tagged, Category};
use qlora_runtime::quant::BaseWeight;
use qlora_runtime::{DType, Device, Tensor};
use std::borrow::Cow;

/// A linear layer of the decoder: frozen base, optional frozen bias, optional trainable adapter. Clones share the
/// parameters and the base's bytes.
#[derive(Clone, Debug)]
pub struct Projection {
    /// Module path as transformers names it, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub base: BaseWeight,
    pub bias: Option<Param>,
    pub adapter: Option<LoraAdapter>,
}

impl Projection {
    /// This projection on `device`, a dense base and the bias in `dtype`; see [`CausalLm::to_device`](crate::transformer::CausalLm::to_device).
    pub(crate) fn to_device(&self, device: Device, dtype: DType) -> qlora_runtime::Result<Projection> {
        let base = match &self.base {
            BaseWeight::Dense(t) => BaseWeight::Dense(move_frozen(t, device, dtype)?),
            other => other.to_device(device)?,
        };
        let adapter = tagged(Category::Adapters, || self.adapter.as_ref().map(|ad| ad.to_device(device)).transpose())?;
        let bias = self.bias.as_ref().map(|b| frozen_to(b, device, dtype)).transpose()?;
        Ok(Projection { name: self.name.clone(), base, bias, adapter })
    }

    /// The adapter as this run uses it, and the dropout seed: with no seed, peft's eval mode (an adapter with dropout
    /// runs as a copy without it, its parameters shared).
    fn running(&self, dropout_seed: Option<u64>) -> (Option<Cow<'_, LoraAdapter>>, u64) {
        let adapter = self.adapter.as_ref().map(|ad| match dropout_seed {
            None if ad.config.dropout > 0.0 => Cow::Owned(ad.without_dropout()),
            _ => Cow::Borrowed(ad),
        });
        (adapter, dropout_seed.unwrap_or(0))
    }

    pub(crate) fn forward(&self, t: &Tape, x: &Var, dropout_seed: Option<u64>) -> qlora_runtime::Result<Var> {
        let bias = self.bias.as_ref().map(|b| t.param(b));
        let (adapter, seed) = self.running(dropout_seed);
        t.lora_linear(x, &self.base, bias.as_ref(), adapter.as_deref(), seed)
    }

    /// [`Projection::forward`] of act(gate) ⊙ up, an MLP's down projection after its GLU, as one op that keeps gate
    /// and up but not their product ([`Tape::glu_lora_linear`]); with `unread`, for an output only gradients read
    /// ([`Tape::glu_lora_linear_unread`]: nothing is computed until backward).
    pub(crate) fn forward_glu(
        &self,
        t: &Tape,
        (glu, gate, up): (Glu, &Var, &Var),
        dropout_seed: Option<u64>,
        unread: bool,
    ) -> qlora_runtime::Result<Var> {
        let bias = self.bias.as_ref().map(|b| t.param(b));
        let (adapter, dropout_seed) = self.running(dropout_seed);
        let projection =
            LoraProjection { base: &self.base, bias: bias.as_ref(), adapter: adapter.as_deref(), dropout_seed };
        if unread {
            t.glu_lora_linear_unread(glu, gate, up, projection)
        } else {
            t.glu_lora_linear(glu, gate, up, projection)
        }
    }

    /// Projections reading the same input (q/k/v, gate/up) as one op, so that their adapters share one x·Aᵀ GEMM
    /// and backward one dx: [`Projection::forward`] of each (projection, dropout seed), in order.
    pub(crate) fn forward_group<const N: usize>(
        t: &Tape,
        x: &Var,
        projections: [(&Projection, Option<u64>); N],
    ) -> qlora_runtime::Result<[Var; N]> {
        let biases = projections.map(|(p, _)| p.bias.as_ref().map(|b| t.param(b)));
        let running = projections.map(|(p, seed)| p.running(seed));
        let members = group_members(&projections, &biases, &running);
        let ys = t.lora_linear_group(x, &members)?;
        Ok(ys.try_into().unwrap_or_else(|_| unreachable!("one output per projection")))
    }

    /// [`Projection::forward_group`] of y = rms_norm(x + `residual`) (of x without one) by `norm`: the norm's h (x +
    /// residual, or x) and the projections' outputs (`Tape::lora_linear_group_after_norm`: recording, the group keeps
    /// the norm's input rather than y; decoding, y and the adapters' U come from one launch).
    pub(crate) fn forward_group_after_norm<const N: usize>(
        t: &Tape,
        (x, residual): (&Var, Option<&Var>),
        (norm, eps, offset): (&Param, f64, f64),
        projections: [(&Projection, Option<u64>); N],
    ) -> qlora_runtime::Result<(Var, [Var; N])> {
        let biases = projections.map(|(p, _)| p.bias.as_ref().map(|b| t.param(b)));
        let running = projections.map(|(p, seed)| p.running(seed));
        let members = group_members(&projections, &biases, &running);
        let (h, ys) = t.lora_linear_group_after_norm((x, residual), norm, (eps, offset), &members)?;
        Ok((h, ys.try_into().unwrap_or_else(|_| unreachable!("one output per projection"))))
    }
}

/// A group's members as the tape takes them: each projection's base, bias (bound as `biases`) and running adapter
/// with its dropout seed (`running`).
fn group_members<'a, const N: usize>(
    projections: &[(&'a Projection, Option<u64>); N],
    biases: &'a [Option<Var>; N],
    running: &'a [(Option<Cow<'a, LoraAdapter>>, u64); N],
) -> Vec<LoraProjection<'a>> {
    projections
        .iter()
        .zip(biases)
        .zip(running)
        .map(|((&(p, _), bias), (adapter, dropout_seed))| LoraProjection {
            base: &p.base,
            bias: bias.as_ref(),
            adapter: adapter.as_deref(),
            dropout_seed: *dropout_seed,
        })
        .collect()
}

#[derive(Clone)]
pub struct SelfAttention {
    pub q_proj: Projection,
    pub k_proj: Projection,
    pub v_proj: Projection,
    pub o_proj: Projection,
    pub q_norm: Option<Param>,
    pub k_norm: Option<Param>,
}

#[derive(Clone)]
pub struct Mlp {
    pub gate_proj: Projection,
    pub up_proj: Projection,
    pub down_proj: Projection,
}

/// Clones share the parameters and the bases' bytes.
#[derive(Clone)]
pub struct DecoderLayer {
    pub input_layernorm: Param,
    pub post_attention_layernorm: Param,
    /// Gemma 2/3 sandwich norms.
    pub pre_feedforward_layernorm: Option<Param>,
    pub post_feedforward_layernorm: Option<Param>,
    pub self_attn: SelfAttention,
    pub mlp: Mlp,
    pub kind: LayerKind,
}

/// A layer's projections borrowed with `&` or `&mut`, in [`PROJECTIONS`](crate::config::PROJECTIONS) order.
macro_rules! projections {
    ($layer:expr, $($borrow:tt)+) => {{
        let (a, m) = ($($borrow)+ $layer.self_attn, $($borrow)+ $layer.mlp);
        [
            $($borrow)+ a.q_proj,
            $($borrow)+ a.k_proj,
            $($borrow)+ a.v_proj,
            $($borrow)+ a.o_proj,
            $($borrow)+ m.gate_proj,
            $($borrow)+ m.up_proj,
            $($borrow)+ m.down_proj,
        ]
    }};
}

impl DecoderLayer {
    /// The layer's projections in [`PROJECTIONS`](crate::config::PROJECTIONS) order.
    pub fn projections(&self) -> [&Projection; 7] {
        projections!(self, &)
    }

    /// [`DecoderLayer::projections`], mutably.
    pub fn projections_mut(&mut self) -> [&mut Projection; 7] {
        projections!(self, &mut)
    }
}

/// The attention and MLP blocks of `projections` given in [`PROJECTIONS`](crate::config::PROJECTIONS) order, the
/// inverse of [`DecoderLayer::projections`].
pub(crate) fn blocks(
    projections: [Projection; 7],
    q_norm: Option<Param>,
    k_norm: Option<Param>,
) -> (SelfAttention, Mlp) {
    let [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] = projections;
    (SelfAttention { q_proj, k_proj, v_proj, o_proj, q_norm, k_norm }, Mlp { gate_proj, up_proj, down_proj })
}

/// A frozen tensor in `dtype` on `device` (converted before an upload, so a bf16 model crosses the bus at 2 bytes).
fn move_frozen(t: &Tensor, device: Device, dtype: DType) -> qlora_runtime::Result<Tensor> {
    if t.device() == Device::Cpu {
        t.try_to_dtype(dtype)?.to_device(device)
    } else {
        t.to_device(device)?.try_to_dtype(dtype)
    }
}

pub(crate) fn frozen_to(p: &Param, device: Device, dtype: DType) -> qlora_runtime::Result<Param> {
    Ok(Param::frozen(p.name(), move_frozen(&p.value(), device, dtype)?))
}
