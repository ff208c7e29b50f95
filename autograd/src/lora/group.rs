//! The LoRA linear (plain and rsLoRA; DoRA is `dora.rs`) of one projection or of several that read the same input
//! (q/k/v, gate/up), as one recorded op whose passes are GEMMs:
//!
//! forward, per group: U = x_d·[A₀; A₁; …]ᵀ, one GEMM against the adapters stacked once per optimizer step
//! ([`Param::stacked_with`]); per projection i: yᵢ = x·Wᵢᵀ (Wᵢ dequantized into the shared scratch), then
//! yᵢ += sᵢ·Uᵢ·Bᵢᵀ accumulated in place by the GEMM (Uᵢ: its column block of U, read in place; sᵢ as alpha), then the
//! bias. No [tokens, out] temporary, no scale or add pass.
//!
//! backward: dU = [s₀·dy₀·B₀ | s₁·dy₁·B₁ | …] written block by block into one tensor; dA = dUᵀ·x_d, one GEMM for
//! the group (each Aᵢ's gradient a row block of it); dBᵢ = sᵢ·dyᵢᵀ·Uᵢ; dx = Σ dyᵢ·Wᵢ + dU·[A₀; A₁; …], every term a
//! GEMM accumulating into one dx (beta = 1), so the tape adds no per-projection dx either.
//!
//! Dropout draws a different mask per projection (its own seed, as separate ops would), so projections with dropout
//! each get their own x_d and U ("lanes" below: one for all projections without dropout, one per projection with it).
//!
//! The input is x, or an MLP's GLU product x = act(gate) ⊙ up ([`Input::Glu`]): then the op is the GLU and the
//! projection after it, and keeps gate and up (which the GLU's gradients read anyway) instead of x, [tokens,
//! intermediate] and the largest activation of a layer. Backward computes x again in the pass that computes the GLU's
//! gradients from dx (one more write there), then dA and, for an unread output, U from it.

use super::scratch::{base_products, thin_first, with_weight};
use super::{precision, validate, Dropout, LoraProjection};
use crate::tape::{Backward, Tape, Var};
use crate::Param;
use qlora_runtime::op::{bytes_of, saved};
use qlora_runtime::ops::activation::{glu, glu_backward, glu_backward_out, glu_matmul_t, Glu};
use qlora_runtime::ops::elementwise::add_bias;
use qlora_runtime::ops::linalg::{matmul, matmul_columns, matmul_into, matmul_scaled};
use qlora_runtime::ops::lora::lora_grads;
use qlora_runtime::ops::reduce::sum_rows;
use qlora_runtime::ops::rms_norm::{rms_norm, rms_norm_matmul_t};
use qlora_runtime::quant::{BaseWeight, LoraUp};
use qlora_runtime::{DType, Error, Result, Tensor};

impl Tape {
    /// Several adapted linears over one input: `projections[i]` gives what [`Tape::lora_linear`] takes, and the result
    /// is [`Tape::lora_linear`] of each, in order (the same values to rounding, the same gradients, the same dropout
    /// masks), computed as one op with one x·Aᵀ GEMM for all adapters and one dx. All bases share x's last dim.
    /// A group holding a DoRA adapter runs as separate `lora_linear` calls.
    pub fn lora_linear_group(&self, x: &Var, projections: &[LoraProjection]) -> Result<Vec<Var>> {
        self.lora_linear_group_of(x, None, projections)
    }

    /// [`Tape::lora_linear_group`] of x = rms_norm(`norm.input`) (the caller's norm output, whose own backward keeps
    /// the norm's input anyway): the op keeps that input instead of x and forms x again in backward where an adapter
    /// gradient reads it, a layer's [tokens, hidden] less per norm. `None` is [`Tape::lora_linear_group`].
    pub fn lora_linear_group_of(
        &self,
        x: &Var,
        norm: Option<NormOf>,
        projections: &[LoraProjection],
    ) -> Result<Vec<Var>> {
        if projections.is_empty() {
            return Err(Error::invalid("lora_linear", "a group of no projections"));
        }
        for p in projections {
            validate(x, p)?;
        }
        if has_dora(projections) {
            return projections
                .iter()
                .map(|p| self.lora_linear(x, p.base, p.bias, p.adapter, p.dropout_seed))
                .collect();
        }
        if let Some(norm) = &norm {
            if norm.input.shape() != x.shape() {
                let shapes = format!("norm input {:?} for x {:?}", norm.input.shape(), x.shape());
                return Err(Error::shape("lora_linear", shapes));
            }
        }
        let input = match norm {
            Some(norm) => Input::Normed { x, norm: Box::new(norm) },
            None => Input::Rows(x),
        };
        self.lora_group(input, projections, Value::Computed)
    }

    /// [`Tape::lora_linear_group_of`] after the norm that makes its input: y = rms_norm(x + `residual`) (of x alone
    /// without one) by `weight` with `eps` and `offset`, as [`Tape::add_rms_norm`] or [`Tape::rms_norm`] forms it.
    /// Returns the norm's h (x + residual, or x) and the group's outputs: those ops then the group. Without recording
    /// (generation, evaluation), a group whose adapters share one lane without dropout takes y and its U = y·Aᵀ from
    /// one runtime op ([`rms_norm_matmul_t`]: one launch for a decoding step's rows).
    pub fn lora_linear_group_after_norm(
        &self,
        (x, residual): (&Var, Option<&Var>),
        weight: &Param,
        (eps, offset): (f64, f64),
        projections: &[LoraProjection],
    ) -> Result<(Var, Vec<Var>)> {
        let lanes = lanes(projections);
        let lane = match only_shared_lane(&lanes) {
            Some(lane) if !self.is_recording() && !has_dora(projections) => lane,
            _ => {
                let w = self.param(weight);
                let (h, y) = match residual {
                    Some(r) => self.add_rms_norm(x, r, &w, eps, offset)?,
                    None => (x.clone(), self.rms_norm(x, &w, eps, offset)?),
                };
                let norm = NormOf { input: h.value().clone(), weight: weight.value(), eps, offset };
                let outputs = self.lora_linear_group_of(&y, Some(norm), projections)?;
                return Ok((h, outputs));
            }
        };
        for p in projections {
            validate(x, p)?;
        }
        // The precision `lora_group` will take from y, whose dtype is the norm's: of x, the weight and the residual.
        let w = weight.value();
        let norm_operands: Vec<&Tensor> = [x.value(), &w].into_iter().chain(residual.map(Var::value)).collect();
        let a = lane_a(projections, lane, group_precision(&norm_operands, projections))?;
        let in_f = projections[0].base.shape()[1];
        let rows = x.value().elem_count() / in_f;
        let x2 = x.value().reshape(&[rows, in_f])?;
        let r2 = residual.map(|r| r.value().reshape(&[rows, in_f])).transpose()?;
        let [h, y, u] = rms_norm_matmul_t(&x2, r2.as_ref(), &w, (eps, offset), &a)?;
        let y = Var::constant(y.reshape(x.shape())?);
        let outputs = self.lora_group(Input::Formed { x: &y, u }, projections, Value::Computed)?;
        Ok((Var::constant(h.reshape(x.shape())?), outputs))
    }

    /// [`Tape::lora_linear_group`] after validation, without DoRA; with [`Value::Unread`] the outputs are zeros and
    /// only what backward reads is computed (for a GLU input, not even x: backward computes it, and U from it).
    pub(super) fn lora_group(&self, input: Input, projections: &[LoraProjection], value: Value) -> Result<Vec<Var>> {
        let bound: Vec<Option<(Var, Var)>> =
            projections.iter().map(|p| p.adapter.map(|ad| (self.param(&ad.lora_a), self.param(&ad.lora_b)))).collect();
        let lead = input.vars();
        let p = group_precision(&[lead[0].value()], projections);
        let in_f = projections[0].base.shape()[1];
        let x_shape = lead[0].shape().to_vec();
        let rows = lead[0].value().elem_count() / in_f;
        let x_needs = lead.iter().any(|v| v.requires_grad());
        // Only an unread output over a GLU leaves x and U to backward; otherwise x is formed now.
        let deferred = value == Value::Unread && matches!(input, Input::Glu { .. });
        let mut lanes = lanes(projections);
        // A GLU whose projections share one lane without dropout (down_proj) forms that lane's U with x, in one launch
        // for a decoding step's few rows; a formed input brings that U along.
        let (x2, mut glu_u) = match &input {
            Input::Rows(x) | Input::Normed { x, .. } => (Some(x.value().reshape(&[rows, in_f])?), None),
            Input::Formed { x, u } => (Some(x.value().reshape(&[rows, in_f])?), Some(u.clone())),
            Input::Glu { .. } if deferred => (None, None),
            Input::Glu { kind, gate, up } => {
                let (gate, up) = (gate.value().reshape(&[rows, in_f])?, up.value().reshape(&[rows, in_f])?);
                match only_shared_lane(&lanes) {
                    Some(lane) => {
                        let (x, u) = glu_matmul_t(*kind, &gate, &up, &lane_a(projections, lane, p)?)?;
                        (Some(x), Some(u))
                    }
                    None => (Some(glu(*kind, &gate, &up)?), None),
                }
            }
        };
        let mut members: Vec<Member> = projections
            .iter()
            .map(|p| Member {
                out_f: p.base.shape()[0],
                base: x_needs.then(|| p.base.clone()),
                bias_needs: p.bias.is_some_and(Var::requires_grad),
                adapter: None,
            })
            .collect();
        // Per lane its U; per member its B in the op's precision (what the forward GEMMs read).
        let mut us = Vec::with_capacity(lanes.len());
        let mut bs: Vec<Option<Tensor>> = vec![None; projections.len()];
        for (li, lane) in lanes.iter_mut().enumerate() {
            let a = lane_a(projections, lane, p)?;
            let u = match glu_u.take() {
                Some(u) => Some(u),
                None => x2.as_ref().map(|x2| lane_u(lane.dropout, x2, &a)).transpose()?,
            };
            let needs = |f: fn(&(Var, Var)) -> &Var| {
                lane.members.iter().any(|&i| bound[i].as_ref().is_some_and(|ab| f(ab).requires_grad()))
            };
            let (a_needs, b_needs) = (needs(|ab| &ab.0), needs(|ab| &ab.1));
            let mut col = 0;
            for &i in &lane.members {
                let ad = adapter(projections, i);
                let (av, bv) = bound[i].as_ref().expect("lane members have adapters");
                let b = ad.lora_b.value_as(p)?;
                members[i].adapter = Some(MemberAdapter {
                    lane: li,
                    col,
                    r: ad.config.r,
                    scaling: ad.scaling(),
                    a_needs: av.requires_grad(),
                    b_needs: bv.requires_grad(),
                    // du, which dA and dx need, reads B again.
                    b: (x_needs || a_needs).then(|| b.clone()),
                });
                bs[i] = Some(b);
                col += ad.config.r;
            }
            lane.a_needs = a_needs;
            // Deferred, U is formed in backward from the stacked A.
            lane.a = (x_needs || (deferred && b_needs)).then_some(a);
            lane.u = if b_needs { u.clone() } else { None };
            us.push(u);
        }

        let shape_of = |member: &Member| {
            let mut shape = x_shape.clone();
            *shape.last_mut().expect("validated: x has an input dimension") = member.out_f;
            shape
        };
        let device = lead[0].value().device();
        let outputs = match (&x2, value) {
            (Some(x2), Value::Computed) => {
                // Each adapter's columns of its lane's U, read in place by the up-projection.
                let u_cols = members
                    .iter()
                    .map(|m| {
                        m.adapter
                            .as_ref()
                            .map(|ad| saved(&us[ad.lane]).and_then(|u| u.narrow(1, ad.col, ad.r)))
                            .transpose()
                    })
                    .collect::<Result<Vec<_>>>()?;
                let bases: Vec<(&BaseWeight, Option<LoraUp>)> = projections
                    .iter()
                    .zip(&members)
                    .zip(&u_cols)
                    .zip(&bs)
                    .map(|(((proj, member), u), b)| {
                        let lora = match (&member.adapter, u, b) {
                            (Some(ad), Some(u), Some(b)) => Some(LoraUp { u, b, alpha: ad.scaling }),
                            _ => None,
                        };
                        (proj.base, lora)
                    })
                    .collect();
                let ys = base_products(&bases, x2, p)?;
                ys.into_iter()
                    .zip(projections)
                    .zip(&members)
                    .map(|((y, proj), member)| {
                        let y = match proj.bias {
                            Some(bias) => add_bias(&y, bias.value())?,
                            None => y,
                        };
                        y.reshape(&shape_of(member))
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            _ => members.iter().map(|m| Tensor::zeros_on(&shape_of(m), p, device)).collect::<Result<Vec<_>>>()?,
        };
        let a_needs = lanes.iter().any(|l| l.a_needs);
        let kept = match input {
            Input::Rows(_) | Input::Formed { .. } => Kept::Rows(if a_needs { x2 } else { None }),
            Input::Normed { norm, .. } => Kept::Normed(a_needs.then_some(*norm)),
            Input::Glu { kind, gate, up } => {
                Kept::Glu { kind, gate: gate.value().clone(), up: up.value().clone(), deferred }
            }
        };
        let op = LoraGroup { precision: p, rows, x_shape, x_needs, input: kept, members, lanes };
        // Inputs: x (or gate and up), then (A, B, bias) per projection, constants standing in for what a projection
        // lacks.
        let none = Var::constant(Tensor::zeros(&[0], DType::F32));
        let mut inputs = lead.to_vec();
        for (proj, b) in projections.iter().zip(&bound) {
            let (a, b) = b.as_ref().map_or((&none, &none), |(a, b)| (a, b));
            inputs.extend([a, b, proj.bias.unwrap_or(&none)]);
        }
        Ok(self.record(Box::new(op), &inputs, outputs))
    }
}

/// What a group multiplies: x's rows (made by a norm it can form again, or with the one lane's U = x·Aᵀ already
/// formed), or an MLP's GLU product act(gate) ⊙ up.
pub(super) enum Input<'a> {
    Rows(&'a Var),
    Normed { x: &'a Var, norm: Box<NormOf> },
    Formed { x: &'a Var, u: Tensor },
    Glu { kind: Glu, gate: &'a Var, up: &'a Var },
}

impl<'a> Input<'a> {
    /// The op's leading inputs, whose gradients its backward returns first: x, or gate and up.
    fn vars(&self) -> Vec<&'a Var> {
        match *self {
            Input::Rows(x) | Input::Normed { x, .. } | Input::Formed { x, .. } => vec![x],
            Input::Glu { gate, up, .. } => vec![gate, up],
        }
    }
}

/// x = rms_norm(input)·… as the caller's norm made it ([`Tape::lora_linear_group_of`]): what backward needs to form
/// x again, bit for bit (the same kernel on the same input).
#[derive(Clone)]
pub struct NormOf {
    pub input: Tensor,
    pub weight: Tensor,
    pub eps: f64,
    pub offset: f64,
}

/// Whether a projection of the group has a DoRA adapter (the group then runs as separate `lora_linear` calls).
fn has_dora(projections: &[LoraProjection]) -> bool {
    projections.iter().any(|p| p.adapter.is_some_and(|ad| ad.config.use_dora))
}

/// The precision a group computes in: that of its input (`lead`: x, or what x's dtype comes from) with its adapters'
/// A and B.
fn group_precision(lead: &[&Tensor], projections: &[LoraProjection]) -> DType {
    let adapters: Vec<Tensor> =
        projections.iter().filter_map(|p| p.adapter).flat_map(|ad| [ad.lora_a.value(), ad.lora_b.value()]).collect();
    precision(&lead.iter().copied().chain(&adapters).collect::<Vec<_>>())
}

/// The group's one lane when every adapter shares it without dropout: its U is then one product, which a fused op
/// may form with the input (a GLU, a norm).
fn only_shared_lane(lanes: &[Lane]) -> Option<&Lane> {
    match lanes {
        [lane] if lane.dropout.is_none() => Some(lane),
        _ => None,
    }
}

/// A lane's adapters' A matrices stacked \[Σ r, in\] in `precision` (kept on the parameter between optimizer steps).
fn lane_a(projections: &[LoraProjection], lane: &Lane, precision: DType) -> Result<Tensor> {
    let params: Vec<&Param> = lane.members.iter().map(|&i| &adapter(projections, i).lora_a).collect();
    params[0].stacked_with(&params[1..], precision)
}

/// A lane's U = x_d·Aᵀ: masked on the fly where the lane has dropout.
fn lane_u(dropout: Option<Dropout>, x: &Tensor, a: &Tensor) -> Result<Tensor> {
    match dropout {
        Some(d) => d.matmul_t(x, a),
        None => matmul(x, &a.t()?),
    }
}

/// Whether a LoRA op computes its output or only records what its backward reads (whose backward reads no output).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Value {
    Computed,
    /// Zeros stand in for the output: [`Tape::lora_linear_unread`].
    Unread,
}

/// The adapter of projection `i`, which the caller knows to have one.
fn adapter<'a>(projections: &[LoraProjection<'a>], i: usize) -> &'a super::LoraAdapter {
    projections[i].adapter.expect("lane members have adapters")
}

/// The lanes of a group: the projections with an adapter and no dropout share one (and one U); each with dropout
/// has its own. Forward fills in what each lane keeps.
fn lanes(projections: &[LoraProjection]) -> Vec<Lane> {
    let mut lanes: Vec<Lane> = Vec::new();
    let mut shared: Option<usize> = None;
    for (i, p) in projections.iter().enumerate() {
        let Some(ad) = p.adapter else { continue };
        let dropout = Dropout::of(&ad.config, p.dropout_seed);
        match (dropout, shared) {
            (None, Some(at)) => lanes[at].members.push(i),
            _ => {
                if dropout.is_none() {
                    shared = Some(lanes.len());
                }
                lanes.push(Lane { dropout, members: vec![i], a_needs: false, a: None, u: None });
            }
        }
    }
    lanes
}

/// Projections whose adapters read one x_d, with their A's stacked in member order.
struct Lane {
    dropout: Option<Dropout>,
    members: Vec<usize>,
    /// Whether any member's A wants a gradient (then x is kept, and B for du).
    a_needs: bool,
    /// The stacked A [Σ r, in] in the op's precision, kept for dx and for a U formed in backward (a handle on the
    /// parameter's compute copy).
    a: Option<Tensor>,
    /// x_d·Aᵀ [N, Σ r], kept for dB (None when backward forms it: [`Kept::Glu`] deferred).
    u: Option<Tensor>,
}

/// What backward reads of the op's input.
enum Kept {
    /// x's rows before dropout [N, in], when a lane's dA needs them (masks are redrawn from their seeds).
    Rows(Option<Tensor>),
    /// gate and up of x = act(gate) ⊙ up, never x itself: the GLU's gradients read them, and x is formed again in
    /// that pass. `deferred`: forward formed neither x nor U (an unread output).
    Glu { kind: Glu, gate: Tensor, up: Tensor, deferred: bool },
    /// The input of the norm that made x, when a lane's dA needs x's rows: x is formed again from it.
    Normed(Option<NormOf>),
}

struct Member {
    out_f: usize,
    /// The frozen base, kept when dx is wanted (a handle on the caller's weight): backward re-materializes W from it.
    base: Option<BaseWeight>,
    bias_needs: bool,
    adapter: Option<MemberAdapter>,
}

struct MemberAdapter {
    lane: usize,
    /// This adapter's first column of its lane's U (first row of the stacked A) and its rank.
    col: usize,
    r: usize,
    scaling: f64,
    a_needs: bool,
    b_needs: bool,
    /// B [out, r] in the op's precision, for du (kept when dx or the lane's dA is wanted).
    b: Option<Tensor>,
}

struct LoraGroup {
    precision: DType,
    /// N: x's rows once its leading dims are flattened.
    rows: usize,
    x_shape: Vec<usize>,
    x_needs: bool,
    input: Kept,
    members: Vec<Member>,
    lanes: Vec<Lane>,
}

/// A block of one lane's members whose dA and dB wait for x: its du, and its first column of the lane's U.
struct Pending {
    lane: usize,
    block: Vec<usize>,
    du: Option<Tensor>,
    /// The block's dB, one per member, where they came with du from one read of each dy (U kept).
    db: Option<Vec<Tensor>>,
    first: usize,
}

impl Backward for LoraGroup {
    fn name(&self) -> &'static str {
        "lora_linear"
    }

    fn saved_bytes(&self) -> usize {
        // Bases are handles on their owners' storage (dense tensor, NF4 nibbles and scales): they cost nothing.
        let bs = self.members.iter().filter_map(|m| m.adapter.as_ref()).map(|ad| &ad.b);
        let input = match &self.input {
            Kept::Rows(x) => bytes_of([x]),
            // A handle on what the norm's backward keeps.
            Kept::Normed(_) => 0,
            Kept::Glu { gate, up, .. } => gate.size_in_bytes() + up.size_in_bytes(),
        };
        bytes_of(self.lanes.iter().flat_map(|l| [&l.a, &l.u]).chain(bs)) + input
    }

    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let rows = self.rows;
        let dys = self
            .members
            .iter()
            .zip(grads)
            .map(|(m, g)| g.as_ref().map(|g| g.reshape(&[rows, m.out_f])).transpose())
            .collect::<Result<Vec<_>>>()?;
        // x (or gate and up), then (A, B, bias) per projection.
        let lead = match self.input {
            Kept::Rows(_) | Kept::Normed(_) => 1,
            Kept::Glu { .. } => 2,
        };
        let mut out: Vec<Option<Tensor>> = vec![None; lead + 3 * self.members.len()];
        for (i, (m, dy)) in self.members.iter().zip(&dys).enumerate() {
            if let (true, Some(dy)) = (m.bias_needs, dy) {
                out[lead + 2 + 3 * i] = Some(sum_rows(dy)?);
            }
        }
        // dA and dB read x or U, so they wait until x is at hand (`Kept::Glu` forms it from dx).
        let (pending, dx) = self.dx(&dys)?;
        let x = self.input_grads(dx, &pending, &mut out)?;
        self.adapter_grads(pending, x.as_ref(), &dys, &mut out[lead..])?;
        Ok(out)
    }
}

impl LoraGroup {
    fn adapter(&self, i: usize) -> &MemberAdapter {
        self.members[i].adapter.as_ref().expect("lane members have adapters")
    }

    /// Each block's du and dx: du·A products accumulated into one tensor with the bases' dy·W, then the masked
    /// terms of lanes with dropout added into it.
    fn dx(&self, dys: &[Option<Tensor>]) -> Result<(Vec<Pending>, Option<Tensor>)> {
        let dy = |i: usize| dys[i].as_ref().expect("blocks hold members with a gradient");
        let mut dx_products: Vec<(Tensor, Tensor)> = Vec::new();
        let mut dx_masked: Vec<(Tensor, Tensor, Dropout)> = Vec::new();
        let mut pending = Vec::new();
        for (li, lane) in self.lanes.iter().enumerate() {
            let present: Vec<usize> = lane.members.iter().copied().filter(|&i| dys[i].is_some()).collect();
            // dU has a block per member with a gradient: a member without one (its output unused) leaves a gap in U's
            // columns, so the others go one by one.
            let blocks = if present.len() == lane.members.len() {
                vec![present]
            } else {
                present.into_iter().map(|i| vec![i]).collect()
            };
            for block in blocks {
                let first = self.adapter(block[0]).col;
                let (mut du, mut db) = (None, None);
                if self.x_needs || block.iter().any(|&i| self.adapter(i).a_needs) {
                    let products = block
                        .iter()
                        .map(|&i| Ok((dy(i), saved(&self.adapter(i).b)?, self.adapter(i).scaling)))
                        .collect::<Result<Vec<(&Tensor, &Tensor, f64)>>>()?;
                    // With U at hand, dB comes from the same read of each dy as dU.
                    let d_u = match &lane.u {
                        Some(u) if block.iter().all(|&i| self.adapter(i).b_needs) => {
                            let width = block.iter().map(|&i| self.adapter(i).r).sum();
                            let (d_u, d_b) = lora_grads(&products, &u.narrow(1, first, width)?)?;
                            db = Some(d_b);
                            d_u
                        }
                        _ => matmul_columns(&products)?,
                    };
                    if self.x_needs {
                        let a = saved(&lane.a)?.narrow(0, first, d_u.shape()[1])?;
                        match lane.dropout {
                            None => dx_products.push((d_u.clone(), a)),
                            Some(d) => dx_masked.push((d_u.clone(), a, d)),
                        }
                    }
                    du = Some(d_u);
                }
                pending.push(Pending { lane: li, block, du, db, first });
            }
        }
        if !self.x_needs {
            return Ok((pending, None));
        }
        let mut dx: Option<Tensor> = None;
        // The thin du·A products (K = r) and the bases' dy·W in `thin_first`'s order, as in forward.
        let first = dys.iter().flatten().next().is_some_and(|dy| thin_first(dy.device()));
        let (before, after) = if first { (&dx_products[..], &[][..]) } else { (&[][..], &dx_products[..]) };
        for (du, a) in before {
            accumulate(&mut dx, du, a)?;
        }
        for (m, dy) in self.members.iter().zip(dys) {
            if let (Some(base), Some(dy)) = (&m.base, dy) {
                with_weight(base, self.precision, |w| accumulate(&mut dx, dy, w))?;
            }
        }
        for (du, a) in after {
            accumulate(&mut dx, du, a)?;
        }
        for (du, a, d) in &dx_masked {
            match &mut dx {
                Some(dx) => d.matmul_accumulate(dx, du, a)?,
                None => dx = Some(d.apply(&matmul(du, a)?)?),
            }
        }
        Ok((pending, dx.map(|dx| dx.reshape(&self.x_shape)).transpose()?))
    }

    /// The gradients of the op's leading inputs into `out` (dx, or the GLU's d_gate and d_up from it), and x's rows
    /// where a pending dA or U reads them: kept, or for a GLU formed in the same pass as its gradients.
    fn input_grads(
        &self,
        dx: Option<Tensor>,
        pending: &[Pending],
        out: &mut [Option<Tensor>],
    ) -> Result<Option<Tensor>> {
        let deferred = matches!(self.input, Kept::Glu { deferred: true, .. });
        let reads_x = |i: usize| self.adapter(i).a_needs || (deferred && self.adapter(i).b_needs);
        let wants_x = pending.iter().any(|b| b.block.iter().any(|&i| reads_x(i)));
        let (kind, gate, up) = match &self.input {
            Kept::Rows(x) => {
                out[0] = dx;
                return Ok(x.clone());
            }
            Kept::Normed(norm) => {
                out[0] = dx;
                let Some(norm) = norm.as_ref().filter(|_| wants_x) else { return Ok(None) };
                let (x, _) = rms_norm(&norm.input, &norm.weight, norm.eps, norm.offset)?;
                return x.reshape(&[self.rows, x.elem_count() / self.rows]).map(Some);
            }
            Kept::Glu { kind, gate, up, .. } => (*kind, gate, up),
        };
        let x = match (dx, wants_x) {
            (Some(mut dx), true) => {
                // The product lands in dx's buffer, which nothing reads after this.
                let (d_gate, d_up) = glu_backward_out(kind, gate, up, &mut dx)?;
                (out[0], out[1]) = (Some(d_gate), Some(d_up));
                Some(dx)
            }
            (Some(dx), false) => {
                let (d_gate, d_up) = glu_backward(kind, gate, up, &dx)?;
                (out[0], out[1]) = (Some(d_gate), Some(d_up));
                None
            }
            (None, true) => Some(glu(kind, gate, up)?),
            (None, false) => None,
        };
        x.map(|x| x.reshape(&[self.rows, x.elem_count() / self.rows])).transpose()
    }

    /// dB and dA of each pending block into `out` ((A, B, bias) per projection), from x's rows and U (kept, or formed
    /// here once per lane from x).
    fn adapter_grads(
        &self,
        pending: Vec<Pending>,
        x: Option<&Tensor>,
        dys: &[Option<Tensor>],
        out: &mut [Option<Tensor>],
    ) -> Result<()> {
        let x = || x.ok_or_else(|| Error::invalid("lora_linear", "backward needs the input rows, which were not kept"));
        let mut formed: Vec<Option<Tensor>> = vec![None; self.lanes.len()];
        for Pending { lane: li, block, du, db, first } in pending {
            let lane = &self.lanes[li];
            if let Some(db) = db {
                for (&i, d_b) in block.iter().zip(db) {
                    out[1 + 3 * i] = Some(d_b);
                }
            } else {
                if lane.u.is_none() && formed[li].is_none() && block.iter().any(|&i| self.adapter(i).b_needs) {
                    formed[li] = Some(lane_u(lane.dropout, x()?, saved(&lane.a)?)?);
                }
                for &i in &block {
                    let ad = self.adapter(i);
                    if let (true, Some(dy)) = (ad.b_needs, &dys[i]) {
                        let u = saved(if lane.u.is_some() { &lane.u } else { &formed[li] })?.narrow(1, ad.col, ad.r)?;
                        out[1 + 3 * i] = Some(matmul_scaled(&dy.t()?, &u, ad.scaling)?);
                    }
                }
            }
            if let Some(du) = du.filter(|_| block.iter().any(|&i| self.adapter(i).a_needs)) {
                let xd = match lane.dropout {
                    Some(d) => d.apply(x()?)?,
                    None => x()?.clone(),
                };
                let d_a = matmul(&du.t()?, &xd)?;
                for &i in block.iter().filter(|&&i| self.adapter(i).a_needs) {
                    out[3 * i] = Some(d_a.narrow(0, self.adapter(i).col - first, self.adapter(i).r)?);
                }
            }
        }
        Ok(())
    }
}

/// dx += a·b, the first term making dx.
fn accumulate(dx: &mut Option<Tensor>, a: &Tensor, b: &Tensor) -> Result<()> {
    match dx {
        None => *dx = Some(matmul(a, b)?),
        Some(dx) => matmul_into(dx, a, b, 1.0, 1.0)?,
    }
    Ok(())
}
