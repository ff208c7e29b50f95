//! Pointwise activations of the MLPs and the logit softcap: SiLU and SwiGLU (Llama, REFERENCE.md §5.4), tanh-GELU and
//! GeGLU (Gemma, §6.1), `cap·tanh(x/cap)` (Gemma 2 final logits, §6.3).
//!
//! tanh-GELU and its gradient, the GLU product `act(gate) ⊙ up` and the softcap (divide, tanh, multiply) follow
//! PyTorch/transformers operation by operation, so f32 results differ only where libm's `tanh` does. SiLU is `z·σ(z)`
//! with a two-branch σ that never overflows; torch's `z / (1 + exp(−z))` agrees with it to within an ulp or two.

use crate::Float;
use rayon::iter::Either;
use rayon::prelude::*;

/// Elements per task: below this, scheduling costs more than the arithmetic.
const CHUNK: usize = 1 << 14;

/// √(2/π), built as PyTorch builds `kBeta` (`M_SQRT2 · M_2_SQRTPI · 0.5`).
const GELU_BETA: f64 = std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5;
/// The cubic coefficient of the tanh approximation (Hendrycks & Gimpel 2016; PyTorch's `kKappa`).
const GELU_KAPPA: f64 = 0.044715;

/// x: \[n\] → y: \[n\]
pub fn silu_forward<T: Float>(x: &[T], y: &mut [T]) {
    unary("silu_forward", x, y, silu);
}

/// x, dy: \[n\] → dx: \[n\]
pub fn silu_backward<T: Float>(x: &[T], dy: &[T], dx: &mut [T]) {
    binary("silu_backward", x, dy, dx, |x, dy| dy * silu_grad(x));
}

/// x: \[n\] → y: \[n\]
pub fn gelu_tanh_forward<T: Float>(x: &[T], y: &mut [T]) {
    unary("gelu_tanh_forward", x, y, gelu_tanh);
}

/// x, dy: \[n\] → dx: \[n\]
pub fn gelu_tanh_backward<T: Float>(x: &[T], dy: &[T], dx: &mut [T]) {
    binary("gelu_tanh_backward", x, dy, dx, |x, dy| dy * gelu_tanh_grad(x));
}

/// Which gated activation an MLP uses: Llama's SwiGLU or Gemma's GeGLU (tanh gelu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Glu {
    SwiGlu,
    GeGlu,
}

/// gate, up: \[n\] → out: \[n\] = act(gate) ⊙ up
pub fn glu_forward<T: Float>(kind: Glu, gate: &[T], up: &[T], out: &mut [T]) {
    match kind {
        Glu::SwiGlu => binary("swiglu_forward", gate, up, out, |g, u| silu(g) * u),
        Glu::GeGlu => binary("geglu_forward", gate, up, out, |g, u| gelu_tanh(g) * u),
    }
}

/// gate, up, d_out: \[n\] → d_gate, d_up: \[n\]
pub fn glu_backward<T: Float>(kind: Glu, gate: &[T], up: &[T], d_out: &[T], d_gate: &mut [T], d_up: &mut [T]) {
    match kind {
        Glu::SwiGlu => glu_grads("swiglu_backward", gate, up, d_out, d_gate, d_up, None, silu, silu_grad),
        Glu::GeGlu => glu_grads("geglu_backward", gate, up, d_out, d_gate, d_up, None, gelu_tanh, gelu_tanh_grad),
    }
}

/// gate, up, d_out: \[n\] → d_gate, d_up, out: \[n\]: [`glu_backward`]'s gradients and [`glu_forward`]'s product, with
/// the bits of each, in one pass; act(gate) is evaluated once for both d_up and out.
pub fn glu_backward_out<T: Float>(
    kind: Glu,
    gate: &[T],
    up: &[T],
    d_out: &[T],
    d_gate: &mut [T],
    d_up: &mut [T],
    out: &mut [T],
) {
    let out = Some(out);
    match kind {
        Glu::SwiGlu => glu_grads("swiglu_backward_out", gate, up, d_out, d_gate, d_up, out, silu, silu_grad),
        Glu::GeGlu => glu_grads("geglu_backward_out", gate, up, d_out, d_gate, d_up, out, gelu_tanh, gelu_tanh_grad),
    }
}

/// x: \[n\] → y: \[n\]
pub fn softcap_forward<T: Float>(x: &[T], cap: T, y: &mut [T]) {
    unary("softcap_forward", x, y, |x| (x / cap).tanh() * cap);
}

/// x, dy: \[n\] → dx: \[n\]
pub fn softcap_backward<T: Float>(x: &[T], cap: T, dy: &[T], dx: &mut [T]) {
    // d/dx cap·tanh(x/cap) = 1 − tanh²(x/cap): the cap cancels.
    binary("softcap_backward", x, dy, dx, |x, dy| {
        let t = (x / cap).tanh();
        dy * (T::one() - t * t)
    });
}

/// Two branches so that `exp` only ever sees −|z|: no intermediate overflows to infinity at any |z|.
fn sigmoid<T: Float>(z: T) -> T {
    if z >= T::zero() {
        T::one() / (T::one() + (-z).exp())
    } else {
        let e = z.exp();
        e / (T::one() + e)
    }
}

fn silu<T: Float>(z: T) -> T {
    z * sigmoid(z)
}

/// d/dz z·σ(z) = σ(z)·(1 + z·(1 − σ(z))), PyTorch's `silu_backward` form.
fn silu_grad<T: Float>(z: T) -> T {
    let s = sigmoid(z);
    s * (T::one() + z * (T::one() - s))
}

fn gelu_tanh<T: Float>(z: T) -> T {
    let inner = T::c(GELU_BETA) * (z + T::c(GELU_KAPPA) * (z * z * z));
    T::c(0.5) * z * (T::one() + inner.tanh())
}

/// PyTorch's `GeluBackward` for `approximate='tanh'`: product rule over `0.5·z` and `1 + tanh(inner)`.
fn gelu_tanh_grad<T: Float>(z: T) -> T {
    let z_sq = z * z;
    let inner = T::c(GELU_BETA) * (z + T::c(GELU_KAPPA) * (z_sq * z));
    let t = inner.tanh();
    let left = T::c(0.5) * z;
    let right = T::one() + t;
    let left_grad = T::c(0.5) * right;
    let right_grad = T::one() - t * t;
    let inner_grad = T::c(GELU_BETA) * (T::one() + T::c(3.0) * T::c(GELU_KAPPA) * z_sq);
    left_grad + left * right_grad * inner_grad
}

fn unary<T: Float>(what: &str, x: &[T], y: &mut [T], f: impl Fn(T) -> T + Sync) {
    assert_eq!(y.len(), x.len(), "{what}: output length");
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = f(x);
        }
    });
}

fn binary<T: Float>(what: &str, a: &[T], b: &[T], y: &mut [T], f: impl Fn(T, T) -> T + Sync) {
    assert_eq!(b.len(), a.len(), "{what}: input lengths differ");
    assert_eq!(y.len(), a.len(), "{what}: output length");
    y.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).zip(b.par_chunks(CHUNK)).for_each(|((y, a), b)| {
        for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
            *y = f(a, b);
        }
    });
}

/// out = act(gate) ⊙ up, so d_up = d_out ⊙ act(gate) and d_gate = (d_out ⊙ up) ⊙ act′(gate), autograd's order; the
/// product itself, when `out` is given, in the forward's order.
#[allow(clippy::too_many_arguments)]
fn glu_grads<T: Float>(
    what: &str,
    gate: &[T],
    up: &[T],
    d_out: &[T],
    d_gate: &mut [T],
    d_up: &mut [T],
    out: Option<&mut [T]>,
    act: impl Fn(T) -> T + Sync,
    act_grad: impl Fn(T) -> T + Sync,
) {
    let n = gate.len();
    assert_eq!(up.len(), n, "{what}: up length");
    assert_eq!(d_out.len(), n, "{what}: d_out length");
    assert_eq!(d_gate.len(), n, "{what}: d_gate length");
    assert_eq!(d_up.len(), n, "{what}: d_up length");
    // One optional out chunk beside each chunk of the gradients, so both cases share one indexed zip.
    let out_chunks = match out {
        Some(out) => {
            assert_eq!(out.len(), n, "{what}: out length");
            Either::Left(out.par_chunks_mut(CHUNK).map(Some))
        }
        None => Either::Right((0..n.div_ceil(CHUNK)).into_par_iter().map(|_| None)),
    };
    d_gate
        .par_chunks_mut(CHUNK)
        .zip(d_up.par_chunks_mut(CHUNK))
        .zip(out_chunks)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)).zip(d_out.par_chunks(CHUNK)))
        .for_each(|(((d_gate, d_up), mut out), ((gate, up), d_out))| {
            let elements = d_gate.iter_mut().zip(d_up).zip(gate.iter().zip(up).zip(d_out));
            for (i, ((dg, du), ((&g, &u), &d))) in elements.enumerate() {
                let ag = act(g);
                *dg = d * u * act_grad(g);
                *du = d * ag;
                if let Some(out) = out.as_deref_mut() {
                    out[i] = ag * u;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_gradient, dot, randn, Tolerance};
    use crate::Rng;

    const SIZES: [usize; 4] = [1, 5, 17, 64];
    /// Two f64 evaluations of the same formula in different orders.
    const F64: Tolerance = Tolerance { abs: 1e-13, rel: 1e-13 };
    const CAP: f64 = 30.0;

    // Outputs start as NaN so that an element the kernel forgot to write fails every comparison.
    fn run1<T: Float>(f: impl Fn(&[T], &mut [T]), x: &[T]) -> Vec<T> {
        let mut y = vec![T::nan(); x.len()];
        f(x, &mut y);
        y
    }

    fn run2<T: Float>(f: impl Fn(&[T], &[T], &mut [T]), a: &[T], b: &[T]) -> Vec<T> {
        let mut y = vec![T::nan(); a.len()];
        f(a, b, &mut y);
        y
    }

    type GluBackward<T> = fn(&[T], &[T], &[T], &mut [T], &mut [T]);

    fn run_glu_backward<T: Float>(f: GluBackward<T>, gate: &[T], up: &[T], d_out: &[T]) -> (Vec<T>, Vec<T>) {
        let mut d_gate = vec![T::nan(); gate.len()];
        let mut d_up = vec![T::nan(); gate.len()];
        f(gate, up, d_out, &mut d_gate, &mut d_up);
        (d_gate, d_up)
    }

    fn swiglu_fwd<T: Float>(gate: &[T], up: &[T], out: &mut [T]) {
        glu_forward(Glu::SwiGlu, gate, up, out);
    }

    fn geglu_fwd<T: Float>(gate: &[T], up: &[T], out: &mut [T]) {
        glu_forward(Glu::GeGlu, gate, up, out);
    }

    fn swiglu_bwd<T: Float>(gate: &[T], up: &[T], d_out: &[T], d_gate: &mut [T], d_up: &mut [T]) {
        glu_backward(Glu::SwiGlu, gate, up, d_out, d_gate, d_up);
    }

    fn geglu_bwd<T: Float>(gate: &[T], up: &[T], d_out: &[T], d_gate: &mut [T], d_up: &mut [T]) {
        glu_backward(Glu::GeGlu, gate, up, d_out, d_gate, d_up);
    }

    fn softcap_fwd<T: Float>(x: &[T], y: &mut [T]) {
        softcap_forward(x, T::c(CAP), y);
    }

    fn softcap_bwd<T: Float>(x: &[T], dy: &[T], dx: &mut [T]) {
        softcap_backward(x, T::c(CAP), dy, dx);
    }

    /// Inputs spread over the saturating tails as well as the curved middle.
    fn inputs(rng: &mut Rng, n: usize, scale: f64) -> Vec<f64> {
        randn(rng, n).iter().map(|v| v * scale).collect()
    }

    fn ref_silu(z: f64) -> f64 {
        z / (1.0 + (-z).exp())
    }

    fn ref_gelu_tanh(z: f64) -> f64 {
        0.5 * z * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (z + 0.044715 * z.powi(3))).tanh())
    }

    #[test]
    fn known_values() {
        let z = [0.0, 1.0, -1.0, 2.0];
        assert_close("silu", &run1(silu_forward, &z[..3]), &[0.0, 0.7310585786300049, -0.2689414213699951], F64);
        // The exact (erf) GELU of 1 is 0.8413447460685429: the tanh approximation is distinguishable at 1.5e-4.
        let want = [0.0, 0.8411919906082768, -0.15880800939172324, 1.954597694087775];
        assert_close("gelu_tanh", &run1(gelu_tanh_forward, &z), &want, F64);
        assert_eq!(GELU_BETA, (2.0 / std::f64::consts::PI).sqrt());
    }

    #[test]
    fn forwards_match_direct_formulas() {
        let mut rng = Rng::new(1);
        for n in SIZES {
            let x = inputs(&mut rng, n, 4.0);
            let u = randn(&mut rng, n);
            let silu_x: Vec<f64> = x.iter().map(|&z| ref_silu(z)).collect();
            let gelu_x: Vec<f64> = x.iter().map(|&z| ref_gelu_tanh(z)).collect();
            let times_u = |a: &[f64]| a.iter().zip(&u).map(|(a, u)| a * u).collect::<Vec<_>>();
            assert_close("silu", &run1(silu_forward, &x), &silu_x, F64);
            assert_close("gelu_tanh", &run1(gelu_tanh_forward, &x), &gelu_x, F64);
            assert_close("swiglu", &run2(swiglu_fwd, &x, &u), &times_u(&silu_x), F64);
            assert_close("geglu", &run2(geglu_fwd, &x, &u), &times_u(&gelu_x), F64);
            let x = inputs(&mut rng, n, 2.0 * CAP);
            let capped: Vec<f64> = x.iter().map(|z| CAP * (z / CAP).tanh()).collect();
            assert_close("softcap", &run1(softcap_fwd, &x), &capped, F64);
        }
    }

    #[test]
    fn unary_backwards_match_finite_differences() {
        let mut rng = Rng::new(2);
        type Pair = (&'static str, fn(&[f64], &mut [f64]), fn(&[f64], &[f64], &mut [f64]), f64);
        let ops: [Pair; 3] = [
            ("silu", silu_forward, silu_backward, 4.0),
            ("gelu_tanh", gelu_tanh_forward, gelu_tanh_backward, 4.0),
            ("softcap", softcap_fwd, softcap_bwd, 2.0 * CAP),
        ];
        for (name, fwd, bwd, scale) in ops {
            for n in SIZES {
                let x = inputs(&mut rng, n, scale);
                let g = randn(&mut rng, n);
                let dx = run2(bwd, &x, &g);
                check_gradient(&format!("{name} n {n}"), &x, &dx, |x| dot(&run1(fwd, x), &g));
            }
        }
    }

    #[test]
    fn glu_backwards_match_finite_differences() {
        let mut rng = Rng::new(3);
        type Pair = (&'static str, fn(&[f64], &[f64], &mut [f64]), GluBackward<f64>);
        let ops: [Pair; 2] = [("swiglu", swiglu_fwd, swiglu_bwd), ("geglu", geglu_fwd, geglu_bwd)];
        for (name, fwd, bwd) in ops {
            for n in SIZES {
                let gate = inputs(&mut rng, n, 4.0);
                let up = randn(&mut rng, n);
                let g = randn(&mut rng, n);
                let (d_gate, d_up) = run_glu_backward(bwd, &gate, &up, &g);
                check_gradient(&format!("{name} d_gate n {n}"), &gate, &d_gate, |x| dot(&run2(fwd, x, &up), &g));
                check_gradient(&format!("{name} d_up n {n}"), &up, &d_up, |u| dot(&run2(fwd, &gate, u), &g));
            }
        }
    }

    /// Past exp's overflow point (f32: 88.7, f64: 709.8) every output is finite and on its asymptote; the abs bound
    /// admits f32's rounding of 1 − tanh² near saturation.
    fn large_inputs_saturate<T: Float>() {
        for big in [50.0, 90.0, 710.0, 1000.0, 1e4] {
            let z = [T::c(big), T::c(-big)];
            let ones = [T::one(); 2];
            let check = |what: &str, got: Vec<T>, want: [f64; 2]| {
                let got: Vec<f64> = got.iter().map(|v| v.f64()).collect();
                assert_close(&format!("{what} at ±{big}"), &got, &want, Tolerance { abs: 1e-6, rel: 1e-6 });
            };
            check("silu", run1(silu_forward, &z), [big, 0.0]);
            check("silu grad", run2(silu_backward, &z, &ones), [1.0, 0.0]);
            check("gelu_tanh", run1(gelu_tanh_forward, &z), [big, 0.0]);
            check("gelu_tanh grad", run2(gelu_tanh_backward, &z, &ones), [1.0, 0.0]);
            let t = (big / CAP).tanh();
            check("softcap", run1(softcap_fwd, &z), [CAP * t, -CAP * t]);
            check("softcap grad", run2(softcap_bwd, &z, &ones), [1.0 - t * t; 2]);
            check("swiglu", run2(swiglu_fwd, &z, &ones), [big, 0.0]);
            check("geglu", run2(geglu_fwd, &z, &ones), [big, 0.0]);
            for bwd in [swiglu_bwd as GluBackward<T>, geglu_bwd] {
                let (d_gate, d_up) = run_glu_backward(bwd, &z, &ones, &ones);
                check("glu d_gate", d_gate, [1.0, 0.0]);
                check("glu d_up", d_up, [big, 0.0]);
            }
        }
    }

    #[test]
    fn large_inputs_saturate_without_nan() {
        large_inputs_saturate::<f32>();
        large_inputs_saturate::<f64>();
    }

    #[test]
    fn f32_agrees_with_f64() {
        let mut rng = Rng::new(4);
        let n = 257;
        // Both precisions see the same f32-representable inputs, so only the arithmetic differs.
        let round = |v: Vec<f64>| v.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let widen = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let (x, u, g) = (round(inputs(&mut rng, n, 4.0)), round(randn(&mut rng, n)), round(randn(&mut rng, n)));
        let (xw, uw, gw) = (widen(&x), widen(&u), widen(&g));
        let tol = Tolerance::F32;
        assert_close("silu", &widen(&run1(silu_forward, &x)), &run1(silu_forward, &xw), tol);
        assert_close("gelu", &widen(&run1(gelu_tanh_forward, &x)), &run1(gelu_tanh_forward, &xw), tol);
        assert_close("silu'", &widen(&run2(silu_backward, &x, &g)), &run2(silu_backward, &xw, &gw), tol);
        assert_close("gelu'", &widen(&run2(gelu_tanh_backward, &x, &g)), &run2(gelu_tanh_backward, &xw, &gw), tol);
        assert_close("swiglu", &widen(&run2(swiglu_fwd, &x, &u)), &run2(swiglu_fwd, &xw, &uw), tol);
        assert_close("geglu", &widen(&run2(geglu_fwd, &x, &u)), &run2(geglu_fwd, &xw, &uw), tol);
        for bwd in [(swiglu_bwd as GluBackward<f32>, swiglu_bwd as GluBackward<f64>), (geglu_bwd, geglu_bwd)] {
            let (dg32, du32) = run_glu_backward(bwd.0, &x, &u, &g);
            let (dg64, du64) = run_glu_backward(bwd.1, &xw, &uw, &gw);
            assert_close("glu d_gate", &widen(&dg32), &dg64, tol);
            assert_close("glu d_up", &widen(&du32), &du64, tol);
        }
        let xc = round(inputs(&mut rng, n, 2.0 * CAP));
        let xcw = widen(&xc);
        assert_close("softcap", &widen(&run1(softcap_fwd, &xc)), &run1(softcap_fwd, &xcw), tol);
        assert_close("softcap'", &widen(&run2(softcap_bwd, &xc, &g)), &run2(softcap_bwd, &xcw, &gw), tol);
    }

    #[test]
    fn inputs_longer_than_a_chunk_are_written_everywhere() {
        let mut rng = Rng::new(5);
        let n = 3 * CHUNK + 7;
        let x = inputs(&mut rng, n, 4.0);
        let u = randn(&mut rng, n);
        let want: Vec<f64> = x.iter().zip(&u).map(|(&z, u)| ref_silu(z) * u).collect();
        assert_close("swiglu", &run2(swiglu_fwd, &x, &u), &want, F64);
        let (d_gate, d_up) = run_glu_backward(geglu_bwd, &x, &u, &u);
        assert!(d_gate.iter().chain(&d_up).all(|v| v.is_finite()));
    }

    /// `glu_backward_out` against `glu_backward` and `glu_forward`, bit for bit, past a chunk too.
    fn backward_out_writes_the_same_bits<T: Float>(rng: &mut Rng) {
        let bits = |v: &[T]| v.iter().map(|v| v.f64().to_bits()).collect::<Vec<_>>();
        let cast = |v: Vec<f64>| v.into_iter().map(T::c).collect::<Vec<T>>();
        type Pair<T> = (Glu, fn(&[T], &[T], &mut [T]), GluBackward<T>);
        let ops: [Pair<T>; 2] = [(Glu::SwiGlu, swiglu_fwd, swiglu_bwd), (Glu::GeGlu, geglu_fwd, geglu_bwd)];
        for (kind, fwd, bwd) in ops {
            for n in SIZES.into_iter().chain([CHUNK + 3]) {
                let (gate, up, d_out) = (cast(inputs(rng, n, 4.0)), cast(randn(rng, n)), cast(randn(rng, n)));
                let (mut d_gate, mut d_up, mut out) = (vec![T::nan(); n], vec![T::nan(); n], vec![T::nan(); n]);
                glu_backward_out(kind, &gate, &up, &d_out, &mut d_gate, &mut d_up, &mut out);
                let (want_gate, want_up) = run_glu_backward(bwd, &gate, &up, &d_out);
                assert_eq!(bits(&d_gate), bits(&want_gate), "{kind:?} d_gate n {n}");
                assert_eq!(bits(&d_up), bits(&want_up), "{kind:?} d_up n {n}");
                assert_eq!(bits(&out), bits(&run2(fwd, &gate, &up)), "{kind:?} out n {n}");
            }
        }
    }

    #[test]
    fn backward_out_equals_backward_and_forward_bit_for_bit() {
        let mut rng = Rng::new(6);
        backward_out_writes_the_same_bits::<f32>(&mut rng);
        backward_out_writes_the_same_bits::<f64>(&mut rng);
    }

    #[test]
    #[should_panic(expected = "swiglu_forward: input lengths differ")]
    fn length_mismatch_panics() {
        run2(swiglu_fwd, &[1.0; 3], &[1.0; 2]);
    }
}
