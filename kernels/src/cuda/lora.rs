//! Launcher of `kernels/cuda/lora.cu`, the twin of [`crate::lora`]: LoRA's delta weight in the fixed order that
//! makes a merge the same bytes on the GPU as on the CPU.

use super::source::Module;
use super::{kernel, launch, same_device, u32_arg, DeviceBuffer, GpuFloat, Result, BLOCK};
use cudarc::driver::LaunchConfig;

/// b: [rows, r], a: [r, cols] → out: [rows, cols] = s·(Σ_k b_ik·a_kj), summed from k = 0 with every operation
/// rounded
pub fn delta<T: GpuFloat>(
    b: &DeviceBuffer<T>,
    a: &DeviceBuffer<T>,
    r: usize,
    s: f32,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    let (rows, cols) = crate::lora::delta_dims(b.len(), a.len(), r, out.len());
    let dev = same_device("lora delta", &[b.device(), a.device(), out.device()]);
    if rows * cols == 0 {
        return Ok(());
    }
    let kernel = kernel!("lora_delta", T);
    let cfg = LaunchConfig {
        grid_dim: (u32_arg("lora delta: column tiles", cols.div_ceil(BLOCK as usize)), rows.min(65535) as u32, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let (pb, pa, po) = (b.ptr(), a.ptr(), out.ptr());
    let (rows32, cols32, r32) =
        (u32_arg("lora delta: rows", rows), u32_arg("lora delta: cols", cols), u32_arg("lora delta: r", r));
    // SAFETY: lora_delta_T(const T* b, const T* a, T* out, unsigned rows, unsigned cols, unsigned r, float s): b
    // holds rows·r elements, a r·cols and out rows·cols (asserted), on this device; threads past cols return, and
    // grid.y strides over rows.
    unsafe { launch!(dev, Module::Lora, kernel, cfg; pb, pa, po, rows32, cols32, r32, s) }
}
