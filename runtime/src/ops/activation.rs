//! Activations: silu, tanh-gelu, the gated units of the MLPs (SwiGLU, GeGLU) and softcapping.

use super::{same_shape, tensor, with_compute};
use crate::cuda::{buf, output, with_gpu, Gpu};
use crate::op::{backward_fn, bytes, first_grad, Recorded};
use crate::{Error, Result, Tensor};
use qlora_kernels::activation as act;
use qlora_kernels::cuda::activation as gact;

macro_rules! unary {
    ($(#[$doc:meta])* $fwd:ident, $bwd:ident, $kf:path, $kb:path, $gf:path, $gb:path) => {
        $(#[$doc])*
        pub fn $fwd(x: &Tensor) -> Result<Tensor> {
            if let Some(g) = Gpu::of(stringify!($fwd), &[x])? {
                return with_gpu!(g, |T| {
                    let x = g.input(x)?;
                    let mut y = g.alloc::<T>(x.elem_count())?;
                    g.run($gf(buf::<T>(&x), &mut y))?;
                    Ok(output(y, x.shape()))
                });
            }
            with_compute!(stringify!($fwd), [x], |T| {
                let mut y = vec![T::default(); x.elem_count()];
                $kf(&x.values::<T>(), &mut y);
                Ok(tensor(y, x.shape()))
            })
        }

        /// Gradient with respect to the input, given the forward's input and the upstream gradient.
        pub fn $bwd(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
            same_shape(stringify!($bwd), x, dy)?;
            if let Some(g) = Gpu::of(stringify!($bwd), &[x, dy])? {
                return with_gpu!(g, |T| {
                    let (x, dy) = (g.input(x)?, g.input(dy)?);
                    let mut dx = g.alloc::<T>(x.elem_count())?;
                    g.run($gb(buf::<T>(&x), buf(&dy), &mut dx))?;
                    Ok(output(dx, x.shape()))
                });
            }
            with_compute!(stringify!($bwd), [x, dy], |T| {
                let mut dx = vec![T::default(); x.elem_count()];
                $kb(&x.values::<T>(), &dy.values::<T>(), &mut dx);
                Ok(tensor(dx, x.shape()))
            })
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
    if let Some(g) = Gpu::of("glu", &[gate, up])? {
        return with_gpu!(g, |T| {
            let (gt, u) = (g.input(gate)?, g.input(up)?);
            let mut out = g.alloc::<T>(gt.elem_count())?;
            g.run(gact::glu_forward(kind, buf::<T>(&gt), buf(&u), &mut out))?;
            Ok(output(out, gate.shape()))
        });
    }
    with_compute!("glu", [gate, up], |T| {
        let mut out = vec![T::default(); gate.elem_count()];
        let (g, u) = (gate.values::<T>(), up.values::<T>());
        act::glu_forward(kind, &g, &u, &mut out);
        Ok(tensor(out, gate.shape()))
    })
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

/// cap·tanh(x/cap) (Gemma 2's final-logit softcapping).
pub fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    if cap.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return Err(Error::invalid("softcap", format!("cap must be > 0, got {cap}")));
    }
    if let Some(g) = Gpu::of("softcap", &[x])? {
        return with_gpu!(g, |T| {
            let x = g.input(x)?;
            let mut y = g.alloc::<T>(x.elem_count())?;
            g.run(gact::softcap_forward(buf::<T>(&x), cap as f32, &mut y))?;
            Ok(output(y, x.shape()))
        });
    }
    with_compute!("softcap", [x], |T| {
        let mut y = vec![T::default(); x.elem_count()];
        act::softcap_forward(&x.values::<T>(), cap as T, &mut y);
        Ok(tensor(y, x.shape()))
    })
}

pub fn softcap_backward(x: &Tensor, cap: f64, dy: &Tensor) -> Result<Tensor> {
    same_shape("softcap_backward", x, dy)?;
    if let Some(g) = Gpu::of("softcap_backward", &[x, dy])? {
        return with_gpu!(g, |T| {
            let (x, dy) = (g.input(x)?, g.input(dy)?);
            let mut dx = g.alloc::<T>(x.elem_count())?;
            g.run(gact::softcap_backward(buf::<T>(&x), cap as f32, buf(&dy), &mut dx))?;
            Ok(output(dx, x.shape()))
        });
    }
    with_compute!("softcap_backward", [x, dy], |T| {
        let mut dx = vec![T::default(); x.elem_count()];
        act::softcap_backward(&x.values::<T>(), cap as T, &dy.values::<T>(), &mut dx);
        Ok(tensor(dx, x.shape()))
    })
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
