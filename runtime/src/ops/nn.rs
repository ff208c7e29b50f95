//! The transformer ops: embedding, RMSNorm, rotary embedding, attention, cross-entropy. Each returns what its
//! backward needs (rstd, log-sum-exp) beside its output, so `autograd` can save exactly that.

use super::{indices, rows_cols, same_shape, tensor, with_compute};
use crate::{Error, Result, Tensor};
use qlora_kernels::attention::{attention_backward as attn_bwd, attention_forward as attn_fwd};
use qlora_kernels::{cross_entropy as ce, embedding as emb, rms_norm as rms, rope};

pub use qlora_kernels::attention::AttentionParams;
pub use qlora_kernels::cross_entropy::IGNORE_INDEX;

fn check_ids(op: &'static str, ids: &[i32], bound: usize) -> Result<()> {
    match ids.iter().find(|&&i| i < 0 || i as usize >= bound) {
        Some(&bad) => Err(Error::Index { op, what: "token id", value: bad as i64, bound }),
        None => Ok(()),
    }
}

/// table: [vocab, dim], ids: [n...] (I32) → [n..., dim].
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (vocab, dim) = rows_cols("embedding", table)?;
    if table.rank() != 2 {
        return Err(Error::shape("embedding", format!("table must be [vocab, dim], got {:?}", table.shape())));
    }
    let idv = indices("embedding", "ids", ids)?;
    check_ids("embedding", &idv, vocab)?;
    let mut shape = ids.shape().to_vec();
    shape.push(dim);
    with_compute!("embedding", [table], |T| {
        let mut out = vec![T::default(); idv.len() * dim];
        emb::embedding_forward(&table.values::<T>(), &idv, dim, &mut out);
        Ok(tensor(out, &shape))
    })
}

/// d_table[ids[i]] += d_out[i], into `d_table` (dtype kept).
pub fn embedding_backward_accumulate(d_out: &Tensor, ids: &Tensor, d_table: &mut Tensor) -> Result<()> {
    let (vocab, dim) = rows_cols("embedding_backward", d_table)?;
    let idv = indices("embedding_backward", "ids", ids)?;
    check_ids("embedding_backward", &idv, vocab)?;
    if d_out.elem_count() != idv.len() * dim {
        return Err(Error::shape(
            "embedding_backward",
            format!("d_out {:?} for {} ids of dim {dim}", d_out.shape(), idv.len()),
        ));
    }
    with_compute!("embedding_backward", [d_out, &*d_table], |T| {
        let d = d_out.values::<T>();
        if d_table.dtype() == <T as crate::Element>::DTYPE {
            d_table.update::<T>(|t| emb::embedding_backward_accumulate(&d, &idv, dim, t))
        } else {
            let mut acc = d_table.to_vec::<T>();
            emb::embedding_backward_accumulate(&d, &idv, dim, &mut acc);
            *d_table = tensor(acc, d_table.shape()).to_dtype(d_table.dtype());
            Ok(())
        }
    })
}

/// x: [..., dim], weight: [dim] → (y: [..., dim], rstd: [rows]); y = x·rstd·(offset + w).
/// offset 0 is Llama's RMSNorm, 1 is Gemma's (1 + w).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, offset: f64) -> Result<(Tensor, Tensor)> {
    let (rows, dim) = rows_cols("rms_norm", x)?;
    if weight.shape() != [dim] {
        return Err(Error::shape("rms_norm", format!("weight {:?} for input {:?}", weight.shape(), x.shape())));
    }
    with_compute!("rms_norm", [x, weight], |T| {
        let (mut y, mut rstd) = (vec![T::default(); x.elem_count()], vec![T::default(); rows]);
        rms::rms_norm_forward(&x.values::<T>(), &weight.values::<T>(), dim, eps as T, offset as T, &mut y, &mut rstd);
        Ok((tensor(y, x.shape()), tensor(rstd, &[rows])))
    })
}

/// → (dx, dw) of [`rms_norm`].
pub fn rms_norm_backward(
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    offset: f64,
) -> Result<(Tensor, Tensor)> {
    same_shape("rms_norm_backward", x, dy)?;
    let (_, dim) = rows_cols("rms_norm_backward", x)?;
    with_compute!("rms_norm_backward", [x, weight, rstd, dy], |T| {
        let (mut dx, mut dw) = (vec![T::default(); x.elem_count()], vec![T::default(); dim]);
        rms::rms_norm_backward(
            &x.values::<T>(),
            &weight.values::<T>(),
            &rstd.values::<T>(),
            &dy.values::<T>(),
            dim,
            offset as T,
            &mut dx,
            &mut dw,
        );
        Ok((tensor(dx, x.shape()), tensor(dw, &[dim])))
    })
}

/// Rotary tables for `positions` ([tokens], I32) and `inv_freq` ([head_dim/2]) → (cos, sin): [tokens, head_dim/2],
/// in inv_freq's precision.
pub fn rope_tables(positions: &Tensor, inv_freq: &Tensor) -> Result<(Tensor, Tensor)> {
    let pos = indices("rope_tables", "positions", positions)?;
    if let Some(&p) = pos.iter().find(|&&p| p < 0) {
        return Err(Error::Index { op: "rope_tables", what: "position", value: p as i64, bound: i32::MAX as usize });
    }
    let half = inv_freq.elem_count();
    with_compute!("rope_tables", [inv_freq], |T| {
        let (mut cos, mut sin) = (vec![T::default(); pos.len() * half], vec![T::default(); pos.len() * half]);
        rope::rope_tables(&pos, &inv_freq.values::<T>(), &mut cos, &mut sin);
        Ok((tensor(cos, &[pos.len(), half]), tensor(sin, &[pos.len(), half])))
    })
}

fn rope_shapes(op: &'static str, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(usize, usize)> {
    let [tokens, heads, head_dim] = *x.shape() else {
        return Err(Error::shape(op, format!("x must be [tokens, heads, head_dim], got {:?}", x.shape())));
    };
    if head_dim % 2 != 0 || cos.shape() != [tokens, head_dim / 2] || sin.shape() != cos.shape() {
        return Err(Error::shape(op, format!("x {:?} with cos {:?}, sin {:?}", x.shape(), cos.shape(), sin.shape())));
    }
    Ok((heads, head_dim))
}

/// x: [tokens, heads, head_dim] rotated by (cos, sin) from [`rope_tables`] (rotate-half convention).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (heads, head_dim) = rope_shapes("rope", x, cos, sin)?;
    with_compute!("rope", [x, cos, sin], |T| {
        let mut y = vec![T::default(); x.elem_count()];
        rope::rope_forward(&x.values::<T>(), &cos.values::<T>(), &sin.values::<T>(), heads, head_dim, &mut y);
        Ok(tensor(y, x.shape()))
    })
}

pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (heads, head_dim) = rope_shapes("rope_backward", dy, cos, sin)?;
    with_compute!("rope_backward", [dy, cos, sin], |T| {
        let mut dx = vec![T::default(); dy.elem_count()];
        rope::rope_backward(&dy.values::<T>(), &cos.values::<T>(), &sin.values::<T>(), heads, head_dim, &mut dx);
        Ok(tensor(dx, dy.shape()))
    })
}

/// Validated packed-sequence boundaries for attention.
fn check_cu_seqlens(cu: &[i32], total: usize, what: &'static str) -> Result<()> {
    let ok = cu.first() == Some(&0) && cu.last() == Some(&(total as i32)) && cu.windows(2).all(|w| w[0] <= w[1]);
    if !ok {
        return Err(Error::invalid(
            "attention",
            format!("{what} must start at 0, never decrease and end at {total} (the token count), got {cu:?}"),
        ));
    }
    Ok(())
}

fn attention_shapes(p: &AttentionParams, q: &Tensor, k: &Tensor, v: &Tensor, cq: &[i32], ck: &[i32]) -> Result<()> {
    if p.n_kv_heads == 0 || p.n_heads % p.n_kv_heads != 0 {
        return Err(Error::invalid("attention", format!("{} query heads over {} KV heads", p.n_heads, p.n_kv_heads)));
    }
    let qs = [q.shape().first().copied().unwrap_or(0), p.n_heads, p.head_dim];
    let ks = [k.shape().first().copied().unwrap_or(0), p.n_kv_heads, p.head_dim];
    if q.shape() != qs || k.shape() != ks || v.shape() != ks {
        return Err(Error::shape(
            "attention",
            format!("q {:?}, k {:?}, v {:?} for {p:?}", q.shape(), k.shape(), v.shape()),
        ));
    }
    check_cu_seqlens(cq, qs[0], "cu_seqlens_q")?;
    check_cu_seqlens(ck, ks[0], "cu_seqlens_k")?;
    if cq.len() != ck.len() {
        return Err(Error::invalid("attention", "cu_seqlens_q and cu_seqlens_k describe different sequence counts"));
    }
    let longer_q = cq.windows(2).zip(ck.windows(2)).any(|(a, b)| a[1] - a[0] > b[1] - b[0]);
    if p.causal && longer_q {
        return Err(Error::invalid("attention", "a sequence has more queries than keys"));
    }
    Ok(())
}

/// Packed variable-length attention (see `qlora_kernels::attention`).
/// q: [tq, n_heads, head_dim], k, v: [tk, n_kv_heads, head_dim], cu_seqlens_q/k: [n_seqs + 1] (I32)
/// → (out: [tq, n_heads, head_dim], lse: [tq, n_heads]).
pub fn attention(
    p: &AttentionParams,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens_q: &Tensor,
    cu_seqlens_k: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let cq = indices("attention", "cu_seqlens_q", cu_seqlens_q)?;
    let ck = indices("attention", "cu_seqlens_k", cu_seqlens_k)?;
    attention_shapes(p, q, k, v, &cq, &ck)?;
    let tq = q.shape()[0];
    with_compute!("attention", [q, k, v], |T| {
        let (mut out, mut lse) = (vec![T::default(); q.elem_count()], vec![T::default(); tq * p.n_heads]);
        attn_fwd(p, &q.values::<T>(), &k.values::<T>(), &v.values::<T>(), &cq, &ck, &mut out, &mut lse);
        Ok((tensor(out, q.shape()), tensor(lse, &[tq, p.n_heads])))
    })
}

/// → (dq, dk, dv) of [`attention`].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    p: &AttentionParams,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    d_out: &Tensor,
    cu_seqlens_q: &Tensor,
    cu_seqlens_k: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let cq = indices("attention_backward", "cu_seqlens_q", cu_seqlens_q)?;
    let ck = indices("attention_backward", "cu_seqlens_k", cu_seqlens_k)?;
    attention_shapes(p, q, k, v, &cq, &ck)?;
    same_shape("attention_backward", q, d_out)?;
    with_compute!("attention_backward", [q, k, v, out, lse, d_out], |T| {
        let (mut dq, mut dk, mut dv) = (
            vec![T::default(); q.elem_count()],
            vec![T::default(); k.elem_count()],
            vec![T::default(); v.elem_count()],
        );
        attn_bwd(
            p,
            &q.values::<T>(),
            &k.values::<T>(),
            &v.values::<T>(),
            &out.values::<T>(),
            &lse.values::<T>(),
            &d_out.values::<T>(),
            &cq,
            &ck,
            &mut dq,
            &mut dk,
            &mut dv,
        );
        Ok((tensor(dq, q.shape()), tensor(dk, k.shape()), tensor(dv, v.shape())))
    })
}

fn check_targets(logits: &Tensor, targets: &Tensor) -> Result<(usize, usize)> {
    let (rows, vocab) = rows_cols("cross_entropy", logits)?;
    if targets.elem_count() != rows {
        return Err(Error::shape(
            "cross_entropy",
            format!("{} targets for logits {:?}", targets.elem_count(), logits.shape()),
        ));
    }
    Ok((rows, vocab))
}

/// logits: [..., vocab], targets: [...] (I32; IGNORE_INDEX = −100 skipped) → (loss per row, lse per row).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let (rows, vocab) = check_targets(logits, targets)?;
    let t = indices("cross_entropy", "targets", targets)?;
    if let Some(&bad) = t.iter().find(|&&x| x != IGNORE_INDEX && (x < 0 || x as usize >= vocab)) {
        return Err(Error::Index { op: "cross_entropy", what: "target", value: bad as i64, bound: vocab });
    }
    with_compute!("cross_entropy", [logits], |T| {
        let (mut loss, mut lse) = (vec![T::default(); rows], vec![T::default(); rows]);
        ce::cross_entropy_forward(&logits.values::<T>(), &t, vocab, &mut loss, &mut lse);
        Ok((tensor(loss, &[rows]), tensor(lse, &[rows])))
    })
}

/// d_logits of [`cross_entropy`] given the per-row upstream gradient d_loss: [rows].
pub fn cross_entropy_backward(logits: &Tensor, targets: &Tensor, lse: &Tensor, d_loss: &Tensor) -> Result<Tensor> {
    let (rows, vocab) = check_targets(logits, targets)?;
    if d_loss.elem_count() != rows || lse.elem_count() != rows {
        return Err(Error::shape("cross_entropy_backward", format!("d_loss/lse must have {rows} rows")));
    }
    let t = indices("cross_entropy_backward", "targets", targets)?;
    with_compute!("cross_entropy_backward", [logits, lse, d_loss], |T| {
        let mut d = vec![T::default(); logits.elem_count()];
        ce::cross_entropy_backward(&logits.values::<T>(), &t, &lse.values::<T>(), &d_loss.values::<T>(), vocab, &mut d);
        Ok(tensor(d, logits.shape()))
    })
}
