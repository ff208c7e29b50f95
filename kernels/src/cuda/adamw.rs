//! Launcher of `kernels/cuda/adamw.cu`, twin of [`crate::adamw::adamw_step`]. Parameters and gradients f32 or bf16;
//! the moments f32.

use super::source::Module;
use super::{config, grid_for, kernel, launch, same_device, DeviceBuffer, GpuFloat, Result};
use crate::adamw::AdamWStep;

/// p, g: \[n\], m, v: \[n\] f32 → p, m, v updated in place; with `clip = Some((norm_sq, max_norm))` on the gradient
/// clipped: norm_sq is the squared global norm, one f32 on the device, and the gradient is scaled by
/// [`crate::adamw::clip_factor`] of it inside the kernel.
pub fn adamw_step<T: GpuFloat>(
    h: &AdamWStep,
    p: &mut DeviceBuffer<T>,
    g: &DeviceBuffer<T>,
    m: &mut DeviceBuffer<f32>,
    v: &mut DeviceBuffer<f32>,
    clip: Option<(&DeviceBuffer<f32>, f32)>,
) -> Result<()> {
    assert!(g.len() == p.len() && m.len() == p.len() && v.len() == p.len(), "adamw: lengths differ");
    assert!(h.step >= 1, "adamw: step counts from 1");
    let dev = same_device("adamw", &[p.device(), g.device(), m.device(), v.device()]);
    if let Some((norm_sq, _)) = clip {
        assert_eq!(norm_sq.len(), 1, "adamw: the squared norm is one f32");
        same_device("adamw", &[dev, norm_sq.device()]);
    }
    if p.is_empty() {
        return Ok(());
    }
    // The scalars exactly as the CPU kernel forms them: bias corrections in f64, then one rounding to f32 each.
    let bc1 = 1.0 - h.beta1.powf(h.step as f64);
    let bc2 = 1.0 - h.beta2.powf(h.step as f64);
    let (beta1, beta2) = (h.beta1 as f32, h.beta2 as f32);
    let decay = (1.0 - h.lr * h.weight_decay) as f32;
    let step_size = (h.lr / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let eps = h.eps as f32;
    let kernel = kernel!("adamw_step", T);
    let (pp, pg, pm, pv, n) = (p.ptr(), g.ptr(), m.ptr(), v.ptr(), p.len() as u64);
    let (pnorm, max_norm) = clip.map_or((0u64, 0.0f32), |(norm_sq, max_norm)| (norm_sq.ptr(), max_norm));
    // SAFETY: adamw_step_T(T* p, const T* g, float* m, float* v, u64 n, float beta1, float beta2, float decay,
    // float step_size, float bc2_sqrt, float eps, const float* norm_sq, float max_norm): all four buffers hold n
    // elements on this device (asserted), the three written ones are distinct (&mut borrows), and norm_sq is null
    // or one f32 on this device.
    unsafe {
        launch!(dev, Module::Adamw, kernel, config(grid_for(p.len())); pp, pg, pm, pv, n, beta1, beta2, decay, step_size, bc2_sqrt, eps, pnorm, max_norm)
    }
}
