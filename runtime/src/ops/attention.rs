//! Packed variable-length attention (see `qlora_kernels::attention`): causal (bottom-right aligned), GQA, sliding
//! window, logit softcap. Flash kernels on CUDA for bf16, the reference kernels for f32 and on the CPU.
//!
//! Sequence boundaries travel as [`SeqLens`]: validated once on the host where the batch is packed, with a copy on
//! the op's device; the longest sequence, which sizes the CUDA grids, comes from the host copy, so no call reads
//! anything back from the GPU.

use super::{same_shape, tensor, with_compute};
use crate::cuda::{buf, output, with_gpu, Gpu};
use crate::op::{backward_fn, bytes, first_grad, Recorded};
use crate::{DType, Device, Error, Result, Tensor};
use qlora_kernels::attention::{attention_backward as attn_bwd, attention_forward as attn_fwd};
use qlora_kernels::cuda::attention as gattn;
use std::sync::Arc;

pub use qlora_kernels::attention::AttentionParams;

/// The boundaries of packed sequences, `[n_seqs + 1]` starting at 0 and never decreasing: sequence s owns rows
/// `cu[s]..cu[s + 1]`. Holds the values on the host and as an I32 tensor on the device the attention runs on.
#[derive(Clone, Debug)]
pub struct SeqLens {
    host: Arc<[i32]>,
    tensor: Tensor,
    max: usize,
}

impl SeqLens {
    /// `cu` checked (first 0, non-decreasing, non-empty) and placed on `device`.
    pub fn new(cu: &[i32], device: Device) -> Result<SeqLens> {
        let ok = cu.first() == Some(&0) && cu.windows(2).all(|w| w[0] <= w[1]);
        if !ok {
            return Err(Error::invalid("cu_seqlens", format!("must start at 0 and never decrease, got {cu:?}")));
        }
        let tensor = Tensor::from_slice(cu, &[cu.len()])?.to_device(device)?;
        let max = cu.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
        Ok(SeqLens { host: cu.into(), tensor, max })
    }

    /// The same boundaries on `device` (one upload; the host copy is shared).
    pub fn to_device(&self, device: Device) -> Result<SeqLens> {
        Ok(SeqLens { tensor: self.tensor.to_device(device)?, ..self.clone() })
    }

    pub fn host(&self) -> &[i32] {
        &self.host
    }

    /// The I32 tensor on the op's device.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// Rows of the longest sequence.
    pub fn max_len(&self) -> usize {
        self.max
    }

    /// Rows of all sequences together (the last boundary).
    pub fn total(&self) -> usize {
        *self.host.last().expect("checked non-empty in new") as usize
    }

    pub fn n_seqs(&self) -> usize {
        self.host.len() - 1
    }
}

fn attention_shapes(p: &AttentionParams, q: &Tensor, k: &Tensor, v: &Tensor, cq: &SeqLens, ck: &SeqLens) -> Result<()> {
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
    for (what, cu, rows) in [("cu_seqlens_q", cq, qs[0]), ("cu_seqlens_k", ck, ks[0])] {
        if cu.total() != rows {
            return Err(Error::invalid("attention", format!("{what} ends at {} for {rows} tokens", cu.total())));
        }
        if cu.tensor.device() != q.device() {
            return Err(Error::DeviceMismatch { op: "attention", a: q.device(), b: cu.tensor.device() });
        }
    }
    if cq.n_seqs() != ck.n_seqs() {
        return Err(Error::invalid("attention", "cu_seqlens_q and cu_seqlens_k describe different sequence counts"));
    }
    let longer_q = cq.host.windows(2).zip(ck.host.windows(2)).any(|(a, b)| a[1] - a[0] > b[1] - b[0]);
    if p.causal && longer_q {
        return Err(Error::invalid("attention", "a sequence has more queries than keys"));
    }
    if q.device() != Device::Cpu && p.head_dim > gattn::MAX_HEAD_DIM {
        return Err(Error::invalid(
            "attention",
            format!("head_dim {} exceeds the CUDA kernel's {}", p.head_dim, gattn::MAX_HEAD_DIM),
        ));
    }
    Ok(())
}

/// [q, k, v] with q: [tq, n_heads, head_dim], k, v: [tk, n_kv_heads, head_dim], split into sequences by [cu_q, cu_k]
/// → (out: [tq, n_heads, head_dim], lse: [tq, n_heads]). On CUDA lse is f32 whatever q's dtype.
pub fn attention(
    p: &AttentionParams,
    [q, k, v]: [&Tensor; 3],
    [cu_q, cu_k]: [&SeqLens; 2],
) -> Result<(Tensor, Tensor)> {
    attention_shapes(p, q, k, v, cu_q, cu_k)?;
    let tq = q.shape()[0];
    if let Some(g) = Gpu::of("attention", &[q, k, v])? {
        let (gcq, gck) = (g.index("cu_seqlens_q", &cu_q.tensor)?, g.index("cu_seqlens_k", &cu_k.tensor)?);
        let (cu, max) = ([buf(&gcq), buf(&gck)], [cu_q.max, cu_k.max]);
        return with_gpu!(g, |T| {
            // Keys past cu_seqlens_k's end are never read, so a KV cache's spare rows may come along.
            let (qi, (ki, vi)) = (g.input(q)?, g.leading_rows(k, v)?);
            let (mut out, mut lse) = (g.alloc::<T>(q.elem_count())?, g.alloc::<f32>(tq * p.n_heads)?);
            let (qi, ki, vi) = (buf::<T>(&qi), buf(&ki), buf(&vi));
            g.run(gattn::attention_forward(p, qi, ki, vi, cu, max, &mut out, &mut lse))?;
            Ok((output(out, q.shape()), output(lse, &[tq, p.n_heads])))
        });
    }
    with_compute!("attention", [q, k, v], |T| {
        let (mut out, mut lse) = (vec![T::default(); q.elem_count()], vec![T::default(); tq * p.n_heads]);
        let cu = [cu_q.host(), cu_k.host()];
        attn_fwd(p, &q.values::<T>(), &k.values::<T>(), &v.values::<T>(), cu, &mut out, &mut lse);
        Ok((tensor(out, q.shape()), tensor(lse, &[tq, p.n_heads])))
    })
}

/// → (dq, dk, dv) of [`attention`], from its inputs, [out, d_out] and lse.
pub fn attention_backward(
    p: &AttentionParams,
    [q, k, v]: [&Tensor; 3],
    [out, d_out]: [&Tensor; 2],
    lse: &Tensor,
    [cu_q, cu_k]: [&SeqLens; 2],
) -> Result<(Tensor, Tensor, Tensor)> {
    attention_shapes(p, q, k, v, cu_q, cu_k)?;
    same_shape("attention_backward", q, d_out)?;
    same_shape("attention_backward", q, out)?;
    if lse.shape() != [q.shape()[0], p.n_heads] {
        return Err(Error::shape("attention_backward", format!("lse {:?} for q {:?}", lse.shape(), q.shape())));
    }
    if let Some(g) = Gpu::of("attention_backward", &[q, k, v, out, lse, d_out])? {
        let (gcq, gck) = (g.index("cu_seqlens_q", &cu_q.tensor)?, g.index("cu_seqlens_k", &cu_k.tensor)?);
        let (cu, max) = ([buf(&gcq), buf(&gck)], [cu_q.max, cu_k.max]);
        return with_gpu!(g, |T| {
            let (qi, ki, vi, oi, di) = (g.input(q)?, g.input(k)?, g.input(v)?, g.input(out)?, g.input(d_out)?);
            let l = g.input_as(lse, DType::F32)?;
            let (mut dq, mut dk, mut dv) =
                (g.alloc::<T>(q.elem_count())?, g.alloc::<T>(k.elem_count())?, g.alloc::<T>(v.elem_count())?);
            let (qkv, out_d) = ([buf::<T>(&qi), buf(&ki), buf(&vi)], [buf(&oi), buf(&di)]);
            g.run(gattn::attention_backward(p, qkv, out_d, buf(&l), cu, max, [&mut dq, &mut dk, &mut dv]))?;
            Ok((output(dq, q.shape()), output(dk, k.shape()), output(dv, v.shape())))
        });
    }
    with_compute!("attention_backward", [q, k, v, out, lse, d_out], |T| {
        let (mut dq, mut dk, mut dv) = (
            vec![T::default(); q.elem_count()],
            vec![T::default(); k.elem_count()],
            vec![T::default(); v.elem_count()],
        );
        let (qv, kv, vv) = (q.values::<T>(), k.values::<T>(), v.values::<T>());
        let (ov, dov, cu) = (out.values::<T>(), d_out.values::<T>(), [cu_q.host(), cu_k.host()]);
        attn_bwd(p, [&qv, &kv, &vv], [&ov, &dov], &lse.values::<T>(), cu, [&mut dq, &mut dk, &mut dv]);
        Ok((tensor(dq, q.shape()), tensor(dk, k.shape()), tensor(dv, v.shape())))
    })
}

/// [`attention`] for a tape: out, and a backward holding q, k, v, out and lse.
pub fn attention_op(p: &AttentionParams, qkv: [&Tensor; 3], cu: [&SeqLens; 2]) -> Result<Recorded> {
    let (out, lse) = attention(p, qkv, cu)?;
    let ([q, k, v], [cu_q, cu_k]) = (qkv, cu);
    let (p, q, k, v, o, cu_q, cu_k) = (*p, q.clone(), k.clone(), v.clone(), out.clone(), cu_q.clone(), cu_k.clone());
    let held = bytes([&q, &k, &v, &o, &lse, &cu_q.tensor, &cu_k.tensor]);
    let grad = backward_fn("attention", held, move |g| {
        let (dq, dk, dv) = attention_backward(&p, [&q, &k, &v], [&o, first_grad(g)?], &lse, [&cu_q, &cu_k])?;
        Ok(vec![Some(dq), Some(dk), Some(dv)])
    });
    Ok((out, grad))
}
