//! Launchers of `kernels/cuda/rope.cu`, twins of [`crate::rope`]'s `rope_forward` / `rope_backward`. The cos/sin
//! tables are f32 ([`crate::rope::rope_tables`] builds them; they are small and shared by every layer).

use super::source::Module;
use super::{config, grid_for, kernel, launch, same_device, u32_arg, DeviceBuffer, GpuFloat, Result};

/// x: [tokens, heads, head_dim], cos/sin: [tokens, head_dim/2] f32 → y: [tokens, heads, head_dim]
pub fn rope_forward<T: GpuFloat>(
    x: &DeviceBuffer<T>,
    cos: &DeviceBuffer<f32>,
    sin: &DeviceBuffer<f32>,
    heads: usize,
    head_dim: usize,
    y: &mut DeviceBuffer<T>,
) -> Result<()> {
    rotate(kernel!("rope_forward", T), x, cos, sin, heads, head_dim, y)
}

/// dy → dx (the inverse rotation), same shapes as forward
pub fn rope_backward<T: GpuFloat>(
    dy: &DeviceBuffer<T>,
    cos: &DeviceBuffer<f32>,
    sin: &DeviceBuffer<f32>,
    heads: usize,
    head_dim: usize,
    dx: &mut DeviceBuffer<T>,
) -> Result<()> {
    rotate(kernel!("rope_backward", T), dy, cos, sin, heads, head_dim, dx)
}

fn rotate<T: GpuFloat>(
    kernel: &'static str,
    x: &DeviceBuffer<T>,
    cos: &DeviceBuffer<f32>,
    sin: &DeviceBuffer<f32>,
    heads: usize,
    head_dim: usize,
    y: &mut DeviceBuffer<T>,
) -> Result<()> {
    let tokens = crate::rope::check_lengths(x.len(), cos.len(), sin.len(), y.len(), heads, head_dim);
    let dev = same_device(kernel, &[x.device(), cos.device(), sin.device(), y.device()]);
    if tokens == 0 {
        return Ok(());
    }
    let pairs = x.len() / 2;
    let (px, pc, ps, py, n) = (x.ptr(), cos.ptr(), sin.ptr(), y.ptr(), pairs as u64);
    let (heads32, half32) = (u32_arg("rope: heads", heads), u32_arg("rope: head_dim", head_dim) / 2);
    // SAFETY: kernel(const T* x, const float* cos, const float* sin, T* y, u64 n, unsigned heads, unsigned half),
    // one thread per rotated pair: x and y hold 2n = tokens·heads·head_dim elements, cos and sin tokens·half
    // (asserted), all on this device.
    unsafe { launch!(dev, Module::Rope, kernel, config(grid_for(pairs)); px, pc, ps, py, n, heads32, half32) }
}
