//! The transformer ops: embedding, RMSNorm, rotary embedding, attention, cross-entropy. Each returns what its
//! backward needs (rstd, log-sum-exp) beside its output, so `autograd` can save exactly that.

use super::{indices, rows_cols, same_shape, tensor, with_compute};
use crate::cuda::{buf, buffer_mut, output, with_gpu, Gpu};
use crate::{DType, Error, Result, Tensor};
use qlora_kernels::attention::{attention_backward as attn_bwd, attention_forward as attn_fwd};
use qlora_kernels::cuda::{
    attention as gattn, cross_entropy as gce, embedding as gemb, rms_norm as grms, rope as grope,
};
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
    if let Some(g) = Gpu::of("embedding", &[table])? {
        return with_gpu!(g, |T| {
            let (table, ids) = (g.input(table)?, g.index("ids", ids)?);
            let mut out = g.alloc::<T>(idv.len() * dim)?;
            g.run(gemb::embedding_forward(buf::<T>(&table), buf(&ids), dim, &mut out))?;
            Ok(output(out, &shape))
        });
    }
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
    if let Some(g) = Gpu::of("embedding_backward", &[d_out, &*d_table])? {
        // d_out is cast to the table gradient's dtype, which accumulates in place.
        let (d, ids) = (g.input_as(d_out, d_table.dtype())?, g.index("ids", ids)?);
        return match d_table.dtype() {
            DType::BF16 => g.run(gemb::embedding_backward_accumulate(
                buf(&d),
                buf(&ids),
                dim,
                buffer_mut::<half::bf16>("embedding_backward", d_table)?,
            )),
            _ => g.run(gemb::embedding_backward_accumulate(
                buf(&d),
                buf(&ids),
                dim,
                buffer_mut::<f32>("embedding_backward", d_table)?,
            )),
        };
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
/// offset 0 is Llama's RMSNorm, 1 is Gemma's (1 + w). On CUDA rstd is f32 whatever x's dtype.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, offset: f64) -> Result<(Tensor, Tensor)> {
    let (rows, dim) = rows_cols("rms_norm", x)?;
    if weight.shape() != [dim] {
        return Err(Error::shape("rms_norm", format!("weight {:?} for input {:?}", weight.shape(), x.shape())));
    }
    if let Some(g) = Gpu::of("rms_norm", &[x, weight])? {
        return with_gpu!(g, |T| {
            let (xi, w) = (g.input(x)?, g.input(weight)?);
            let (mut y, mut rstd) = (g.alloc::<T>(x.elem_count())?, g.alloc::<f32>(rows)?);
            g.run(grms::rms_norm_forward(buf::<T>(&xi), buf(&w), dim, eps as f32, offset as f32, &mut y, &mut rstd))?;
            Ok((output(y, x.shape()), output(rstd, &[rows])))
        });
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
    let (rows, dim) = rows_cols("rms_norm_backward", x)?;
    if rstd.elem_count() != rows || weight.shape() != [dim] {
        return Err(Error::shape(
            "rms_norm_backward",
            format!("x {:?} with weight {:?} and rstd {:?}", x.shape(), weight.shape(), rstd.shape()),
        ));
    }
    if let Some(g) = Gpu::of("rms_norm_backward", &[x, weight, rstd, dy])? {
        return with_gpu!(g, |T| {
            let (xi, w, dyi) = (g.input(x)?, g.input(weight)?, g.input(dy)?);
            let r = g.input_as(rstd, DType::F32)?;
            let (mut dx, mut dw) = (g.alloc::<T>(x.elem_count())?, g.alloc::<T>(dim)?);
            g.run(grms::rms_norm_backward(
                buf::<T>(&xi),
                buf(&w),
                buf(&r),
                buf(&dyi),
                dim,
                offset as f32,
                &mut dx,
                &mut dw,
            ))?;
            Ok((output(dx, x.shape()), output(dw, &[dim])))
        });
    }
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
    if let Some(g) = Gpu::of("rope", &[x, cos, sin])? {
        return with_gpu!(g, |T| {
            let xi = g.input(x)?;
            let (c, s) = (g.input_as(cos, DType::F32)?, g.input_as(sin, DType::F32)?);
            let mut y = g.alloc::<T>(x.elem_count())?;
            g.run(grope::rope_forward(buf::<T>(&xi), buf(&c), buf(&s), heads, head_dim, &mut y))?;
            Ok(output(y, x.shape()))
        });
    }
    with_compute!("rope", [x, cos, sin], |T| {
        let mut y = vec![T::default(); x.elem_count()];
        rope::rope_forward(&x.values::<T>(), &cos.values::<T>(), &sin.values::<T>(), heads, head_dim, &mut y);
        Ok(tensor(y, x.shape()))
    })
}

pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (heads, head_dim) = rope_shapes("rope_backward", dy, cos, sin)?;
    if let Some(g) = Gpu::of("rope_backward", &[dy, cos, sin])? {
        return with_gpu!(g, |T| {
            let d = g.input(dy)?;
            let (c, s) = (g.input_as(cos, DType::F32)?, g.input_as(sin, DType::F32)?);
            let mut dx = g.alloc::<T>(dy.elem_count())?;
            g.run(grope::rope_backward(buf::<T>(&d), buf(&c), buf(&s), heads, head_dim, &mut dx))?;
            Ok(output(dx, dy.shape()))
        });
    }
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
    if q.device() != crate::Device::Cpu && p.head_dim > gattn::MAX_HEAD_DIM {
        return Err(Error::invalid(
            "attention",
            format!("head_dim {} exceeds the CUDA kernel's {}", p.head_dim, gattn::MAX_HEAD_DIM),
        ));
    }
    Ok(())
}

/// The longest sequence of validated boundaries.
fn max_seqlen(cu: &[i32]) -> usize {
    cu.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0)
}

/// Packed variable-length attention (see `qlora_kernels::attention`). On CUDA lse is f32 whatever q's dtype, and
/// the boundaries are read on the host (a small download) to validate them.
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
    if let Some(g) = Gpu::of("attention", &[q, k, v])? {
        let (cu_q, cu_k) = (g.index("cu_seqlens_q", cu_seqlens_q)?, g.index("cu_seqlens_k", cu_seqlens_k)?);
        let (max_q, max_k) = (max_seqlen(&cq), max_seqlen(&ck));
        return with_gpu!(g, |T| {
            let (qi, ki, vi) = (g.input(q)?, g.input(k)?, g.input(v)?);
            let (mut out, mut lse) = (g.alloc::<T>(q.elem_count())?, g.alloc::<f32>(tq * p.n_heads)?);
            g.run(gattn::attention_forward(
                p,
                buf::<T>(&qi),
                buf(&ki),
                buf(&vi),
                buf(&cu_q),
                buf(&cu_k),
                max_q,
                max_k,
                &mut out,
                &mut lse,
            ))?;
            Ok((output(out, q.shape()), output(lse, &[tq, p.n_heads])))
        });
    }
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
    same_shape("attention_backward", q, out)?;
    if lse.shape() != [q.shape()[0], p.n_heads] {
        return Err(Error::shape("attention_backward", format!("lse {:?} for q {:?}", lse.shape(), q.shape())));
    }
    if let Some(g) = Gpu::of("attention_backward", &[q, k, v, out, lse, d_out])? {
        let (cu_q, cu_k) = (g.index("cu_seqlens_q", cu_seqlens_q)?, g.index("cu_seqlens_k", cu_seqlens_k)?);
        let (max_q, max_k) = (max_seqlen(&cq), max_seqlen(&ck));
        return with_gpu!(g, |T| {
            let (qi, ki, vi, oi, di) = (g.input(q)?, g.input(k)?, g.input(v)?, g.input(out)?, g.input(d_out)?);
            let l = g.input_as(lse, DType::F32)?;
            let (mut dq, mut dk, mut dv) =
                (g.alloc::<T>(q.elem_count())?, g.alloc::<T>(k.elem_count())?, g.alloc::<T>(v.elem_count())?);
            g.run(gattn::attention_backward(
                p,
                buf::<T>(&qi),
                buf(&ki),
                buf(&vi),
                buf(&oi),
                buf(&l),
                buf(&di),
                buf(&cu_q),
                buf(&cu_k),
                max_q,
                max_k,
                &mut dq,
                &mut dk,
                &mut dv,
            ))?;
            Ok((output(dq, q.shape()), output(dk, k.shape()), output(dv, v.shape())))
        });
    }
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
/// On CUDA both are f32 whatever the logits' dtype, and the targets are checked on the host (a small download).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let (rows, vocab) = check_targets(logits, targets)?;
    let t = indices("cross_entropy", "targets", targets)?;
    if let Some(&bad) = t.iter().find(|&&x| x != IGNORE_INDEX && (x < 0 || x as usize >= vocab)) {
        return Err(Error::Index { op: "cross_entropy", what: "target", value: bad as i64, bound: vocab });
    }
    if let Some(g) = Gpu::of("cross_entropy", &[logits])? {
        return with_gpu!(g, |T| {
            let (x, t) = (g.input(logits)?, g.index("targets", targets)?);
            let (mut loss, mut lse) = (g.alloc::<f32>(rows)?, g.alloc::<f32>(rows)?);
            g.run(gce::cross_entropy_forward(buf::<T>(&x), buf(&t), vocab, &mut loss, &mut lse))?;
            Ok((output(loss, &[rows]), output(lse, &[rows])))
        });
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
    if let Some(g) = Gpu::of("cross_entropy_backward", &[logits, lse, d_loss])? {
        return with_gpu!(g, |T| {
            let (x, t) = (g.input(logits)?, g.index("targets", targets)?);
            let (l, d) = (g.input_as(lse, DType::F32)?, g.input_as(d_loss, DType::F32)?);
            let mut dx = g.alloc::<T>(logits.elem_count())?;
            g.run(gce::cross_entropy_backward(buf::<T>(&x), buf(&t), buf(&l), buf(&d), vocab, &mut dx))?;
            Ok(output(dx, logits.shape()))
        });
    }
    let t = indices("cross_entropy_backward", "targets", targets)?;
    with_compute!("cross_entropy_backward", [logits, lse, d_loss], |T| {
        let mut d = vec![T::default(); logits.elem_count()];
        ce::cross_entropy_backward(&logits.values::<T>(), &t, &lse.values::<T>(), &d_loss.values::<T>(), vocab, &mut d);
        Ok(tensor(d, logits.shape()))
    })
}
