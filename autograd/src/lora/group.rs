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

use super::scratch::{base_products, with_weight};
use super::{precision, validate, Dropout, LoraProjection};
use crate::tape::{Backward, Tape, Var};
use crate::Param;
use qlora_runtime::op::{bytes_of, saved};
use qlora_runtime::ops::elementwise::add_bias;
use qlora_runtime::ops::linalg::{matmul, matmul_columns, matmul_into, matmul_scaled};
use qlora_runtime::ops::reduce::sum_rows;
use qlora_runtime::quant::{BaseWeight, LoraUp};
use qlora_runtime::{DType, Device, Error, Result, Tensor};

impl Tape {
    /// Several adapted linears over one input: `projections[i]` gives what [`Tape::lora_linear`] takes, and the result
    /// is [`Tape::lora_linear`] of each, in order (the same values to rounding, the same gradients, the same dropout
    /// masks), computed as one op with one x·Aᵀ GEMM for all adapters and one dx. All bases share x's last dim.
    /// A group holding a DoRA adapter runs as separate `lora_linear` calls.
    pub fn lora_linear_group(&self, x: &Var, projections: &[LoraProjection]) -> Result<Vec<Var>> {
        if projections.is_empty() {
            return Err(Error::invalid("lora_linear", "a group of no projections"));
        }
        for p in projections {
            validate(x, p)?;
        }
        if projections.iter().any(|p| p.adapter.is_some_and(|ad| ad.config.use_dora)) {
            return projections
                .iter()
                .map(|p| self.lora_linear(x, p.base, p.bias, p.adapter, p.dropout_seed))
                .collect();
        }
        self.lora_group(x, projections, Value::Computed)
    }

    /// [`Tape::lora_linear_group`] after validation, without DoRA; with [`Value::Unread`] the outputs are zeros and
    /// only what backward reads is computed.
    pub(super) fn lora_group(&self, x: &Var, projections: &[LoraProjection], value: Value) -> Result<Vec<Var>> {
        let bound: Vec<Option<(Var, Var)>> =
            projections.iter().map(|p| p.adapter.map(|ad| (self.param(&ad.lora_a), self.param(&ad.lora_b)))).collect();
        let mut operands = vec![x.value()];
        operands.extend(bound.iter().flatten().flat_map(|(a, b)| [a.value(), b.value()]));
        let p = precision(&operands);
        let in_f = projections[0].base.shape()[1];
        let rows = x.value().elem_count() / in_f;
        let x2 = x.value().reshape(&[rows, in_f])?;
        let x_needs = x.requires_grad();

        let mut lanes = lanes(projections);
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
            let params: Vec<&Param> = lane.members.iter().map(|&i| &adapter(projections, i).lora_a).collect();
            let a = params[0].stacked_with(&params[1..], p)?;
            let u = match lane.dropout {
                Some(d) => d.matmul_t(&x2, &a)?,
                None => matmul(&x2, &a.t()?)?,
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
            lane.a = x_needs.then_some(a);
            lane.u = b_needs.then(|| u.clone());
            us.push(u);
        }

        let shape_of = |member: &Member| {
            let mut shape = x.shape().to_vec();
            *shape.last_mut().expect("validated: x has an input dimension") = member.out_f;
            shape
        };
        let outputs = if value == Value::Unread {
            members.iter().map(|m| Tensor::zeros_on(&shape_of(m), p, x2.device())).collect::<Result<Vec<_>>>()?
        } else {
            // Each adapter's columns of its lane's U, read in place by the up-projection.
            let u_cols = members
                .iter()
                .map(|m| m.adapter.as_ref().map(|ad| us[ad.lane].narrow(1, ad.col, ad.r)).transpose())
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
            let ys = base_products(&bases, &x2, p)?;
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
        };
        let op = LoraGroup {
            precision: p,
            rows,
            x_shape: x.shape().to_vec(),
            x_needs,
            x: lanes.iter().any(|l| l.a_needs).then_some(x2),
            members,
            lanes,
        };
        // Inputs: x, then (A, B, bias) per projection, constants standing in for what a projection lacks.
        let none = Var::constant(Tensor::zeros(&[0], DType::F32));
        let mut inputs = vec![x];
        for (proj, b) in projections.iter().zip(&bound) {
            let (a, b) = b.as_ref().map_or((&none, &none), |(a, b)| (a, b));
            inputs.extend([a, b, proj.bias.unwrap_or(&none)]);
        }
        Ok(self.record(Box::new(op), &inputs, outputs))
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
    /// The stacked A [Σ r, in] in the op's precision, kept for dx (a handle on the parameter's compute copy).
    a: Option<Tensor>,
    /// x_d·Aᵀ [N, Σ r], kept for dB.
    u: Option<Tensor>,
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
    /// The input rows before dropout [N, in], for dA (masks are redrawn from their seeds).
    x: Option<Tensor>,
    members: Vec<Member>,
    lanes: Vec<Lane>,
}

impl Backward for LoraGroup {
    fn name(&self) -> &'static str {
        "lora_linear"
    }

    fn saved_bytes(&self) -> usize {
        // Bases are handles on their owners' storage (dense tensor, NF4 nibbles and scales): they cost nothing.
        let bs = self.members.iter().filter_map(|m| m.adapter.as_ref()).map(|ad| &ad.b);
        bytes_of(self.lanes.iter().flat_map(|l| [&l.a, &l.u]).chain([&self.x]).chain(bs))
    }

    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let rows = self.rows;
        let dys = self
            .members
            .iter()
            .zip(grads)
            .map(|(m, g)| g.as_ref().map(|g| g.reshape(&[rows, m.out_f])).transpose())
            .collect::<Result<Vec<_>>>()?;
        // x, then (A, B, bias) per projection.
        let mut out: Vec<Option<Tensor>> = vec![None; 1 + 3 * self.members.len()];
        for (i, (m, dy)) in self.members.iter().zip(&dys).enumerate() {
            if let (true, Some(dy)) = (m.bias_needs, dy) {
                out[3 + 3 * i] = Some(sum_rows(dy)?);
            }
        }
        // dx's terms: products accumulated into one tensor, then the masked terms of lanes with dropout added into it.
        let mut dx: Option<Tensor> = None;
        let mut dx_products: Vec<(Tensor, Tensor)> = Vec::new();
        let mut dx_masked: Vec<(Tensor, Tensor, Dropout)> = Vec::new();
        for lane in &self.lanes {
            let present: Vec<usize> = lane.members.iter().copied().filter(|&i| dys[i].is_some()).collect();
            // dU has a block per member with a gradient: a member without one (its output unused) leaves a gap in U's
            // columns, so the others go one by one.
            let blocks = if present.len() == lane.members.len() {
                vec![present]
            } else {
                present.into_iter().map(|i| vec![i]).collect()
            };
            for block in blocks {
                let ad = |i: usize| self.members[i].adapter.as_ref().expect("lane members have adapters");
                let dy = |i: usize| dys[i].as_ref().expect("blocks hold members with a gradient");
                for &i in &block {
                    if ad(i).b_needs {
                        let u = saved(&lane.u)?.narrow(1, ad(i).col, ad(i).r)?;
                        out[2 + 3 * i] = Some(matmul_scaled(&dy(i).t()?, &u, ad(i).scaling)?);
                    }
                }
                let a_needs = block.iter().any(|&i| ad(i).a_needs);
                if !(a_needs || self.x_needs) {
                    continue;
                }
                let products = block
                    .iter()
                    .map(|&i| Ok((dy(i), saved(&ad(i).b)?, ad(i).scaling)))
                    .collect::<Result<Vec<(&Tensor, &Tensor, f64)>>>()?;
                let du = matmul_columns(&products)?;
                let (first, width) = (ad(block[0]).col, du.shape()[1]);
                if a_needs {
                    let x = saved(&self.x)?;
                    let xd = match lane.dropout {
                        Some(d) => d.apply(x)?,
                        None => x.clone(),
                    };
                    let d_a = matmul(&du.t()?, &xd)?;
                    for &i in block.iter().filter(|&&i| ad(i).a_needs) {
                        out[1 + 3 * i] = Some(d_a.narrow(0, ad(i).col - first, ad(i).r)?);
                    }
                }
                if self.x_needs {
                    let a = saved(&lane.a)?.narrow(0, first, width)?;
                    match lane.dropout {
                        None => dx_products.push((du, a)),
                        Some(d) => dx_masked.push((du, a, d)),
                    }
                }
            }
        }
        if self.x_needs {
            let p = self.precision;
            // On a GPU the thin du·A products (K = r) go first, so that without dropout the first of them only writes
            // dx and the base GEMMs add into it in their epilogues (as in forward); the CPU keeps its order and bits.
            let on_gpu = dys.iter().flatten().any(|dy| dy.device() != Device::Cpu);
            let (before, after) = if on_gpu { (&dx_products[..], &[][..]) } else { (&[][..], &dx_products[..]) };
            for (du, a) in before {
                accumulate(&mut dx, du, a)?;
            }
            for (m, dy) in self.members.iter().zip(&dys) {
                if let (Some(base), Some(dy)) = (&m.base, dy) {
                    with_weight(base, p, |w| accumulate(&mut dx, dy, w))?;
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
            out[0] = dx.map(|dx| dx.reshape(&self.x_shape)).transpose()?;
        }
        Ok(out)
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
