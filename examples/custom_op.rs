//! An op of your own with its hand-written backward, recorded on the tape like the built-in ones (see
//! `runtime/src/ops/`: each `*_op` returns its output and its backward, a closure over exactly what the backward
//! reads), and checked against central finite differences, as every built-in op is.
//!
//!     cargo run --release --example custom_op
//!
//! The op is squared ReLU, y = max(x, 0)² (Primer, So et al. 2021), on the CPU: a GPU version would add a CUDA
//! twin as `runtime/src/ops/activation.rs` does. tests/examples.rs runs [`check`].

use qlora_rt::runtime::op::{backward_fn, bytes, first_grad, Recorded};
use qlora_rt::{DType, Param, Result, Tape, Tensor, Var};

/// y = max(x, 0)²: [any shape] f32 → the same shape.
pub fn squared_relu(x: &Tensor) -> Result<Tensor> {
    let y: Vec<f32> = x.to_dtype(DType::F32).to_vec::<f32>().iter().map(|&v| v.max(0.0).powi(2)).collect();
    Tensor::from_vec(y, x.shape())
}

/// dL/dx = 2·max(x, 0)·dL/dy: [any shape] f32, the shape of x.
pub fn squared_relu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let (xs, dys) = (x.to_dtype(DType::F32).to_vec::<f32>(), dy.to_dtype(DType::F32).to_vec::<f32>());
    let dx: Vec<f32> = xs.iter().zip(&dys).map(|(&x, &g)| 2.0 * x.max(0.0) * g).collect();
    Tensor::from_vec(dx, x.shape())
}

/// [`squared_relu`] for a tape: the output, and its backward as a closure over what it reads, the input (the
/// output alone would lose the sign of x).
pub fn squared_relu_op(x: &Tensor) -> Result<Recorded> {
    let saved = x.clone();
    let backward = backward_fn("squared_relu", bytes([x]), move |grads| {
        Ok(vec![Some(squared_relu_backward(&saved, first_grad(grads)?)?)])
    });
    Ok((squared_relu(x)?, backward))
}

/// Σ squared_relu(x·wᵀ) for a trainable w, recorded on `tape`.
fn loss(tape: &Tape, x: &Var, w: &Param) -> Result<Var> {
    let h = tape.linear(x, &tape.param(w), None)?;
    let y = tape.apply([&h], |[h], _| squared_relu_op(h))?;
    tape.sum(&y)
}

/// The tape's gradient of the loss with respect to w against central finite differences; returns the largest
/// relative difference.
pub fn check() -> Result<f64> {
    let mut rng = qlora_rt::runtime::Rng::new(1);
    let x = Var::constant(Tensor::randn(&[5, 4], 1.0, DType::F32, &mut rng));
    let w = Param::trainable("w", Tensor::randn(&[3, 4], 1.0, DType::F32, &mut rng));
    let tape = Tape::new();
    tape.backward(&loss(&tape, &x, &w)?)?;
    let grad = w.grad().expect("backward reached w").to_vec::<f32>();
    let w0 = w.value().to_vec::<f32>();
    let at = |i: usize, delta: f32| -> Result<f64> {
        let mut moved = w0.clone();
        moved[i] += delta;
        let probe = Param::frozen("w", Tensor::from_vec(moved, &[3, 4])?);
        loss(&Tape::new(), &x, &probe)?.value().to_scalar::<f64>()
    };
    // f32 forward passes: a step of 1e-2 keeps the rounding error of the difference well under its value.
    let h = 1e-2;
    let mut worst = 0.0f64;
    for (i, &g) in grad.iter().enumerate() {
        let numeric = (at(i, h)? - at(i, -h)?) / (2.0 * h as f64);
        worst = worst.max((numeric - g as f64).abs() / (1.0 + numeric.abs()));
    }
    Ok(worst)
}

fn main() -> Result<()> {
    println!("squared_relu: tape gradient within {:.1e} of finite differences", check()?);
    Ok(())
}
