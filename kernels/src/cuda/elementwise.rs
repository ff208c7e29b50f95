//! Launchers of `kernels/cuda/elementwise.cu`, twins of [`crate::elementwise`].

use super::source::Module;
use super::{
    config, elementwise_device, grid_for, kernel, launch, same_device, u32_arg, wave_config, DeviceBuffer, GpuFloat,
    Result,
};

/// a: \[len\], b: \[len\] → out: \[len\] = a + b
pub fn add<T: GpuFloat>(a: &DeviceBuffer<T>, b: &DeviceBuffer<T>, out: &mut DeviceBuffer<T>) -> Result<()> {
    binary(kernel!("add", T), a, b, out)
}

/// a: \[len\], b: \[len\] → out: \[len\] = a ⊙ b
pub fn mul<T: GpuFloat>(a: &DeviceBuffer<T>, b: &DeviceBuffer<T>, out: &mut DeviceBuffer<T>) -> Result<()> {
    binary(kernel!("mul", T), a, b, out)
}

/// x: \[len\] → out: \[len\] = s·x
pub fn scale<T: GpuFloat>(x: &DeviceBuffer<T>, s: f32, out: &mut DeviceBuffer<T>) -> Result<()> {
    let Some(dev) = elementwise_device("scale", &[x, out]) else { return Ok(()) };
    let kernel = kernel!("scale", T);
    let (px, po, n) = (x.ptr(), out.ptr(), out.len() as u64);
    let cfg = wave_config(dev, Module::Elementwise, kernel, out.len().div_ceil(8))?;
    // SAFETY: scale_T(const T* x, float s, T* out, u64 n); x and out hold n elements on this device (asserted).
    unsafe { launch!(dev, Module::Elementwise, kernel, cfg; px, s, po, n) }
}

/// s: \[1\] f32 → out: \[len\] = scale·s\[0\] in T (the product rounded once, as the CPU twin's f32 product)
pub fn broadcast_scaled<T: GpuFloat>(s: &DeviceBuffer<f32>, scale: f32, out: &mut DeviceBuffer<T>) -> Result<()> {
    assert_eq!(s.len(), 1, "broadcast_scaled: s is one value");
    let dev = same_device("broadcast_scaled", &[s.device(), out.device()]);
    if out.is_empty() {
        return Ok(());
    }
    let kernel = kernel!("broadcast_scaled", T);
    let (ps, po, n) = (s.ptr(), out.ptr(), out.len() as u64);
    // SAFETY: broadcast_scaled_T(const float* s, float scale, T* out, u64 n): s holds one f32, out n elements, on
    // this device (asserted).
    unsafe { launch!(dev, Module::Elementwise, kernel, config(grid_for(out.len())); ps, scale, po, n) }
}

/// x: \[len\] → out: \[len\] = inverted dropout of x with the mask of [`crate::elementwise::dropout`] (keep = 1/(1 − p)
/// as f32; the CPU twin's f32 result bit for bit)
pub fn dropout<T: GpuFloat>(
    x: &DeviceBuffer<T>,
    p: f64,
    seed: u64,
    keep: f32,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    let Some(dev) = elementwise_device("dropout", &[x, out]) else { return Ok(()) };
    let kernel = kernel!("dropout", T);
    let (px, po, n) = (x.ptr(), out.ptr(), out.len() as u64);
    // SAFETY: dropout_T(const T* x, T* out, u64 n, u64 seed, double p, float keep); x and out hold n elements on
    // this device (asserted).
    unsafe { launch!(dev, Module::Elementwise, kernel, config(grid_for(out.len())); px, po, n, seed, p, keep) }
}

/// x: \[len\], y: \[len\] → y += alpha·x (gradient accumulation)
pub fn axpy<T: GpuFloat>(alpha: f32, x: &DeviceBuffer<T>, y: &mut DeviceBuffer<T>) -> Result<()> {
    let Some(dev) = elementwise_device("axpy", &[x, y]) else { return Ok(()) };
    let kernel = kernel!("axpy", T);
    let (px, py, n) = (x.ptr(), y.ptr(), y.len() as u64);
    let cfg = wave_config(dev, Module::Elementwise, kernel, y.len().div_ceil(8))?;
    // SAFETY: axpy_T(float alpha, const T* x, T* y, u64 n); x and y hold n elements on this device (asserted).
    unsafe { launch!(dev, Module::Elementwise, kernel, cfg; alpha, px, py, n) }
}

/// x: [rows, cols], bias: \[cols\] → x += bias broadcast over rows
pub fn add_bias<T: GpuFloat>(x: &mut DeviceBuffer<T>, bias: &DeviceBuffer<T>) -> Result<()> {
    let cols = bias.len();
    if cols == 0 {
        assert!(x.is_empty(), "add_bias: {} elements with an empty bias", x.len());
        return Ok(());
    }
    assert!(x.len() % cols == 0, "add_bias: {} elements are not rows of {cols}", x.len());
    let dev = same_device("add_bias", &[x.device(), bias.device()]);
    if x.is_empty() {
        return Ok(());
    }
    let kernel = kernel!("add_bias", T);
    let (px, pb, n, cols) = (x.ptr(), bias.ptr(), x.len() as u64, u32_arg("add_bias: cols", cols));
    // SAFETY: add_bias_T(T* x, const T* bias, u64 n, unsigned cols); x holds n = rows·cols elements and bias cols
    // (asserted), on this device.
    unsafe { launch!(dev, Module::Elementwise, kernel, config(grid_for(x.len())); px, pb, n, cols) }
}

fn binary<T: GpuFloat>(
    kernel: &'static str,
    a: &DeviceBuffer<T>,
    b: &DeviceBuffer<T>,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    let Some(dev) = elementwise_device(kernel, &[a, b, out]) else { return Ok(()) };
    let cfg = wave_config(dev, Module::Elementwise, kernel, out.len().div_ceil(8))?;
    let (pa, pb, po, n) = (a.ptr(), b.ptr(), out.ptr(), out.len() as u64);
    // SAFETY: add_T / mul_T(const T* a, const T* b, T* out, u64 n); a, b and out hold n elements on this device
    // (asserted).
    unsafe { launch!(dev, Module::Elementwise, kernel, cfg; pa, pb, po, n) }
}
