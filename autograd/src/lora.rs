//! LoRA, rsLoRA and DoRA adapters over a frozen base linear: the adapted layer as one recorded op
//! ([`Tape::lora_linear`], or [`Tape::lora_linear_group`] for projections sharing their input) with a hand-written
//! backward, and a set of adapters sharing one base. The LoRA op is `lora/group.rs` (a single projection is a group
//! of one); DoRA's op, norm and scalings are `lora/dora.rs`; merge/unmerge into a dense weight `lora/merge.rs`; where
//! NF4 bases are dequantized `lora/scratch.rs`.
//!
//! The math is peft 0.21's, formula for formula: `tuners/lora/layer.py` (`LoraLayer.update_layer` for the scaling,
//! `reset_lora_parameters` for the init, `Linear.forward`, `get_delta_weight`, `merge`/`unmerge`),
//! `tuners/lora/dora.py` (`DoraLinearLayer.get_weight_norm`, `update_layer`, `forward`) and `tuners/lora/variants.py`
//! (`DoraLinearVariant.forward`, `merge_safe`, `unmerge`). Owns the adapter parameters and their gradients; must
//! not own the base weight (the caller does, frozen, and no gradient ever reaches it) or any file format.

use crate::tape::{Tape, Var};
use crate::Param;
use qlora_runtime::ops::elementwise::dropout;
use qlora_runtime::ops::lora::{dropout_matmul_accumulate, dropout_matmul_t, lora_delta};
use qlora_runtime::quant::BaseWeight;
use qlora_runtime::Rng;
use qlora_runtime::{DType, Device, Error, Result, Tensor};
use std::collections::BTreeMap;

mod dora;
mod group;
mod merge;
mod scratch;

use crate::Glu;
use dora::weight_norm;
pub use group::NormOf;
use group::{Input, Value};
pub use merge::{merged_weight, unmerged_weight};

/// How A starts (B always starts at zero, so a fresh adapter is a no-op). peft's `init_lora_weights`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraInit {
    /// `True`: A ← kaiming_uniform_(a=√5), i.e. U(−1/√in, 1/√in), as torch's `nn.Linear` and loralib.
    Default,
    /// `"gaussian"`: A ~ N(0, (1/r)²).
    Gaussian,
}

/// One adapter's hyperparameters (peft `LoraConfig`, per module after `rank_pattern`/`alpha_pattern`).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    /// Probability of dropping an input element of the adapter branch (0 = identity).
    pub dropout: f64,
    pub init: LoraInit,
}

impl Default for LoraConfig {
    /// peft `LoraConfig` defaults: r = 8, lora_alpha = 8, lora_dropout = 0, init_lora_weights = True.
    fn default() -> Self {
        LoraConfig { r: 8, alpha: 8.0, use_rslora: false, use_dora: false, dropout: 0.0, init: LoraInit::Default }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::invalid("lora config", "r must be ≥ 1, got 0"));
        }
        if !self.alpha.is_finite() {
            return Err(Error::invalid("lora config", format!("alpha must be finite, got {}", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid("lora config", format!("dropout must be in [0, 1), got {}", self.dropout)));
        }
        Ok(())
    }

    /// s = alpha / r, or alpha / √r with rsLoRA (peft `update_layer`).
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// The trainable part of one adapted linear layer, named with peft's keys so a state dict maps one to one.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// `{module}.lora_A.weight`: [r, in].
    pub lora_a: Param,
    /// `{module}.lora_B.weight`: [out, r].
    pub lora_b: Param,
    /// `{module}.lora_magnitude_vector` (DoRA only): \[out\].
    pub magnitude: Option<Param>,
    pub config: LoraConfig,
}

impl LoraAdapter {
    /// base: [out, in] → A [r, in], B [out, r] (zeros), DoRA m \[out\] = ‖W‖ per output row; all trainable f32.
    ///
    /// m is computed as peft's `DoraLinearLayer.update_layer` does, ‖W + s·B·A‖ over the input dimension with W
    /// the dequantized base (the weights training will see); with B = 0 that is ‖W‖.
    pub fn new(module_name: &str, base: &BaseWeight, config: &LoraConfig, rng: &mut Rng) -> Result<Self> {
        config.validate().map_err(|e| Error::invalid("lora adapter", format!("{module_name}: {e}")))?;
        let [out_f, in_f] = base.shape();
        if out_f == 0 || in_f == 0 {
            return Err(Error::shape("lora adapter", format!("{module_name}: empty base weight [{out_f}, {in_f}]")));
        }
        let r = config.r;
        let a = match config.init {
            LoraInit::Default => {
                // kaiming_uniform_(a): bound = gain·√(3/fan_in) with gain = √(2/(1 + a²)); a = √5 gives 1/√in.
                let bound = (6.0 / ((1.0 + 5.0) * in_f as f64)).sqrt();
                Tensor::uniform(&[r, in_f], -bound, bound, DType::F32, rng)
            }
            LoraInit::Gaussian => Tensor::randn(&[r, in_f], 1.0 / r as f64, DType::F32, rng),
        };
        let b = Tensor::zeros(&[out_f, r], DType::F32);
        let magnitude = if config.use_dora {
            let m = weight_norm(&base.materialize(DType::F32)?, &a, &b, config.scaling())?;
            Some(Param::trainable(format!("{module_name}.lora_magnitude_vector"), m.to_dtype(DType::F32)))
        } else {
            None
        };
        Ok(LoraAdapter {
            lora_a: Param::trainable(format!("{module_name}.lora_A.weight"), a),
            lora_b: Param::trainable(format!("{module_name}.lora_B.weight"), b),
            magnitude,
            config: config.clone(),
        })
    }

    pub fn scaling(&self) -> f64 {
        self.config.scaling()
    }

    /// The trainable parameters, in peft's state-dict order (A, B, then m).
    pub fn params(&self) -> Vec<&Param> {
        [&self.lora_a, &self.lora_b].into_iter().chain(self.magnitude.as_ref()).collect()
    }

    /// The same parameters (shared, not copied) with dropout off: peft's eval mode, for evaluation and generation.
    pub fn without_dropout(&self) -> LoraAdapter {
        LoraAdapter { config: LoraConfig { dropout: 0.0, ..self.config.clone() }, ..self.clone() }
    }

    /// This adapter with new f32 master parameters on `device` (the same tensors when already there), without
    /// gradients.
    pub fn to_device(&self, device: Device) -> Result<LoraAdapter> {
        let master = |p: &Param| Ok::<_, Error>(Param::trainable(p.name(), p.value().to_device(device)?));
        Ok(LoraAdapter {
            lora_a: master(&self.lora_a)?,
            lora_b: master(&self.lora_b)?,
            magnitude: self.magnitude.as_ref().map(master).transpose()?,
            config: self.config.clone(),
        })
    }

    /// s·B·A: [out, in] (peft `get_delta_weight`), in f32 (f64 when the adapter holds f64 values), summed in one
    /// fixed order on every device (`ops::lora::lora_delta`), so a merge is the same bytes wherever it runs.
    pub fn delta_weight(&self, base: &BaseWeight) -> Result<Tensor> {
        self.check("lora delta_weight", base)?;
        lora_delta(&self.lora_b.value(), &self.lora_a.value(), self.scaling())
    }

    /// Shapes against the base and the config: errors name the offending parameter.
    fn check(&self, op: &'static str, base: &BaseWeight) -> Result<()> {
        self.config.validate().map_err(|e| Error::invalid(op, format!("{}: {e}", self.lora_a.name())))?;
        let [out_f, in_f] = base.shape();
        if out_f == 0 || in_f == 0 {
            return Err(Error::shape(op, format!("{}: empty base weight [{out_f}, {in_f}]", self.lora_a.name())));
        }
        let r = self.config.r;
        let expect = |p: &Param, shape: &[usize]| {
            let got = p.value().shape().to_vec();
            if got == shape {
                Ok(())
            } else {
                Err(Error::shape(
                    op,
                    format!("{} is {got:?}, expected {shape:?} for base [{out_f}, {in_f}], r {r}", p.name()),
                ))
            }
        };
        expect(&self.lora_a, &[r, in_f])?;
        expect(&self.lora_b, &[out_f, r])?;
        match (&self.magnitude, self.config.use_dora) {
            (Some(m), true) => expect(m, &[out_f]),
            (None, false) => Ok(()),
            (Some(m), false) => Err(Error::invalid(op, format!("{} is set but use_dora is false", m.name()))),
            (None, true) => {
                Err(Error::invalid(op, format!("{}: use_dora needs a lora_magnitude_vector", self.lora_a.name())))
            }
        }
    }
}

/// Several adapters over one frozen base (one per task), at most one active: switching tasks changes which adapter
/// [`AdapterSet::linear`] applies without touching or reloading the base.
#[derive(Clone, Debug, Default)]
pub struct AdapterSet {
    adapters: BTreeMap<String, LoraAdapter>,
    active: Option<String>,
}

impl AdapterSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `adapter` under `name`, returning the one it replaces.
    pub fn insert(&mut self, name: impl Into<String>, adapter: LoraAdapter) -> Option<LoraAdapter> {
        self.adapters.insert(name.into(), adapter)
    }

    /// Removes `name`; the layer falls back to the plain base if it was active.
    pub fn remove(&mut self, name: &str) -> Option<LoraAdapter> {
        if self.active.as_deref() == Some(name) {
            self.active = None;
        }
        self.adapters.remove(name)
    }

    pub fn get(&self, name: &str) -> Option<&LoraAdapter> {
        self.adapters.get(name)
    }

    /// Selects the adapter `linear` applies; `None` runs the plain base.
    pub fn set_active(&mut self, name: Option<&str>) -> Result<()> {
        if let Some(n) = name {
            if !self.adapters.contains_key(n) {
                let known: Vec<&str> = self.adapters.keys().map(String::as_str).collect();
                return Err(Error::invalid("adapter set", format!("no adapter named {n:?} (have {known:?})")));
            }
        }
        self.active = name.map(str::to_owned);
        Ok(())
    }

    pub fn active_name(&self) -> Option<&str> {
        self.active.as_deref()
    }

    pub fn active(&self) -> Option<&LoraAdapter> {
        self.active.as_deref().and_then(|n| self.adapters.get(n))
    }

    /// [`Tape::lora_linear`] with the active adapter. x: [..., in], base: [out, in], bias: \[out\] → [..., out].
    pub fn linear(
        &self,
        tape: &Tape,
        x: &Var,
        base: &BaseWeight,
        bias: Option<&Var>,
        dropout_seed: u64,
    ) -> Result<Var> {
        tape.lora_linear(x, base, bias, self.active(), dropout_seed)
    }
}

/// One projection of [`Tape::lora_linear_group`]: base W [out, in] frozen, bias \[out\], adapter (A [r, in], B [out, r])
/// and the seed of its adapter dropout.
#[derive(Clone, Copy, Debug)]
pub struct LoraProjection<'a> {
    pub base: &'a BaseWeight,
    pub bias: Option<&'a Var>,
    pub adapter: Option<&'a LoraAdapter>,
    pub dropout_seed: u64,
}

impl Tape {
    /// x: [..., in], base W: [out, in] frozen, bias: \[out\], adapter A: [r, in], B: [out, r], m: \[out\] → [..., out].
    ///
    /// LoRA: y = x·Wᵀ + bias + s·(x_d·Aᵀ)·Bᵀ, with x_d = dropout(x) (peft `Linear.forward`).
    /// DoRA: y = x·Wᵀ + bias + (g − 1)⊙(x_d·Wᵀ) + g⊙s·(x_d·Aᵀ)·Bᵀ, g = m/n, n = ‖W + s·B·A‖ per output row and
    /// detached (peft `DoraLinearVariant.forward` + `DoraLinearLayer.forward`): dropout never touches the main
    /// x·Wᵀ term; without dropout x_d = x and y = g⊙(x·Wᵀ + s·x·Aᵀ·Bᵀ) + bias.
    /// Dropout is inverted dropout drawn from `Rng::new(dropout_seed)`, so a checkpoint recompute reproduces it;
    /// callers pass a fresh seed per layer and step. `adapter: None` is the plain frozen linear.
    ///
    /// One recorded op: gradients reach x, A, B, m and bias, never W. Backward re-materializes W (a dequant for
    /// NF4) instead of keeping it, and keeps only x, x_d·Aᵀ, A, B and, for DoRA, g, n and x_d·Wᵀ + s·x_d·Aᵀ·Bᵀ.
    /// LoRA is [`Tape::lora_linear_group`] with one projection.
    pub fn lora_linear(
        &self,
        x: &Var,
        base: &BaseWeight,
        bias: Option<&Var>,
        adapter: Option<&LoraAdapter>,
        dropout_seed: u64,
    ) -> Result<Var> {
        self.adapted_linear(LoraProjection { base, bias, adapter, dropout_seed }, x, Value::Computed)
    }

    /// [`Tape::lora_linear`] of `projection` recorded for its gradients alone: the value is zeros of the output's
    /// shape, and the base product, the adapter's B product and the bias are skipped (a third of a Llama MLP's GEMM
    /// work, for down_proj). Only for an output nothing reads but gradient-only ops on the way to a checkpoint
    /// recompute's result ([`Tape::recomputing`]): its gradients are [`Tape::lora_linear`]'s, bit for bit, because no
    /// LoRA backward reads the output. DoRA's backward does (its magnitude gradient), so a DoRA adapter computes it.
    pub fn lora_linear_unread(&self, x: &Var, projection: LoraProjection) -> Result<Var> {
        self.adapted_linear(projection, x, Value::Unread)
    }

    fn adapted_linear(&self, p: LoraProjection, x: &Var, value: Value) -> Result<Var> {
        validate(x, &p)?;
        match p.adapter {
            Some(ad) if ad.config.use_dora => self.dora_linear(x, p.base, p.bias, ad, p.dropout_seed),
            _ => Ok(self.lora_group(Input::Rows(x), &[p], value)?.remove(0)),
        }
    }

    /// [`Tape::glu`] then [`Tape::lora_linear`] of its product, as one op that does not keep the product: an MLP's
    /// down projection and the GLU before it. The product, [tokens, intermediate], is the largest activation of a
    /// layer, and the adapter's dA is all that reads it in backward; this op keeps gate and up, which the GLU's
    /// gradients read anyway, and forms the product again in the pass that computes those gradients (one more write
    /// there instead of a saved tensor). Values and gradients are the two ops', bit for bit. A DoRA adapter (whose
    /// backward reads more of its input) runs as the two ops.
    pub fn glu_lora_linear(&self, kind: Glu, gate: &Var, up: &Var, projection: LoraProjection) -> Result<Var> {
        self.glu_adapted_linear(kind, gate, up, projection, Value::Computed)
    }

    /// [`Tape::glu_lora_linear`] recorded for its gradients alone ([`Tape::lora_linear_unread`]): forward computes
    /// nothing, not even the GLU's product (a recompute's down projection); backward forms the product with the
    /// GLU's gradients and the adapter's x·Aᵀ from it.
    pub fn glu_lora_linear_unread(&self, kind: Glu, gate: &Var, up: &Var, projection: LoraProjection) -> Result<Var> {
        self.glu_adapted_linear(kind, gate, up, projection, Value::Unread)
    }

    fn glu_adapted_linear(&self, kind: Glu, gate: &Var, up: &Var, p: LoraProjection, value: Value) -> Result<Var> {
        if p.adapter.is_some_and(|ad| ad.config.use_dora) {
            return self.adapted_linear(p, &self.glu(kind, gate, up)?, value);
        }
        if gate.shape() != up.shape() {
            return Err(Error::shape(
                "lora_linear",
                format!("GLU gate {:?} and up {:?} differ", gate.shape(), up.shape()),
            ));
        }
        validate(gate, &p)?;
        Ok(self.lora_group(Input::Glu { kind, gate, up }, &[p], value)?.remove(0))
    }
}

/// The checks every adapted linear makes before recording anything, so that a rejected call leaves nothing on the
/// tape: shapes against the base (errors name the tensor) and DoRA's device.
fn validate(x: &Var, p: &LoraProjection) -> Result<()> {
    let [out_f, in_f] = p.base.shape();
    if out_f == 0 || in_f == 0 {
        return Err(Error::shape("lora_linear", format!("empty base weight [{out_f}, {in_f}]")));
    }
    if x.shape().last() != Some(&in_f) {
        return Err(Error::shape("lora_linear", format!("input {:?} for base weight [{out_f}, {in_f}]", x.shape())));
    }
    if let Some(b) = p.bias {
        if b.shape() != [out_f] {
            return Err(Error::shape("lora_linear", format!("bias {:?} for base weight [{out_f}, {in_f}]", b.shape())));
        }
    }
    if let Some(ad) = p.adapter {
        ad.check("lora_linear", p.base)?;
    }
    Ok(())
}

/// Inverted dropout with its mask a pure function of (seed, element index).
#[derive(Clone, Copy, Debug)]
struct Dropout {
    p: f64,
    seed: u64,
}

impl Dropout {
    /// The dropout of `config` with this seed, None when it drops nothing.
    fn of(config: &LoraConfig, seed: u64) -> Option<Dropout> {
        (config.dropout > 0.0).then_some(Dropout { p: config.dropout, seed })
    }

    /// Row-major element i is kept iff the i-th draw of `Rng::new(seed).uniform()` is ≥ p, and kept values are
    /// scaled by 1/(1 − p). SplitMix64's i-th draw depends only on the seed and i, so a recompute (checkpoint,
    /// backward) or a GPU twin drawing elements independently gets the same mask. Linear in `t`: the same call maps
    /// a gradient back through the mask.
    fn apply(&self, t: &Tensor) -> Result<Tensor> {
        dropout(t, self.p, self.seed)
    }

    /// apply(x)·aᵀ, fused on a GPU (no dropped copy of x).
    fn matmul_t(&self, x: &Tensor, a: &Tensor) -> Result<Tensor> {
        dropout_matmul_t(x, a, self.p, self.seed)
    }

    /// dx += apply(du·a), fused on a GPU (one pass over dx).
    fn matmul_accumulate(&self, dx: &mut Tensor, du: &Tensor, a: &Tensor) -> Result<()> {
        dropout_matmul_accumulate(dx, du, a, self.p, self.seed)
    }
}

/// The runtime's precision rule ([`DType::compute`]) for these operands (all on one device).
fn precision(ts: &[&Tensor]) -> DType {
    DType::compute(ts.first().map_or(Device::Cpu, |t| t.device()), ts.iter().map(|t| t.dtype()))
}
