//! DoRA's [`Tape::lora_linear`](crate::Tape::lora_linear) and its part of merging (peft 0.21
//! `tuners/lora/dora.py`): the per-row weight norm n = ‖W + s·B·A‖, the row and column scalings by g = m/n, the
//! combined output with what its backward keeps, and that backward. The per-row and broadcast math is
//! `qlora_runtime::ops::dora` (CPU and CUDA), the rest GEMMs and elementwise ops, so the op runs wherever its tensors
//! are. It keeps its own op rather than the fused LoRA group's: the norm couples every output row to A and B.

use super::scratch::{base_plus_up, with_scaled_weight, with_weight};
use super::{precision, Dropout, LoraAdapter};
use crate::tape::{Backward, Tape, Var};
use qlora_runtime::op::{bytes_of, first_grad, saved};
use qlora_runtime::ops::dora::{combine, ratio, row_norms, scale_by, Axis};
use qlora_runtime::ops::elementwise::{add, add_bias};
use qlora_runtime::ops::linalg::{matmul, matmul_scaled};
use qlora_runtime::ops::reduce::{sum_rows, sum_rows_product};
use qlora_runtime::quant::BaseWeight;
use qlora_runtime::{DType, Error, Result, Tensor};

impl LoraAdapter {
    /// n = ‖W + s·B·A‖ per output row: \[out\], W the dequantized base. DoRA's forward divides m by it; peft caches
    /// it at merge time because unmerging needs it and the merged weight no longer determines it.
    pub fn weight_norm(&self, base: &BaseWeight) -> Result<Tensor> {
        self.check("lora weight_norm", base)?;
        let (a, b) = (self.lora_a.value(), self.lora_b.value());
        weight_norm(&base.materialize(precision(&[&a, &b]))?, &a, &b, self.scaling())
    }
}

impl Tape {
    /// [`Tape::lora_linear`] with a DoRA adapter (validated by the caller): x [..., in] → [..., out].
    pub(super) fn dora_linear(
        &self,
        x: &Var,
        base: &BaseWeight,
        bias: Option<&Var>,
        ad: &LoraAdapter,
        dropout_seed: u64,
    ) -> Result<Var> {
        let [out_f, in_f] = base.shape();
        let magnitude = ad.magnitude.as_ref().ok_or_else(|| {
            Error::invalid("lora_linear", format!("{}: use_dora needs a lora_magnitude_vector", ad.lora_a.name()))
        })?;
        let (a, b, m) = (self.param(&ad.lora_a), self.param(&ad.lora_b), self.param(magnitude));
        let (av, bv, mv) = (a.value(), b.value(), m.value());
        let p = precision(&[x.value(), av, bv, mv]);
        let rows = x.value().elem_count() / in_f;
        let x2 = x.value().reshape(&[rows, in_f])?;
        let (s, dropout) = (ad.scaling(), Dropout::of(&ad.config, dropout_seed));
        let (x_needs, a_needs, m_needs) = (x.requires_grad(), a.requires_grad(), m.requires_grad());
        // A and B in the op's precision, cast once per optimizer step, for every product (as peft under autocast
        // multiplies them: the norm's B·A included).
        let (av, bv) = (ad.lora_a.value_as(p)?, ad.lora_b.value_as(p)?);
        let (av, bv) = (&av, &bv);
        // n depends on A, B and the frozen base only: made once per optimizer step, not again by the recomputation
        // of a checkpointed layer or by the next micro-batch.
        let n =
            magnitude.derived(&[&ad.lora_a, &ad.lora_b], p, || with_weight(base, p, |w| weight_norm(w, av, bv, s)))?;
        let g = ratio(mv, &n)?;
        let (y, dm_of, u) = match dropout {
            // y = z + (g − 1)⊙z + g⊙s·u·Bᵀ = g⊙(x·Wᵀ + s·u·Bᵀ) = x·(diag(g)·W)ᵀ + s·u·(diag(g)·B)ᵀ: g rides on the
            // weight's dequantization and on B's rows, and the adapter's product accumulates onto the base's in its
            // GEMM, so no pass goes over the [N, out] output. dm reads y itself: Σ_rows(dy⊙h)/n = Σ_rows(dy⊙y)/m.
            // (A magnitude of exactly 0 then gives a NaN dm, which stops training at the step's finite check,
            // where peft's h/n would give a number: no trained or initialised magnitude lands on 0.0 in practice.)
            None => {
                let u = matmul(&x2, &av.t()?)?;
                let bg = scale_by(bv, &g, 0.0, Axis::Rows)?;
                let y = with_scaled_weight(base, p, &g, |w| base_plus_up(&x2, w, &u, &bg, s))?;
                let dm_of = m_needs.then(|| (y.clone(), mv.clone()));
                (y, dm_of, u)
            }
            // The correction terms see x_d while the main term keeps x: x_d·Wᵀ is a second product.
            Some(d) => {
                let xd = d.apply(&x2)?;
                let (z, zd) = with_weight(base, p, |w| Ok((matmul(&x2, &w.t()?)?, matmul(&xd, &w.t()?)?)))?;
                let u = matmul(&xd, &av.t()?)?;
                let sv = matmul_scaled(&u, &bv.t()?, s)?;
                let (y, h) = combine(&z, &zd, &sv, &g, m_needs)?;
                (y, h.map(|h| (h, n.clone())), u)
            }
        };
        let y = match bias {
            Some(bias) => add_bias(&y, bias.value())?,
            None => y,
        };
        let mut y_shape = x.shape().to_vec();
        *y_shape.last_mut().expect("checked: x has an input dimension") = out_f;
        let op = DoraLinear {
            base: x_needs.then(|| base.clone()),
            precision: p,
            x_shape: x.shape().to_vec(),
            bias_needs: bias.is_some_and(Var::requires_grad),
            scaling: s,
            dropout,
            x: a_needs.then(|| x2.clone()),
            u: b.requires_grad().then_some(u),
            a: x_needs.then(|| av.clone()),
            b: (x_needs || a_needs).then(|| bv.clone()),
            g,
            dm_of,
        };
        let none = Var::constant(Tensor::zeros(&[0], DType::F32));
        Ok(self.record1(Box::new(op), &[x, &a, &b, &m, bias.unwrap_or(&none)], y.reshape(&y_shape)?))
    }
}

/// What DoRA's backward reads (each kept only when a gradient that needs it is wanted).
struct DoraLinear {
    /// The frozen base, kept when dx is wanted (a handle on the caller's weight): backward re-materializes W from it.
    base: Option<BaseWeight>,
    precision: DType,
    x_shape: Vec<usize>,
    bias_needs: bool,
    scaling: f64,
    dropout: Option<Dropout>,
    /// The input rows before dropout [N, in], for dA = duᵀ·dropout(x) (the mask is redrawn from its seed).
    x: Option<Tensor>,
    /// x_d·Aᵀ [N, r], for dB.
    u: Option<Tensor>,
    /// A [r, in], for dx.
    a: Option<Tensor>,
    /// B [out, r], for du (which dA and dx read).
    b: Option<Tensor>,
    /// m/n [out]: scales every gradient of the correction terms.
    g: Tensor,
    /// (t [N, out], d [out]) with dm = Σ_rows(dy⊙t)/d: (y before its bias, m) without dropout, (h = x_d·Wᵀ +
    /// s·x_d·Aᵀ·Bᵀ, n) with it.
    dm_of: Option<(Tensor, Tensor)>,
}

impl Backward for DoraLinear {
    fn name(&self) -> &'static str {
        "lora_linear"
    }

    fn saved_bytes(&self) -> usize {
        // The base clone shares its storage with the owner (dense tensor, NF4 nibbles and scales): it costs nothing.
        let dm_of = self.dm_of.as_ref().map(|(t, d)| t.size_in_bytes() + d.size_in_bytes()).unwrap_or(0);
        self.g.size_in_bytes() + dm_of + bytes_of([&self.x, &self.u, &self.a, &self.b])
    }

    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let dy = first_grad(grads)?;
        let p = self.precision;
        let out_f = *dy.shape().last().ok_or_else(|| Error::shape("lora_linear backward", "scalar gradient"))?;
        let dy = dy.reshape(&[dy.elem_count() / out_f, out_f])?;
        let d_bias = if self.bias_needs { Some(sum_rows(&dy)?) } else { None };
        // The branch s·(x_d·Aᵀ)·Bᵀ sees dy scaled per output by g; n is detached, so m is the only other path.
        // Without dropout every product reads dy·diag(g), so g scales the rows of the [out, ·] operands instead
        // (W and B, and dB's rows after its product): a pass over the weight rather than over dy, [N, out].
        let (d_b, du) = match self.dropout {
            None => {
                let d_b = self.u.as_ref().map(|u| matmul_scaled(&dy.t()?, u, self.scaling)).transpose()?;
                let d_b = d_b.map(|d_b| scale_by(&d_b, &self.g, 0.0, Axis::Rows)).transpose()?;
                let bg = self.b.as_ref().map(|b| scale_by(b, &self.g, 0.0, Axis::Rows)).transpose()?;
                (d_b, bg.map(|bg| matmul_scaled(&dy, &bg, self.scaling)).transpose()?)
            }
            Some(_) => {
                let dyg = scale_by(&dy, &self.g, 0.0, Axis::Cols)?;
                let d_b = self.u.as_ref().map(|u| matmul_scaled(&dyg.t()?, u, self.scaling)).transpose()?;
                (d_b, self.b.as_ref().map(|b| matmul_scaled(&dyg, b, self.scaling)).transpose()?)
            }
        };
        let d_a = match &self.x {
            Some(x) => {
                let xd = match self.dropout {
                    Some(d) => d.apply(x)?,
                    None => x.clone(),
                };
                Some(matmul(&saved(&du)?.t()?, &xd)?)
            }
            None => None,
        };
        let d_m = self.dm_of.as_ref().map(|(t, d)| ratio(&sum_rows_product(&dy, t)?, d)).transpose()?;
        let dx = match (&self.base, self.dropout) {
            (None, _) => None,
            // y = g⊙(x·Wᵀ) + g⊙s·x·Aᵀ·Bᵀ + bias: du·A accumulates onto the one product with g⊙W.
            (Some(base), None) => {
                let (du, a) = (saved(&du)?, saved(&self.a)?.t()?);
                Some(with_scaled_weight(base, p, &self.g, |w| base_plus_up(&dy, &w.t()?, du, &a, 1.0))?)
            }
            // y = x·Wᵀ + (g − 1)⊙(x_d·Wᵀ) + …: the x_d terms pass back through the mask.
            (Some(base), Some(d)) => {
                let du_a = matmul(saved(&du)?, saved(&self.a)?)?;
                let dyg = scale_by(&dy, &self.g, -1.0, Axis::Cols)?;
                let (dz, dzd) = with_weight(base, p, |w| Ok((matmul(&dy, w)?, matmul(&dyg, w)?)))?;
                Some(add(&dz, &d.apply(&add(&dzd, &du_a)?)?)?)
            }
        };
        let dx = dx.map(|dx| dx.reshape(&self.x_shape)).transpose()?;
        Ok(vec![dx, d_a, d_b, d_m, d_bias])
    }
}

/// n = ‖W + s·B·A‖ per row (peft `get_weight_norm`): W [out, in], A [r, in], B [out, r] → [out].
pub(super) fn weight_norm(w: &Tensor, a: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
    row_norms(&add(w, &matmul_scaled(b, a, s)?)?)
}
