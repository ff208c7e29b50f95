//! The recorded ops. Each forward calls `qlora_runtime::ops`, saves exactly what its backward reads, and
//! records a [`Backward`] that calls the runtime's backward function. Frozen inputs (constants) make the op
//! skip their gradients entirely.

use crate::tape::{Backward, Tape, Var};
use qlora_runtime::ops::elementwise::{self as ew, Glu};
use qlora_runtime::ops::linalg::matmul;
use qlora_runtime::ops::nn::{self, AttentionParams};
use qlora_runtime::{Error, Result, Tensor};

fn bytes(ts: &[&Option<Tensor>]) -> usize {
    ts.iter().filter_map(|t| t.as_ref()).map(|t| t.size_in_bytes()).sum()
}

/// The gradient of output 0 (recorded ops are only called when some output gradient exists).
fn g0(grads: &[Option<Tensor>]) -> Result<&Tensor> {
    grads.first().and_then(Option::as_ref).ok_or_else(|| Error::invalid("backward", "missing output gradient"))
}

/// `t` when `cond`, for saving only what a needed gradient reads.
fn keep(cond: bool, t: &Tensor) -> Option<Tensor> {
    cond.then(|| t.clone())
}

fn saved(t: &Option<Tensor>) -> Result<&Tensor> {
    t.as_ref().ok_or_else(|| Error::invalid("backward", "a tensor needed for this gradient was not saved"))
}

/// Flattens all leading dimensions: [..., n] → [rows, n].
fn rows2(t: &Tensor) -> Result<Tensor> {
    let n = *t.shape().last().ok_or_else(|| Error::shape("linear", "scalar operand"))?;
    t.reshape(&[t.elem_count() / n.max(1), n])
}

struct MatMul {
    a: Option<Tensor>,
    b: Option<Tensor>,
    a_shape: Vec<usize>,
    b_needs: bool,
    a_needs: bool,
}

impl Backward for MatMul {
    fn name(&self) -> &'static str {
        "matmul"
    }
    fn saved_bytes(&self) -> usize {
        bytes(&[&self.a, &self.b])
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let dc = g0(grads)?;
        let da = if self.a_needs { Some(matmul(dc, &saved(&self.b)?.t()?)?) } else { None };
        let db = if self.b_needs {
            let (a, b) = (saved(&self.a)?, saved(&self.b)?);
            if b.rank() == 2 && a.rank() > 2 {
                // b was shared across the batch: its gradient sums over every batch entry.
                let k = self.a_shape[self.a_shape.len() - 1];
                let a2 = a.reshape(&[a.elem_count() / k, k])?;
                Some(matmul(&a2.t()?, &rows2(dc)?)?)
            } else {
                Some(matmul(&a.t()?, dc)?)
            }
        } else {
            None
        };
        Ok(vec![da, db])
    }
}

struct Linear {
    x: Option<Tensor>,
    w: Option<Tensor>,
    x_needs: bool,
    w_needs: bool,
    b_needs: bool,
}

impl Backward for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn saved_bytes(&self) -> usize {
        bytes(&[&self.x, &self.w])
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let dy = g0(grads)?;
        let dy2 = rows2(dy)?;
        let dx = if self.x_needs {
            let w = saved(&self.w)?;
            let mut shape = dy.shape().to_vec();
            *shape.last_mut().expect("rank ≥ 1") = w.shape()[1];
            Some(matmul(&dy2, w)?.reshape(&shape)?)
        } else {
            None
        };
        let dw = if self.w_needs { Some(matmul(&dy2.t()?, &rows2(saved(&self.x)?)?)?) } else { None };
        let db = if self.b_needs { Some(ew::sum_rows(dy)?) } else { None };
        Ok(vec![dx, dw, db])
    }
}

struct Add;

impl Backward for Add {
    fn name(&self) -> &'static str {
        "add"
    }
    fn saved_bytes(&self) -> usize {
        0
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let g = g0(grads)?;
        Ok(vec![Some(g.clone()), Some(g.clone())])
    }
}

struct Mul {
    a: Option<Tensor>,
    b: Option<Tensor>,
}

impl Backward for Mul {
    fn name(&self) -> &'static str {
        "mul"
    }
    fn saved_bytes(&self) -> usize {
        bytes(&[&self.a, &self.b])
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let g = g0(grads)?;
        // a's gradient needs b and vice versa; each was saved only if the other needs a gradient.
        let da = self.b.as_ref().map(|b| ew::mul(g, b)).transpose()?;
        let db = self.a.as_ref().map(|a| ew::mul(g, a)).transpose()?;
        Ok(vec![da, db])
    }
}

struct Scale(f64);

impl Backward for Scale {
    fn name(&self) -> &'static str {
        "scale"
    }
    fn saved_bytes(&self) -> usize {
        0
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(ew::scale(g0(grads)?, self.0)?)])
    }
}

struct Reshape(Vec<usize>);

impl Backward for Reshape {
    fn name(&self) -> &'static str {
        "reshape"
    }
    fn saved_bytes(&self) -> usize {
        0
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(g0(grads)?.reshape(&self.0)?)])
    }
}

struct Sum(Vec<usize>);

impl Backward for Sum {
    fn name(&self) -> &'static str {
        "sum"
    }
    fn saved_bytes(&self) -> usize {
        0
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let g = g0(grads)?;
        let v = g.to_scalar::<f64>()?;
        Ok(vec![Some(Tensor::full(&self.0, v, g.dtype()).to_device(g.device())?)])
    }
}

struct Embedding {
    ids: Tensor,
    table_shape: Vec<usize>,
}

impl Backward for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }
    fn saved_bytes(&self) -> usize {
        self.ids.size_in_bytes()
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let g = g0(grads)?;
        let mut d_table = Tensor::zeros(&self.table_shape, g.dtype()).to_device(g.device())?;
        nn::embedding_backward_accumulate(g, &self.ids, &mut d_table)?;
        Ok(vec![Some(d_table)])
    }
}

struct RmsNorm {
    x: Tensor,
    w: Tensor,
    rstd: Tensor,
    offset: f64,
    x_needs: bool,
    w_needs: bool,
}

impl Backward for RmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm"
    }
    fn saved_bytes(&self) -> usize {
        self.x.size_in_bytes() + self.rstd.size_in_bytes()
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let (dx, dw) = nn::rms_norm_backward(&self.x, &self.w, &self.rstd, g0(grads)?, self.offset)?;
        Ok(vec![self.x_needs.then_some(dx), self.w_needs.then_some(dw)])
    }
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Backward for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn saved_bytes(&self) -> usize {
        self.cos.size_in_bytes() + self.sin.size_in_bytes()
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(nn::rope_backward(g0(grads)?, &self.cos, &self.sin)?)])
    }
}

struct Attention {
    p: AttentionParams,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
}

impl Backward for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn saved_bytes(&self) -> usize {
        [&self.q, &self.k, &self.v, &self.out, &self.lse, &self.cu_q, &self.cu_k]
            .iter()
            .map(|t| t.size_in_bytes())
            .sum()
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let s = *self;
        let (dq, dk, dv) =
            nn::attention_backward(&s.p, &s.q, &s.k, &s.v, &s.out, &s.lse, g0(grads)?, &s.cu_q, &s.cu_k)?;
        Ok(vec![Some(dq), Some(dk), Some(dv)])
    }
}

struct GatedUnit {
    kind: Glu,
    gate: Tensor,
    up: Tensor,
}

impl Backward for GatedUnit {
    fn name(&self) -> &'static str {
        "glu"
    }
    fn saved_bytes(&self) -> usize {
        self.gate.size_in_bytes() + self.up.size_in_bytes()
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let (dg, du) = ew::glu_backward(self.kind, &self.gate, &self.up, g0(grads)?)?;
        Ok(vec![Some(dg), Some(du)])
    }
}

/// silu or tanh-gelu of one input.
struct Activation {
    x: Tensor,
    backward: fn(&Tensor, &Tensor) -> Result<Tensor>,
}

impl Backward for Activation {
    fn name(&self) -> &'static str {
        "activation"
    }
    fn saved_bytes(&self) -> usize {
        self.x.size_in_bytes()
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some((self.backward)(&self.x, g0(grads)?)?)])
    }
}

struct Softcap {
    x: Tensor,
    cap: f64,
}

impl Backward for Softcap {
    fn name(&self) -> &'static str {
        "softcap"
    }
    fn saved_bytes(&self) -> usize {
        self.x.size_in_bytes()
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(ew::softcap_backward(&self.x, self.cap, g0(grads)?)?)])
    }
}

struct CrossEntropy {
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    normalizer: f64,
}

impl Backward for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
    fn saved_bytes(&self) -> usize {
        self.logits.size_in_bytes() + self.targets.size_in_bytes() + self.lse.size_in_bytes()
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let g = g0(grads)?.to_scalar::<f64>()? / self.normalizer;
        let d_loss = Tensor::full(&[self.lse.elem_count()], g, self.logits.dtype()).to_device(self.logits.device())?;
        Ok(vec![Some(nn::cross_entropy_backward(&self.logits, &self.targets, &self.lse, &d_loss)?)])
    }
}

impl Tape {
    /// a: [batch..., m, k] · b: [batch..., k, n] or [k, n].
    pub fn matmul(&self, a: &Var, b: &Var) -> Result<Var> {
        let c = matmul(a.value(), b.value())?;
        let op = MatMul {
            a: keep(b.requires_grad(), a.value()),
            b: Some(b.value().clone()).filter(|_| a.requires_grad() || b.requires_grad()),
            a_shape: a.shape().to_vec(),
            a_needs: a.requires_grad(),
            b_needs: b.requires_grad(),
        };
        Ok(self.record1(Box::new(op), &[a, b], c))
    }

    /// y = x·wᵀ + bias, the Hugging Face `nn.Linear` layout. x: [..., in], w: [out, in], bias: [out] → [..., out].
    pub fn linear(&self, x: &Var, w: &Var, bias: Option<&Var>) -> Result<Var> {
        let [out_f, in_f] = *w.shape() else {
            return Err(Error::shape("linear", format!("weight must be [out, in], got {:?}", w.shape())));
        };
        if x.shape().last() != Some(&in_f) {
            return Err(Error::shape("linear", format!("input {:?} for weight {:?}", x.shape(), w.shape())));
        }
        let mut y = matmul(&rows2(x.value())?, &w.value().t()?)?;
        if let Some(b) = bias {
            y = ew::add_bias(&y, b.value())?;
        }
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("checked rank ≥ 1") = out_f;
        let y = y.reshape(&shape)?;
        let op = Linear {
            x: keep(w.requires_grad(), x.value()),
            w: keep(x.requires_grad(), w.value()),
            x_needs: x.requires_grad(),
            w_needs: w.requires_grad(),
            b_needs: bias.is_some_and(Var::requires_grad),
        };
        let none = Var::constant(Tensor::zeros(&[0], y.dtype()));
        Ok(self.record1(Box::new(op), &[x, w, bias.unwrap_or(&none)], y))
    }

    pub fn add(&self, a: &Var, b: &Var) -> Result<Var> {
        Ok(self.record1(Box::new(Add), &[a, b], ew::add(a.value(), b.value())?))
    }

    pub fn mul(&self, a: &Var, b: &Var) -> Result<Var> {
        let op = Mul { a: keep(b.requires_grad(), a.value()), b: keep(a.requires_grad(), b.value()) };
        Ok(self.record1(Box::new(op), &[a, b], ew::mul(a.value(), b.value())?))
    }

    pub fn scale(&self, x: &Var, s: f64) -> Result<Var> {
        Ok(self.record1(Box::new(Scale(s)), &[x], ew::scale(x.value(), s)?))
    }

    pub fn reshape(&self, x: &Var, shape: &[usize]) -> Result<Var> {
        let y = x.value().reshape(shape)?;
        Ok(self.record1(Box::new(Reshape(x.shape().to_vec())), &[x], y))
    }

    /// Σ x as a scalar.
    pub fn sum(&self, x: &Var) -> Result<Var> {
        Ok(self.record1(Box::new(Sum(x.shape().to_vec())), &[x], ew::sum(x.value())?))
    }

    /// table: [vocab, dim], ids: [...] (I32) → [..., dim].
    pub fn embedding(&self, table: &Var, ids: &Tensor) -> Result<Var> {
        let y = nn::embedding(table.value(), ids)?;
        let op = Embedding { ids: ids.clone(), table_shape: table.shape().to_vec() };
        Ok(self.record1(Box::new(op), &[table], y))
    }

    /// RMSNorm over the last dimension; offset 0 for Llama, 1 for Gemma's (1 + w).
    pub fn rms_norm(&self, x: &Var, w: &Var, eps: f64, offset: f64) -> Result<Var> {
        let (y, rstd) = nn::rms_norm(x.value(), w.value(), eps, offset)?;
        let op = RmsNorm {
            x: x.value().clone(),
            w: w.value().clone(),
            rstd,
            offset,
            x_needs: x.requires_grad(),
            w_needs: w.requires_grad(),
        };
        Ok(self.record1(Box::new(op), &[x, w], y))
    }

    /// Rotary embedding of x: [tokens, heads, head_dim] with tables from `nn::rope_tables`.
    pub fn rope(&self, x: &Var, cos: &Tensor, sin: &Tensor) -> Result<Var> {
        let y = nn::rope(x.value(), cos, sin)?;
        Ok(self.record1(Box::new(Rope { cos: cos.clone(), sin: sin.clone() }), &[x], y))
    }

    /// Packed causal/sliding/softcapped GQA attention (see `qlora_runtime::ops::nn::attention`).
    pub fn attention(
        &self,
        p: &AttentionParams,
        q: &Var,
        k: &Var,
        v: &Var,
        cu_seqlens_q: &Tensor,
        cu_seqlens_k: &Tensor,
    ) -> Result<Var> {
        let (out, lse) = nn::attention(p, q.value(), k.value(), v.value(), cu_seqlens_q, cu_seqlens_k)?;
        let op = Attention {
            p: *p,
            q: q.value().clone(),
            k: k.value().clone(),
            v: v.value().clone(),
            out: out.clone(),
            lse,
            cu_q: cu_seqlens_q.clone(),
            cu_k: cu_seqlens_k.clone(),
        };
        Ok(self.record1(Box::new(op), &[q, k, v], out))
    }

    /// act(gate) ⊙ up for SwiGLU (Llama) or GeGLU (Gemma).
    pub fn glu(&self, kind: Glu, gate: &Var, up: &Var) -> Result<Var> {
        let y = ew::glu(kind, gate.value(), up.value())?;
        let op = GatedUnit { kind, gate: gate.value().clone(), up: up.value().clone() };
        Ok(self.record1(Box::new(op), &[gate, up], y))
    }

    pub fn silu(&self, x: &Var) -> Result<Var> {
        let op = Activation { x: x.value().clone(), backward: ew::silu_backward };
        Ok(self.record1(Box::new(op), &[x], ew::silu(x.value())?))
    }

    pub fn gelu_tanh(&self, x: &Var) -> Result<Var> {
        let op = Activation { x: x.value().clone(), backward: ew::gelu_tanh_backward };
        Ok(self.record1(Box::new(op), &[x], ew::gelu_tanh(x.value())?))
    }

    /// cap·tanh(x/cap).
    pub fn softcap(&self, x: &Var, cap: f64) -> Result<Var> {
        let y = ew::softcap(x.value(), cap)?;
        Ok(self.record1(Box::new(Softcap { x: x.value().clone(), cap }), &[x], y))
    }

    /// Σ over rows of −log softmax(logits)[target] ÷ `normalizer`, skipping targets of −100.
    /// The caller picks the normalizer: the trained-token count of this micro-batch, or of the whole
    /// accumulated batch so that gradient accumulation weighs every token equally.
    pub fn cross_entropy(&self, logits: &Var, targets: &Tensor, normalizer: f64) -> Result<Var> {
        if normalizer.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return Err(Error::invalid("cross_entropy", format!("normalizer must be > 0, got {normalizer}")));
        }
        let (losses, lse) = nn::cross_entropy(logits.value(), targets)?;
        let total = ew::scale(&ew::sum(&losses)?, 1.0 / normalizer)?;
        let op = CrossEntropy { logits: logits.value().clone(), targets: targets.clone(), lse, normalizer };
        Ok(self.record1(Box::new(op), &[logits], total))
    }
}
