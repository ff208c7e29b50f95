//! Elementwise ops, activations and reductions.

use super::{rows_cols, same_shape, tensor, with_compute};
use crate::cuda::{buf, buffer_mut, output, with_gpu, Gpu};
use crate::{DType, Error, Result, Tensor};
use qlora_kernels::cuda::{activation as gact, elementwise as gew, reduce as greduce};
use qlora_kernels::{activation as act, elementwise as ew, reduce};

/// a + b (same shapes).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    same_shape("add", a, b)?;
    if let Some(g) = Gpu::of("add", &[a, b])? {
        return with_gpu!(g, |T| {
            let (a, b) = (g.input(a)?, g.input(b)?);
            let mut out = g.alloc::<T>(a.elem_count())?;
            g.run(gew::add(buf::<T>(&a), buf(&b), &mut out))?;
            Ok(output(out, a.shape()))
        });
    }
    with_compute!("add", [a, b], |T| {
        let mut out = vec![T::default(); a.elem_count()];
        ew::add(&a.values::<T>(), &b.values::<T>(), &mut out);
        Ok(tensor(out, a.shape()))
    })
}

/// a ⊙ b (same shapes).
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    same_shape("mul", a, b)?;
    if let Some(g) = Gpu::of("mul", &[a, b])? {
        return with_gpu!(g, |T| {
            let (a, b) = (g.input(a)?, g.input(b)?);
            let mut out = g.alloc::<T>(a.elem_count())?;
            g.run(gew::mul(buf::<T>(&a), buf(&b), &mut out))?;
            Ok(output(out, a.shape()))
        });
    }
    with_compute!("mul", [a, b], |T| {
        let mut out = vec![T::default(); a.elem_count()];
        ew::mul(&a.values::<T>(), &b.values::<T>(), &mut out);
        Ok(tensor(out, a.shape()))
    })
}

/// s·x.
pub fn scale(x: &Tensor, s: f64) -> Result<Tensor> {
    if let Some(g) = Gpu::of("scale", &[x])? {
        return with_gpu!(g, |T| {
            let x = g.input(x)?;
            let mut out = g.alloc::<T>(x.elem_count())?;
            g.run(gew::scale(buf::<T>(&x), s as f32, &mut out))?;
            Ok(output(out, x.shape()))
        });
    }
    with_compute!("scale", [x], |T| {
        let mut out = vec![T::default(); x.elem_count()];
        ew::scale(&x.values::<T>(), s as T, &mut out);
        Ok(tensor(out, x.shape()))
    })
}

/// Inverted dropout: element i (row-major) is zeroed when the i-th draw of `Rng::new(seed).uniform()` is < p and
/// scaled by 1/(1 − p) otherwise. The mask depends only on (seed, i), the same on every device and on every call.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid("dropout", format!("p must be in [0, 1), got {p}")));
    }
    if let Some(g) = Gpu::of("dropout", &[x])? {
        return with_gpu!(g, |T| {
            let x = g.input(x)?;
            let mut out = g.alloc::<T>(x.elem_count())?;
            g.run(gew::dropout(buf::<T>(&x), p, seed, (1.0 / (1.0 - p)) as f32, &mut out))?;
            Ok(output(out, x.shape()))
        });
    }
    with_compute!("dropout", [x], |T| {
        let mut out = vec![T::default(); x.elem_count()];
        ew::dropout(&x.values::<T>(), p, seed, (1.0 / (1.0 - p)) as T, &mut out);
        Ok(tensor(out, x.shape()))
    })
}

/// y += alpha·x in place, keeping y's dtype (gradient accumulation into an existing buffer).
pub fn accumulate(y: &mut Tensor, alpha: f64, x: &Tensor) -> Result<()> {
    same_shape("accumulate", y, x)?;
    if let Some(g) = Gpu::of("accumulate", &[&*y, x])? {
        // x is cast to the accumulator's dtype; a bf16 accumulator adds in f32 inside the kernel and rounds once.
        let x = g.input_as(x, y.dtype())?;
        return match y.dtype() {
            DType::BF16 => g.run(gew::axpy(alpha as f32, buf(&x), buffer_mut::<half::bf16>("accumulate", y)?)),
            _ => g.run(gew::axpy(alpha as f32, buf(&x), buffer_mut::<f32>("accumulate", y)?)),
        };
    }
    with_compute!("accumulate", [&*y, x], |T| {
        if y.dtype() == <T as crate::Element>::DTYPE {
            let xv = x.values::<T>();
            y.update::<T>(|yv| ew::axpy(alpha as T, &xv, yv))
        } else {
            // A low-precision accumulator: sum in the compute type, round once.
            let mut acc = y.to_vec::<T>();
            ew::axpy(alpha as T, &x.values::<T>(), &mut acc);
            *y = tensor(acc, y.shape()).to_dtype(y.dtype());
            Ok(())
        }
    })
}

/// x: [..., n] + bias: [n] broadcast over the leading dimensions.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, cols) = rows_cols("add_bias", x)?;
    if bias.shape() != [cols] {
        return Err(Error::shape("add_bias", format!("bias {:?} for input {:?}", bias.shape(), x.shape())));
    }
    if let Some(g) = Gpu::of("add_bias", &[x, bias])? {
        return with_gpu!(g, |T| {
            let (mut out, bias) = (g.input(x)?, g.input(bias)?);
            g.run(gew::add_bias(buffer_mut::<T>("add_bias", &mut out)?, buf(&bias)))?;
            Ok(out)
        });
    }
    with_compute!("add_bias", [x, bias], |T| {
        let mut out = x.to_vec::<T>();
        ew::add_bias(&mut out, &bias.values::<T>());
        Ok(tensor(out, x.shape()))
    })
}

/// Σ x as a rank-0 tensor (f32 on CUDA whatever x's dtype: losses are reduced in f32).
pub fn sum(x: &Tensor) -> Result<Tensor> {
    if let Some(g) = Gpu::of("sum", &[x])? {
        let s = with_gpu!(g, |T| g.run(greduce::sum::<T>(buf(&g.input(x)?)))?);
        return g.scalar(s as f32);
    }
    with_compute!("sum", [x], |T| Ok(Tensor::scalar::<T>(reduce::sum(&x.values::<T>()))))
}

/// x: [..., n] → [n], summed over every leading dimension (bias gradients).
pub fn sum_rows(x: &Tensor) -> Result<Tensor> {
    let (_, cols) = rows_cols("sum_rows", x)?;
    if let Some(g) = Gpu::of("sum_rows", &[x])? {
        return with_gpu!(g, |T| {
            let x = g.input(x)?;
            let mut out = g.alloc::<T>(cols)?;
            g.run(greduce::sum_rows(buf::<T>(&x), cols, &mut out))?;
            Ok(output(out, &[cols]))
        });
    }
    with_compute!("sum_rows", [x], |T| {
        let mut out = vec![T::default(); cols];
        reduce::sum_rows(&x.values::<T>(), cols, &mut out);
        Ok(tensor(out, &[cols]))
    })
}

/// Σ x², in f64 (global gradient norms).
pub fn sum_squares(x: &Tensor) -> Result<f64> {
    if let Some(g) = Gpu::of("sum_squares", &[x])? {
        return with_gpu!(g, |T| g.run(greduce::sum_squares::<T>(buf(&g.input(x)?))));
    }
    with_compute!("sum_squares", [x], |T| Ok(reduce::sum_squares(&x.values::<T>()) as f64))
}

/// max |x| (NaN if any element is NaN).
pub fn max_abs(x: &Tensor) -> Result<f64> {
    if let Some(g) = Gpu::of("max_abs", &[x])? {
        return with_gpu!(g, |T| g.run(greduce::max_abs::<T>(buf(&g.input(x)?))));
    }
    with_compute!("max_abs", [x], |T| Ok(reduce::max_abs(&x.values::<T>()) as f64))
}

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

/// Which gated activation an MLP uses: Llama's SwiGLU or Gemma's GeGLU (tanh gelu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Glu {
    SwiGlu,
    GeGlu,
}

/// act(gate) ⊙ up.
pub fn glu(kind: Glu, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    same_shape("glu", gate, up)?;
    if let Some(g) = Gpu::of("glu", &[gate, up])? {
        return with_gpu!(g, |T| {
            let (gt, u) = (g.input(gate)?, g.input(up)?);
            let mut out = g.alloc::<T>(gt.elem_count())?;
            g.run(match kind {
                Glu::SwiGlu => gact::swiglu_forward(buf::<T>(&gt), buf(&u), &mut out),
                Glu::GeGlu => gact::geglu_forward(buf::<T>(&gt), buf(&u), &mut out),
            })?;
            Ok(output(out, gate.shape()))
        });
    }
    with_compute!("glu", [gate, up], |T| {
        let mut out = vec![T::default(); gate.elem_count()];
        let (g, u) = (gate.values::<T>(), up.values::<T>());
        match kind {
            Glu::SwiGlu => act::swiglu_forward(&g, &u, &mut out),
            Glu::GeGlu => act::geglu_forward(&g, &u, &mut out),
        }
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
            g.run(match kind {
                Glu::SwiGlu => gact::swiglu_backward(buf::<T>(&gt), buf(&u), buf(&d), &mut dg, &mut du),
                Glu::GeGlu => gact::geglu_backward(buf::<T>(&gt), buf(&u), buf(&d), &mut dg, &mut du),
            })?;
            Ok((output(dg, gate.shape()), output(du, gate.shape())))
        });
    }
    with_compute!("glu_backward", [gate, up, d_out], |T| {
        let n = gate.elem_count();
        let (mut dg, mut du) = (vec![T::default(); n], vec![T::default(); n]);
        let (g, u, d) = (gate.values::<T>(), up.values::<T>(), d_out.values::<T>());
        match kind {
            Glu::SwiGlu => act::swiglu_backward(&g, &u, &d, &mut dg, &mut du),
            Glu::GeGlu => act::geglu_backward(&g, &u, &d, &mut dg, &mut du),
        }
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
