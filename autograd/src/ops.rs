//! The recorded ops: each method runs its runtime op (`qlora_runtime::ops::<op>::<op>_op`, which holds the forward,
//! the backward and what it saves) through [`Tape::apply`]. Constants (frozen inputs) make an op save nothing for
//! their gradients.

use crate::tape::{Tape, Var};
use qlora_runtime::ops::activation::{self as act, Glu};
use qlora_runtime::ops::attention::{attention_op, AttentionParams, SeqLens};
use qlora_runtime::ops::concat::{cat_rows_op, split_rows_op};
use qlora_runtime::ops::cross_entropy::cross_entropy_op;
use qlora_runtime::ops::elementwise as ew;
use qlora_runtime::ops::embedding::embedding_op;
use qlora_runtime::ops::linalg::{linear_op, matmul_op};
use qlora_runtime::ops::reduce::sum_op;
use qlora_runtime::ops::rms_norm::{add_rms_norm_op, rms_norm_op};
use qlora_runtime::ops::rope::{rope_op, rope_qk_op};
use qlora_runtime::{DType, Result, Tensor};

impl Tape {
    /// a: [batch..., m, k] · b: [batch..., k, n] or [k, n].
    pub fn matmul(&self, a: &Var, b: &Var) -> Result<Var> {
        self.apply([a, b], |[a, b], needs| matmul_op(a, b, needs))
    }

    /// y = x·wᵀ + bias, the Hugging Face `nn.Linear` layout. x: [..., in], w: [out, in], bias: \[out\] → [..., out].
    pub fn linear(&self, x: &Var, w: &Var, bias: Option<&Var>) -> Result<Var> {
        let none = Var::constant(Tensor::zeros(&[0], DType::F32));
        let bias_var = bias.unwrap_or(&none);
        self.apply([x, w, bias_var], |[x, w, b], needs| {
            linear_op(x, w, bias.map(|_| b), [needs[0], needs[1], bias.is_some() && needs[2]])
        })
    }

    pub fn add(&self, a: &Var, b: &Var) -> Result<Var> {
        self.apply([a, b], |[a, b], _| ew::add_op(a, b))
    }

    pub fn mul(&self, a: &Var, b: &Var) -> Result<Var> {
        self.apply([a, b], |[a, b], needs| ew::mul_op(a, b, needs))
    }

    pub fn scale(&self, x: &Var, s: f64) -> Result<Var> {
        self.apply([x], |[x], _| ew::scale_op(x, s))
    }

    pub fn reshape(&self, x: &Var, shape: &[usize]) -> Result<Var> {
        self.apply([x], |[x], _| ew::reshape_op(x, shape))
    }

    /// x: [rows, ...] as blocks of `chunk` rows (the last shorter), each its own variable: parts of a computation
    /// that runs a block of tokens at a time. Joined back with [`Tape::cat_rows`].
    pub fn split_rows(&self, x: &Var, chunk: usize) -> Result<Vec<Var>> {
        let (parts, grad) = split_rows_op(x.value(), chunk)?;
        Ok(self.record(grad, &[x], parts))
    }

    /// Parts of one shape but their rows, stacked along the rows.
    pub fn cat_rows(&self, parts: &[Var]) -> Result<Var> {
        let values: Vec<Tensor> = parts.iter().map(|p| p.value().clone()).collect();
        let (y, grad) = cat_rows_op(&values)?;
        let inputs: Vec<&Var> = parts.iter().collect();
        Ok(self.record1(grad, &inputs, y))
    }

    /// Σ x as a scalar.
    pub fn sum(&self, x: &Var) -> Result<Var> {
        self.apply([x], |[x], _| sum_op(x))
    }

    /// table: [vocab, dim], ids: [...] (I32) → [..., dim].
    pub fn embedding(&self, table: &Var, ids: &Tensor) -> Result<Var> {
        self.apply([table], |[table], _| embedding_op(table, ids))
    }

    /// RMSNorm over the last dimension; offset 0 for Llama, 1 for Gemma's (1 + w).
    pub fn rms_norm(&self, x: &Var, w: &Var, eps: f64, offset: f64) -> Result<Var> {
        self.apply([x, w], |[x, w], needs| rms_norm_op(x, w, eps, offset, needs))
    }

    /// (h, y) = (x + residual, rms_norm(x + residual)) in one pass: the residual stream's add and the norm that reads
    /// it, fused (the same bits as [`Tape::add`] then [`Tape::rms_norm`] on the CPU).
    pub fn add_rms_norm(&self, x: &Var, residual: &Var, w: &Var, eps: f64, offset: f64) -> Result<(Var, Var)> {
        let needs = [x.requires_grad(), residual.requires_grad(), w.requires_grad()];
        let (outs, grad) = add_rms_norm_op(x.value(), residual.value(), w.value(), eps, offset, needs)?;
        let mut vars = self.record(grad, &[x, residual, w], outs);
        let y = vars.pop().expect("two outputs recorded");
        Ok((vars.pop().expect("two outputs recorded"), y))
    }

    /// Rotary embedding of x: [tokens, heads, head_dim] with tables from `qlora_runtime::ops::rope::rope_tables`.
    pub fn rope(&self, x: &Var, cos: &Tensor, sin: &Tensor) -> Result<Var> {
        self.apply([x], |[x], _| rope_op(x, cos, sin))
    }

    /// [`Tape::rope`] of q and k by the same tables, in one launch on a GPU.
    pub fn rope_qk(&self, q: &Var, k: &Var, cos: &Tensor, sin: &Tensor) -> Result<(Var, Var)> {
        let (outs, grad) = rope_qk_op(q.value(), k.value(), cos, sin)?;
        let mut vars = self.record(grad, &[q, k], outs);
        let k = vars.pop().expect("two outputs recorded");
        Ok((vars.pop().expect("two outputs recorded"), k))
    }

    /// Packed causal/sliding/softcapped GQA attention (see `qlora_runtime::ops::attention`).
    pub fn attention(
        &self,
        p: &AttentionParams,
        q: &Var,
        k: &Var,
        v: &Var,
        cu_seqlens_q: &SeqLens,
        cu_seqlens_k: &SeqLens,
    ) -> Result<Var> {
        self.apply([q, k, v], |[q, k, v], _| attention_op(p, [q, k, v], [cu_seqlens_q, cu_seqlens_k]))
    }

    /// act(gate) ⊙ up for SwiGLU (Llama) or GeGLU (Gemma).
    pub fn glu(&self, kind: Glu, gate: &Var, up: &Var) -> Result<Var> {
        self.apply([gate, up], |[gate, up], _| act::glu_op(kind, gate, up))
    }

    pub fn silu(&self, x: &Var) -> Result<Var> {
        self.apply([x], |[x], _| act::silu_op(x))
    }

    pub fn gelu_tanh(&self, x: &Var) -> Result<Var> {
        self.apply([x], |[x], _| act::gelu_tanh_op(x))
    }

    /// cap·tanh(x/cap).
    pub fn softcap(&self, x: &Var, cap: f64) -> Result<Var> {
        self.apply([x], |[x], _| act::softcap_op(x, cap))
    }

    /// Σ over rows of −log softmax(logits)\[target\] ÷ `normalizer`, skipping targets of −100. The caller picks the
    /// normalizer: the trained-token count of this micro-batch, or of the whole accumulated batch so that gradient
    /// accumulation weighs every token equally.
    pub fn cross_entropy(&self, logits: &Var, targets: &Tensor, normalizer: f64) -> Result<Var> {
        self.apply([logits], |[logits], _| cross_entropy_op(logits, targets, normalizer))
    }
}
