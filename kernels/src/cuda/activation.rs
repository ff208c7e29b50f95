//! Launchers of `kernels/cuda/activation.cu`, twins of [`crate::activation`]. Every kernel maps 8-element chunks
//! (16-byte accesses) on a one-wave grid.

use super::source::Module;
use super::{elementwise_device, kernel, launch, wave_config, DeviceBuffer, GpuFloat, Result};
pub use crate::activation::Glu;

/// x: \[n\] → y: \[n\]
pub fn silu_forward<T: GpuFloat>(x: &DeviceBuffer<T>, y: &mut DeviceBuffer<T>) -> Result<()> {
    unary(kernel!("silu_forward", T), x, None, y)
}

/// x, dy: \[n\] → dx: \[n\]
pub fn silu_backward<T: GpuFloat>(x: &DeviceBuffer<T>, dy: &DeviceBuffer<T>, dx: &mut DeviceBuffer<T>) -> Result<()> {
    binary(kernel!("silu_backward", T), x, None, dy, dx)
}

/// x: \[n\] → y: \[n\]
pub fn gelu_tanh_forward<T: GpuFloat>(x: &DeviceBuffer<T>, y: &mut DeviceBuffer<T>) -> Result<()> {
    unary(kernel!("gelu_tanh_forward", T), x, None, y)
}

/// x, dy: \[n\] → dx: \[n\]
pub fn gelu_tanh_backward<T: GpuFloat>(
    x: &DeviceBuffer<T>,
    dy: &DeviceBuffer<T>,
    dx: &mut DeviceBuffer<T>,
) -> Result<()> {
    binary(kernel!("gelu_tanh_backward", T), x, None, dy, dx)
}

/// gate, up: \[n\] → out: \[n\] = act(gate) ⊙ up
pub fn glu_forward<T: GpuFloat>(
    kind: Glu,
    gate: &DeviceBuffer<T>,
    up: &DeviceBuffer<T>,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    let kernel = match kind {
        Glu::SwiGlu => kernel!("swiglu_forward", T),
        Glu::GeGlu => kernel!("geglu_forward", T),
    };
    binary(kernel, gate, None, up, out)
}

/// gate, up, d_out: \[n\] → d_gate, d_up: \[n\]
pub fn glu_backward<T: GpuFloat>(
    kind: Glu,
    gate: &DeviceBuffer<T>,
    up: &DeviceBuffer<T>,
    d_out: &DeviceBuffer<T>,
    d_gate: &mut DeviceBuffer<T>,
    d_up: &mut DeviceBuffer<T>,
) -> Result<()> {
    let kernel = match kind {
        Glu::SwiGlu => kernel!("swiglu_backward", T),
        Glu::GeGlu => kernel!("geglu_backward", T),
    };
    glu_grads(kernel, gate, up, d_out, d_gate, d_up)
}

/// gate, up, d_out: \[n\] → d_gate, d_up: \[n\] ([`glu_backward`]'s), and [`glu_forward`]'s product written over
/// d_out, in one pass.
pub fn glu_backward_out<T: GpuFloat>(
    kind: Glu,
    gate: &DeviceBuffer<T>,
    up: &DeviceBuffer<T>,
    d_out: &mut DeviceBuffer<T>,
    d_gate: &mut DeviceBuffer<T>,
    d_up: &mut DeviceBuffer<T>,
) -> Result<()> {
    let kernel = match kind {
        Glu::SwiGlu => kernel!("swiglu_backward_out", T),
        Glu::GeGlu => kernel!("geglu_backward_out", T),
    };
    // The kernel writes d_out, which the &mut borrow holds exclusively.
    glu_grads(kernel, gate, up, d_out, d_gate, d_up)
}

/// `kernel(const T* gate, const T* up, [const] T* d_out, T* d_gate, T* d_up, u64 n)`: a GLU backward, the
/// `*_backward_out` ones also writing d_out (each element read before the same thread writes it; their callers hold
/// d_out by &mut).
fn glu_grads<T: GpuFloat>(
    kernel: &'static str,
    gate: &DeviceBuffer<T>,
    up: &DeviceBuffer<T>,
    d_out: &DeviceBuffer<T>,
    d_gate: &mut DeviceBuffer<T>,
    d_up: &mut DeviceBuffer<T>,
) -> Result<()> {
    let Some(dev) = elementwise_device(kernel, &[gate, up, d_out, d_gate, d_up]) else { return Ok(()) };
    let n = gate.len();
    let cfg = wave_config(dev, Module::Activation, kernel, n.div_ceil(8))?;
    let (pg, pu, pd, pdg, pdu, n64) = (gate.ptr(), up.ptr(), d_out.ptr(), d_gate.ptr(), d_up.ptr(), n as u64);
    // SAFETY: the kernel's parameters are as above; all five buffers hold n elements on this device (asserted), d_gate
    // and d_up are distinct (two &mut borrows), and d_out is distinct from both and, where the kernel writes it,
    // exclusively the caller's (see glu_backward_out).
    unsafe { launch!(dev, Module::Activation, kernel, cfg; pg, pu, pd, pdg, pdu, n64) }
}

/// x: \[n\] → y: \[n\] = cap·tanh(x/cap)
pub fn softcap_forward<T: GpuFloat>(x: &DeviceBuffer<T>, cap: f32, y: &mut DeviceBuffer<T>) -> Result<()> {
    unary(kernel!("softcap_forward", T), x, Some(cap), y)
}

/// x, dy: \[n\] → dx: \[n\]
pub fn softcap_backward<T: GpuFloat>(
    x: &DeviceBuffer<T>,
    cap: f32,
    dy: &DeviceBuffer<T>,
    dx: &mut DeviceBuffer<T>,
) -> Result<()> {
    binary(kernel!("softcap_backward", T), x, Some(cap), dy, dx)
}

/// `kernel(const T* x, [float cap,] T* y, u64 n)`.
fn unary<T: GpuFloat>(
    kernel: &'static str,
    x: &DeviceBuffer<T>,
    cap: Option<f32>,
    y: &mut DeviceBuffer<T>,
) -> Result<()> {
    let Some(dev) = elementwise_device(kernel, &[x, y]) else { return Ok(()) };
    let cfg = wave_config(dev, Module::Activation, kernel, y.len().div_ceil(8))?;
    let (px, py, n) = (x.ptr(), y.ptr(), y.len() as u64);
    // SAFETY: the kernel's parameters are (const T* x, [float cap,] T* y, u64 n), passed in that order with the cap
    // exactly for the softcap kernels; x and y hold n elements on this device (asserted).
    unsafe {
        match cap {
            Some(cap) => launch!(dev, Module::Activation, kernel, cfg; px, cap, py, n),
            None => launch!(dev, Module::Activation, kernel, cfg; px, py, n),
        }
    }
}

/// `kernel(const T* a, [float cap,] const T* b, T* out, u64 n)`.
fn binary<T: GpuFloat>(
    kernel: &'static str,
    a: &DeviceBuffer<T>,
    cap: Option<f32>,
    b: &DeviceBuffer<T>,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    let Some(dev) = elementwise_device(kernel, &[a, b, out]) else { return Ok(()) };
    let cfg = wave_config(dev, Module::Activation, kernel, out.len().div_ceil(8))?;
    let (pa, pb, po, n) = (a.ptr(), b.ptr(), out.ptr(), out.len() as u64);
    // SAFETY: the kernel's parameters are (const T* a, [float cap,] const T* b, T* out, u64 n), passed in that order
    // with the cap exactly for the softcap kernel; a, b and out hold n elements on this device (asserted).
    unsafe {
        match cap {
            Some(cap) => launch!(dev, Module::Activation, kernel, cfg; pa, cap, pb, po, n),
            None => launch!(dev, Module::Activation, kernel, cfg; pa, pb, po, n),
        }
    }
}
