//! Launcher of `kernels/cuda/adamw.cu`, twin of [`crate::adamw::adamw_step`]. Parameters and gradients f32 or bf16;
//! the moments f32.

use super::source::Module;
use super::{config, grid_for, kernel, launch, multi_config, same_device, table_bytes, DeviceBuffer, GpuFloat, Result};
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
    let Scalars { beta1, beta2, decay, step_size, bc2_sqrt, eps } = Scalars::of(h);
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

/// One parameter of [`adamw_multi`]: its value, gradient and moments, f32, of one length.
#[derive(Debug)]
pub struct MultiParam<'a> {
    pub p: &'a mut DeviceBuffer<f32>,
    pub g: &'a DeviceBuffer<f32>,
    pub m: &'a mut DeviceBuffer<f32>,
    pub v: &'a mut DeviceBuffer<f32>,
}

/// [`adamw_step`] of every parameter in `params` in one launch (the same update of each element, so the same bits):
/// an optimizer over hundreds of adapter matrices pays one launch instead of one each.
pub fn adamw_multi(h: &AdamWStep, params: &mut [MultiParam], clip: Option<(&DeviceBuffer<f32>, f32)>) -> Result<()> {
    assert!(h.step >= 1, "adamw: step counts from 1");
    let Some(first) = params.first() else { return Ok(()) };
    let dev = first.p.device();
    // The kernel's AdamwEntry, five 8-byte words per parameter: p, g, m, v, n.
    let mut table = Vec::with_capacity(5 * params.len());
    for q in params.iter() {
        let n = q.p.len();
        assert!(q.g.len() == n && q.m.len() == n && q.v.len() == n, "adamw_multi: lengths differ");
        same_device("adamw_multi", &[dev, q.p.device(), q.g.device(), q.m.device(), q.v.device()]);
        table.extend([q.p.ptr(), q.g.ptr(), q.m.ptr(), q.v.ptr(), n as u64]);
    }
    if let Some((norm_sq, _)) = clip {
        assert_eq!(norm_sq.len(), 1, "adamw: the squared norm is one f32");
        same_device("adamw_multi", &[dev, norm_sq.device()]);
    }
    let longest = params.iter().map(|q| q.p.len()).max().unwrap_or(0);
    let entries = dev.upload(&table_bytes(&table))?;
    let Scalars { beta1, beta2, decay, step_size, bc2_sqrt, eps } = Scalars::of(h);
    let (pnorm, max_norm) = clip.map_or((0u64, 0.0f32), |(norm_sq, max_norm)| (norm_sq.ptr(), max_norm));
    let pe = entries.ptr();
    // SAFETY: adamw_multi_f32(const AdamwEntry* entries, float beta1, float beta2, float decay, float step_size,
    // float bc2_sqrt, float eps, const float* norm_sq, float max_norm) with one row of blocks per entry: `entries`
    // holds params.len() AdamwEntry records (five u64 words each, the struct's layout), each naming four buffers of
    // its n f32 on this device (asserted), the written ones distinct within a parameter (&mut borrows) and across
    // parameters (each &mut borrowed once by the slice); norm_sq is null or one f32 on this device. The table's
    // buffer is freed after the launch in stream order.
    unsafe {
        launch!(dev, Module::Adamw, "adamw_multi_f32", multi_config(params.len(), longest); pe, beta1, beta2, decay, step_size, bc2_sqrt, eps, pnorm, max_norm)
    }
}

/// The update's scalars exactly as the CPU kernel forms them: bias corrections in f64, then one rounding to f32 each.
struct Scalars {
    beta1: f32,
    beta2: f32,
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
}

impl Scalars {
    fn of(h: &AdamWStep) -> Self {
        let bc1 = 1.0 - h.beta1.powf(h.step as f64);
        let bc2 = 1.0 - h.beta2.powf(h.step as f64);
        Scalars {
            beta1: h.beta1 as f32,
            beta2: h.beta2 as f32,
            decay: (1.0 - h.lr * h.weight_decay) as f32,
            step_size: (h.lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: h.eps as f32,
        }
    }
}
