//! The flash backward's passes around its kernel (`kernels/cuda/attention.cu`): delta = rowsum(dO ⊙ O) with the f32
//! dQ accumulator zeroed before it, and the accumulator rounded into dQ after it.

use super::{reference, AttentionFloat, Half};
use crate::cuda::source::Module;
use crate::cuda::{config, grid_for, launch, CudaDevice, DeviceBuffer, Result};

/// delta ([rows] f32) from `out` and `d_out` ([rows, hd]), and `dq_accum` ([rows, hd] f32) zeroed: one pass of 16-byte
/// accesses where hd is 8 times a power of two up to 256 and the buffers are 16-byte aligned, else the reference
/// delta kernel and a memset.
pub(super) fn delta_and_zero<T: AttentionFloat>(
    dev: &CudaDevice,
    half: Half,
    out: &DeviceBuffer<T>,
    d_out: &DeviceBuffer<T>,
    delta: &DeviceBuffer<f32>,
    dq_accum: &mut DeviceBuffer<f32>,
    hd: u32,
) -> Result<()> {
    let units = hd / 8;
    let vector = hd % 8 == 0
        && units.is_power_of_two()
        && units <= 32
        && [out.ptr(), d_out.ptr(), dq_accum.ptr()].iter().all(|&a| a % 16 == 0);
    if !vector {
        reference::launch_delta(dev, out, d_out, delta, hd)?;
        return dq_accum.zero();
    }
    let kernel = half.pick("attention_delta_zero_bf16", "attention_delta_zero_f16");
    let (po, pdo, pdelta, pacc) = (out.ptr(), d_out.ptr(), delta.ptr(), dq_accum.ptr());
    let (rows, log2_units) = (delta.len() as u64, units.trailing_zeros());
    // SAFETY: attention_delta_zero_T(const T* out, const T* d_out, float* delta, float* dq_accum, u64 rows, unsigned
    // log2_units): out, d_out and dq_accum hold rows·hd elements (asserted by the caller), 16-byte aligned (checked
    // above), delta rows f32, hd = 8·2^log2_units; on this device.
    unsafe {
        launch!(dev, Module::Attention, kernel, config(grid_for(dq_accum.len() / 8)); po, pdo, pdelta, pacc, rows, log2_units)
    }
}

/// dq = dq_accum rounded to T, 16-byte accesses where both allow them.
pub(super) fn convert_dq<T: AttentionFloat>(
    dev: &CudaDevice,
    half: Half,
    dq_accum: &DeviceBuffer<f32>,
    // Written by the kernel through its address (the caller holds it mutably).
    dq: &DeviceBuffer<T>,
) -> Result<()> {
    let kernel = half.pick("attention_dq_convert_bf16", "attention_dq_convert_f16");
    let (pa, pd, n) = (dq_accum.ptr(), dq.ptr(), dq.len() as u64);
    let vector = i32::from(n % 8 == 0 && pa % 16 == 0 && pd % 16 == 0);
    let threads = if vector == 1 { dq.len() / 8 } else { dq.len() };
    // SAFETY: attention_dq_convert_T(const float* dq_accum, T* dq, u64 n, int vector): both hold n elements (asserted by
    // the caller), on this device; `vector` only where n % 8 == 0 and both are 16-byte aligned.
    unsafe { launch!(dev, Module::Attention, kernel, config(grid_for(threads)); pa, pd, n, vector) }
}
