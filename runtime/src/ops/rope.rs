//! Rotary position embedding (rotate-half convention) from cos/sin tables built on the host per batch.

use super::concat::write_rows;
use super::{indices, tensor, with_compute};
use crate::cuda::{buf, buffer_mut, output, with_gpu, Gpu};
use crate::op::{backward_fn, bytes, first_grad, Backward, Recorded};
use crate::{DType, Error, Result, Tensor};
use qlora_kernels::cuda::rope as grope;
use qlora_kernels::rope::{self, Direction};

/// Rotary tables for `positions` (\[tokens\], I32, on the host) and `inv_freq` ([head_dim/2]) → (cos, sin): [tokens,
/// head_dim/2] on the host, in inv_freq's precision. Built where the batch is (one upload per batch when the model
/// runs on a GPU, never a read back).
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
    rotate("rope", Direction::Forward, x, cos, sin)
}

/// Gradient of [`rope()`] with respect to x: dy rotated back.
pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rotate("rope_backward", Direction::Backward, dy, cos, sin)
}

fn rotate(op: &'static str, dir: Direction, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (heads, head_dim) = rope_shapes(op, x, cos, sin)?;
    if let Some(g) = Gpu::of(op, &[x, cos, sin])? {
        return with_gpu!(g, |T| {
            let xi = g.input(x)?;
            let (c, s) = (g.input_as(cos, DType::F32)?, g.input_as(sin, DType::F32)?);
            let mut y = g.alloc::<T>(x.elem_count())?;
            g.run(grope::rope(dir, buf::<T>(&xi), [buf(&c), buf(&s)], heads, head_dim, &mut y))?;
            Ok(output(y, x.shape()))
        });
    }
    with_compute!(op, [x, cos, sin], |T| {
        let mut y = vec![T::default(); x.elem_count()];
        rope::rope(dir, &x.values::<T>(), &cos.values::<T>(), &sin.values::<T>(), heads, head_dim, &mut y);
        Ok(tensor(y, x.shape()))
    })
}

/// [`rope()`] for a tape: the rotated x, and its backward (the rotation is linear in x: the tables are all it reads).
pub fn rope_op(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Recorded> {
    let y = rope(x, cos, sin)?;
    let (cos, sin) = (cos.clone(), sin.clone());
    let grad =
        backward_fn("rope", bytes([&cos, &sin]), move |g| Ok(vec![Some(rope_backward(first_grad(g)?, &cos, &sin)?)]));
    Ok((y, grad))
}

/// q: [tokens, q_heads, head_dim] and k: [tokens, k_heads, head_dim] rotated by the same tables: [`rope()`] of each,
/// in one launch on a GPU.
pub fn rope_qk(q: &Tensor, k: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<[Tensor; 2]> {
    rotate_qk("rope_qk", Direction::Forward, [q, k], cos, sin)
}

/// Gradients of [`rope_qk`] with respect to q and k.
pub fn rope_qk_backward(dq: &Tensor, dk: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<[Tensor; 2]> {
    rotate_qk("rope_qk_backward", Direction::Backward, [dq, dk], cos, sin)
}

/// (q heads, k heads) and head_dim of q and k rotated by the same tables: both [tokens, heads, head_dim] of one
/// head_dim and one dtype.
fn qk_shapes(op: &'static str, q: &Tensor, k: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<([usize; 2], usize)> {
    let (q_heads, head_dim) = rope_shapes(op, q, cos, sin)?;
    let (k_heads, k_dim) = rope_shapes(op, k, cos, sin)?;
    if k_dim != head_dim || q.dtype() != k.dtype() {
        let (qd, kd) = ((q.shape(), q.dtype()), (k.shape(), k.dtype()));
        return Err(Error::shape(op, format!("q {qd:?} with k {kd:?}")));
    }
    Ok(([q_heads, k_heads], head_dim))
}

fn rotate_qk(
    op: &'static str,
    dir: Direction,
    [q, k]: [&Tensor; 2],
    cos: &Tensor,
    sin: &Tensor,
) -> Result<[Tensor; 2]> {
    let ([q_heads, k_heads], head_dim) = qk_shapes(op, q, k, cos, sin)?;
    if let Some(g) = Gpu::of(op, &[q, k, cos, sin])? {
        return with_gpu!(g, |T| {
            let (qi, ki) = (g.input(q)?, g.input(k)?);
            let (c, s) = (g.input_as(cos, DType::F32)?, g.input_as(sin, DType::F32)?);
            let (mut yq, mut yk) = (g.alloc::<T>(q.elem_count())?, g.alloc::<T>(k.elem_count())?);
            let (bq, bk) = (buf::<T>(&qi), buf::<T>(&ki));
            g.run(grope::rope_qk(dir, [bq, bk], [buf(&c), buf(&s)], [q_heads, k_heads], head_dim, [&mut yq, &mut yk]))?;
            Ok([output(yq, q.shape()), output(yk, k.shape())])
        });
    }
    Ok([rotate(op, dir, q, cos, sin)?, rotate(op, dir, k, cos, sin)?])
}

/// [`rope_qk`] of q and k, with k's rotation and v written into `k_dst` and `v_dst` ([rows, …] of k_heads·head_dim
/// values a row) from row `at`, in place (a KV cache's spare rows, as [`write_rows`] writes them): returns q rotated.
/// One launch on a GPU, where a layer's keys and values would otherwise take a rotation and two copies.
pub fn rope_qkv_into(
    [q, k, v]: [&Tensor; 3],
    cos: &Tensor,
    sin: &Tensor,
    [k_dst, v_dst]: [&mut Tensor; 2],
    at: usize,
) -> Result<Tensor> {
    let op = "rope_qkv_into";
    let ([q_heads, k_heads], head_dim) = qk_shapes(op, q, k, cos, sin)?;
    let (tokens, row) = (k.shape()[0], k_heads * head_dim);
    let fits = |d: &Tensor| {
        d.shape().first().is_some_and(|&rows| at + tokens <= rows)
            && d.shape()[1..].iter().product::<usize>() == row
            && d.dtype() == k.dtype()
    };
    if v.shape() != k.shape() || v.dtype() != k.dtype() {
        let (kd, vd) = ((k.shape(), k.dtype()), (v.shape(), v.dtype()));
        return Err(Error::shape(op, format!("v {vd:?} with k {kd:?}")));
    }
    if !fits(k_dst) || !fits(v_dst) {
        let (kd, vd) = ((k_dst.shape(), k_dst.dtype()), (v_dst.shape(), v_dst.dtype()));
        return Err(Error::shape(op, format!("{tokens} rows of {row} at row {at} into {kd:?} and {vd:?}")));
    }
    if let Some(g) = Gpu::of(op, &[q, k, v, cos, sin, &*k_dst, &*v_dst])? {
        return with_gpu!(g, |T| {
            let (qi, ki, vi) = (g.input(q)?, g.input(k)?, g.input(v)?);
            let (c, s) = (g.input_as(cos, DType::F32)?, g.input_as(sin, DType::F32)?);
            let mut yq = g.alloc::<T>(q.elem_count())?;
            let (kd, vd) = (buffer_mut::<T>(op, k_dst)?, buffer_mut::<T>(op, v_dst)?);
            let inputs = [buf::<T>(&qi), buf::<T>(&ki), buf::<T>(&vi)];
            g.run(grope::rope_qkv(
                inputs,
                [buf(&c), buf(&s)],
                [q_heads, k_heads],
                head_dim,
                &mut yq,
                ([kd, vd], at * row),
            ))?;
            Ok(output(yq, q.shape()))
        });
    }
    let [yq, yk] = rope_qk(q, k, cos, sin)?;
    let rows_of = |x: &Tensor, d: &Tensor| x.reshape(&[&[tokens][..], &d.shape()[1..]].concat());
    write_rows(k_dst, at, &rows_of(&yk, k_dst)?)?;
    write_rows(v_dst, at, &rows_of(v, v_dst)?)?;
    Ok(yq)
}

/// [`rope_qk`] for a tape: the rotated q and k, and their backward (a gradient of either may be missing).
pub fn rope_qk_op(q: &Tensor, k: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Vec<Tensor>, Box<dyn Backward>)> {
    let [yq, yk] = rope_qk(q, k, cos, sin)?;
    let (cos, sin) = (cos.clone(), sin.clone());
    let grad = backward_fn("rope_qk", bytes([&cos, &sin]), move |g| match (&g[0], &g[1]) {
        (Some(dq), Some(dk)) => Ok(rope_qk_backward(dq, dk, &cos, &sin)?.map(Some).to_vec()),
        (dq, dk) => {
            let back = |d: &Option<Tensor>| d.as_ref().map(|d| rope_backward(d, &cos, &sin)).transpose();
            Ok(vec![back(dq)?, back(dk)?])
        }
    });
    Ok((vec![yq, yk], grad))
}
