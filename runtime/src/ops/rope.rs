//! Rotary position embedding (rotate-half convention) from cos/sin tables built on the host per batch.

use super::{indices, tensor, with_compute};
use crate::cuda::{buf, output, with_gpu, Gpu};
use crate::op::{first_grad, Backward, Recorded};
use crate::{DType, Error, Result, Tensor};
use qlora_kernels::cuda::rope as grope;
use qlora_kernels::rope;

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

/// What rotary's backward reads: the tables (the rotation is linear in x).
struct RopeGrad {
    cos: Tensor,
    sin: Tensor,
}

impl Backward for RopeGrad {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn saved_bytes(&self) -> usize {
        self.cos.size_in_bytes() + self.sin.size_in_bytes()
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(rope_backward(first_grad(grads)?, &self.cos, &self.sin)?)])
    }
}

/// [`rope()`] for a tape: the rotated x, and its backward.
pub fn rope_op(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Recorded> {
    Ok((rope(x, cos, sin)?, Box::new(RopeGrad { cos: cos.clone(), sin: sin.clone() })))
}
