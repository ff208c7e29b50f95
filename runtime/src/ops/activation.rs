//! Activations: silu, tanh-gelu, the gated units of the MLPs (SwiGLU, GeGLU) and softcapping.

use super::linalg::matmul;
use super::{dispatch, same_shape, tensor, with_compute};
use crate::cuda::{buf, buffer_mut, output, with_gpu, Gpu};
use crate::op::{backward_fn, bytes, first_grad, Recorded};
use crate::{Error, Result, Tensor};
use qlora_kernels::activation as act;
use qlora_kernels::cuda::activation as gact;
use qlora_kernels::cuda::matmul as gmm;

macro_rules! unary {
    ($(#[$doc:meta])* $fwd:ident, $bwd:ident, $kf:path, $kb:path, $gf:path, $gb:path) => {
        $(#[$doc])*
        pub fn $fwd(x: &Tensor) -> Result<Tensor> {
            dispatch!(stringify!($fwd), [x] -> x.shape(), |T, y| gpu: $gf(x, &mut y), cpu: $kf(&x, &mut y))
        }

        /// Gradient with respect to the input, given the forward's input and the upstream gradient.
        pub fn $bwd(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
            same_shape(stringify!($bwd), x, dy)?;
            dispatch!(stringify!($bwd), [x, dy] -> x.shape(), |T, dx|
                gpu: $gb(x, dy, &mut dx),
                cpu: $kb(&x, &dy, &mut dx),
            )
        }
    };
}

unary!(
    /// silu(x) = x·σ(x).
    silu, silu_backward, act::silu_forward, act::silu_backward, gact::silu_forward, gact::silu_backward
);
unary!(
    /// gelu with the tanh approximation (PyTorch's `approximate="tanh"`).
    gelu_tanh,
    gelu_tanh_backward,
    act::gelu_tanh_forward,
    act::gelu_tanh_backward,
    gact::gelu_tanh_forward,
    gact::gelu_tanh_backward
);

pub use qlora_kernels::activation::Glu;

/// act(gate) ⊙ up.
pub fn glu(kind: Glu, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    same_shape("glu", gate, up)?;
    dispatch!("glu", [gate, up] -> gate.shape(), |T, out|
        gpu: gact::glu_forward(kind, gate, up, &mut out),
        cpu: act::glu_forward(kind, &gate, &up, &mut out),
    )
}

/// [`glu`] of gate and up (\[rows, k\] each) and that product times bᵀ (b: \[n, k\]): (x, x·bᵀ), x \[rows, k\] and
/// the product \[rows, n\], the values of `glu` then [`matmul`] bit for bit. On a GPU, for a decoding step's few rows
/// (LoRA's U = x·Aᵀ of down_proj's adapter, all operands in one dtype), one launch forms both.
pub fn glu_matmul_t(kind: Glu, gate: &Tensor, up: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    const OP: &str = "glu_matmul_t";
    same_shape(OP, gate, up)?;
    let (&[rows, k], &[n, b_k]) = (gate.shape(), b.shape()) else {
        return Err(Error::shape(OP, format!("gate {:?} and b {:?} must be matrices", gate.shape(), b.shape())));
    };
    if b_k != k {
        return Err(Error::shape(
            OP,
            format!("gate {:?} against b {:?}: b's rows must be k long", gate.shape(), b.shape()),
        ));
    }
    if let Some(g) = Gpu::of(OP, &[gate, up, b])? {
        if up.dtype() == gate.dtype() && b.dtype() == gate.dtype() && gmm::takes_glu_few_rows(rows, n, k) {
            let fused = with_gpu!(g, |T| {
                let (gt, u, bt) = (g.input(gate)?, g.input(up)?, g.input(b)?);
                let (mut x, mut c) = (g.alloc::<T>(rows * k)?, g.alloc::<T>(rows * n)?);
                let (gb, ub, bb) = (buf::<T>(&gt), buf(&u), buf(&bt));
                let done = g.run(gmm::glu_few_rows(kind, gb, ub, bb, &mut x, &mut c, (rows, n, k)))?;
                done.then(|| (output(x, gate.shape()), output(c, &[rows, n])))
            });
            if let Some(both) = fused {
                return Ok(both);
            }
        }
    }
    let x = glu(kind, gate, up)?;
    let product = matmul(&x, &b.t()?)?;
    Ok((x, product))
}

/// Gradients (d_gate, d_up) of [`glu`].
pub fn glu_backward(kind: Glu, gate: &Tensor, up: &Tensor, d_out: &Tensor) -> Result<(Tensor, Tensor)> {
    same_shape("glu_backward", gate, up)?;
    same_shape("glu_backward", gate, d_out)?;
    if let Some(g) = Gpu::of("glu_backward", &[gate, up, d_out])? {
        return with_gpu!(g, |T| {
            let (gt, u, d) = (g.input(gate)?, g.input(up)?, g.input(d_out)?);
            let n = gt.elem_count();
            let (mut dg, mut du) = (g.alloc::<T>(n)?, g.alloc::<T>(n)?);
            g.run(gact::glu_backward(kind, buf::<T>(&gt), buf(&u), buf(&d), &mut dg, &mut du))?;
            Ok((output(dg, gate.shape()), output(du, gate.shape())))
        });
    }
    with_compute!("glu_backward", [gate, up, d_out], |T| {
        let n = gate.elem_count();
        let (mut dg, mut du) = (vec![T::default(); n], vec![T::default(); n]);
        let (g, u, d) = (gate.values::<T>(), up.values::<T>(), d_out.values::<T>());
        act::glu_backward(kind, &g, &u, &d, &mut dg, &mut du);
        Ok((tensor(dg, gate.shape()), tensor(du, gate.shape())))
    })
}

/// [`glu_backward`]'s gradients (d_gate, d_up), with [`glu`]'s product, by the same operations, written over
/// `d_out` in the same pass (in place on a GPU when nothing else holds d_out's storage): a consumer that needs the
/// product only for its own backward forms it where the GLU's gradients are computed, for one more write and no
/// more memory, instead of keeping it saved from the forward or running a separate forward pass.
pub fn glu_backward_out(kind: Glu, gate: &Tensor, up: &Tensor, d_out: &mut Tensor) -> Result<(Tensor, Tensor)> {
    const OP: &str = "glu_backward_out";
    same_shape(OP, gate, up)?;
    same_shape(OP, gate, d_out)?;
    if let Some(g) = Gpu::of(OP, &[gate, up, d_out])? {
        return with_gpu!(g, |T| {
            let (gt, u) = (g.input(gate)?, g.input(up)?);
            *d_out = g.input(d_out)?;
            let n = gt.elem_count();
            let (mut dg, mut du) = (g.alloc::<T>(n)?, g.alloc::<T>(n)?);
            g.run(gact::glu_backward_out(kind, buf::<T>(&gt), buf(&u), buffer_mut::<T>(OP, d_out)?, &mut dg, &mut du))?;
            Ok((output(dg, gate.shape()), output(du, gate.shape())))
        });
    }
    let (d_gate, d_up, out) = with_compute!(OP, [gate, up, d_out], |T| {
        let n = gate.elem_count();
        let (mut dg, mut du, mut out) = (vec![T::default(); n], vec![T::default(); n], vec![T::default(); n]);
        let (g, u, d) = (gate.values::<T>(), up.values::<T>(), d_out.values::<T>());
        act::glu_backward_out(kind, &g, &u, &d, &mut dg, &mut du, &mut out);
        Ok((tensor(dg, gate.shape()), tensor(du, gate.shape()), tensor(out, gate.shape())))
    })?;
    *d_out = out;
    Ok((d_gate, d_up))
}

/// cap·tanh(x/cap) (Gemma 2's final-logit softcapping).
pub fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    if cap.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return Err(Error::invalid("softcap", format!("cap must be > 0, got {cap}")));
    }
    dispatch!("softcap", [x] -> x.shape(), |T, y|
        gpu: gact::softcap_forward(x, cap as f32, &mut y),
        cpu: act::softcap_forward(&x, cap as T, &mut y),
    )
}

pub fn softcap_backward(x: &Tensor, cap: f64, dy: &Tensor) -> Result<Tensor> {
    same_shape("softcap_backward", x, dy)?;
    dispatch!("softcap_backward", [x, dy] -> x.shape(), |T, dx|
        gpu: gact::softcap_backward(x, cap as f32, dy, &mut dx),
        cpu: act::softcap_backward(&x, cap as T, &dy, &mut dx),
    )
}

/// [`glu`] for a tape: the gated output, and a backward for both inputs.
pub fn glu_op(kind: Glu, gate: &Tensor, up: &Tensor) -> Result<Recorded> {
    let (gate, up) = (gate.clone(), up.clone());
    let y = glu(kind, &gate, &up)?;
    let grad = backward_fn("glu", bytes([&gate, &up]), move |g| {
        let (dg, du) = glu_backward(kind, &gate, &up, first_grad(g)?)?;
        Ok(vec![Some(dg), Some(du)])
    });
    Ok((y, grad))
}

/// [`silu`] for a tape.
pub fn silu_op(x: &Tensor) -> Result<Recorded> {
    activation_op("silu", x, silu, silu_backward)
}

/// [`gelu_tanh`] for a tape.
pub fn gelu_tanh_op(x: &Tensor) -> Result<Recorded> {
    activation_op("gelu_tanh", x, gelu_tanh, gelu_tanh_backward)
}

/// A one-input activation for a tape: its backward reads the input.
fn activation_op(
    name: &'static str,
    x: &Tensor,
    forward: fn(&Tensor) -> Result<Tensor>,
    backward: fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Recorded> {
    let x = x.clone();
    let y = forward(&x)?;
    Ok((y, backward_fn(name, x.size_in_bytes(), move |g| Ok(vec![Some(backward(&x, first_grad(g)?)?)]))))
}

/// [`softcap`] for a tape: its backward reads the input.
pub fn softcap_op(x: &Tensor, cap: f64) -> Result<Recorded> {
    let x = x.clone();
    let y = softcap(&x, cap)?;
    Ok((
        y,
        backward_fn("softcap", x.size_in_bytes(), move |g| Ok(vec![Some(softcap_backward(&x, cap, first_grad(g)?)?)])),
    ))
}
