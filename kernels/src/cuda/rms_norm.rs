//! Launchers of `kernels/cuda/rms_norm.cu`, twins of [`crate::rms_norm`]. rstd is f32 whatever the I/O type.

use super::source::Module;
use super::{config, grid_for, kernel, launch, same_device, u32_arg, DeviceBuffer, GpuFloat, Result};
use crate::rms_norm::check_shapes;

/// The weight gradient is reduced over at most this many row blocks: enough blocks to fill a GPU, and a bound on
/// the f32 scratch (this many rows of `dim`).
const MAX_DW_BLOCKS: usize = 256;

/// x: [rows, dim], weight: [dim] → y: [rows, dim], rstd: [rows] f32
pub fn rms_norm_forward<T: GpuFloat>(
    x: &DeviceBuffer<T>,
    weight: &DeviceBuffer<T>,
    dim: usize,
    eps: f32,
    offset: f32,
    y: &mut DeviceBuffer<T>,
    rstd: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let rows = check_shapes(x.len(), weight.len(), dim, rstd.len());
    assert_eq!(y.len(), rows * dim, "rms_norm_forward: y length");
    let dev = same_device("rms_norm_forward", &[x.device(), weight.device(), y.device(), rstd.device()]);
    if rows == 0 {
        return Ok(());
    }
    let kernel = kernel!("rms_norm_forward", T);
    let (px, pw, py, pr) = (x.ptr(), weight.ptr(), y.ptr(), rstd.ptr());
    let dim32 = u32_arg("rms_norm_forward: dim", dim);
    // SAFETY: rms_norm_forward_T(const T* x, const T* weight, T* y, float* rstd, unsigned dim, float eps,
    // float offset), one block per row: x and y hold rows·dim elements, weight dim, rstd rows (asserted), all on
    // this device.
    unsafe {
        launch!(dev, Module::RmsNorm, kernel, config(u32_arg("rms_norm_forward: rows", rows)); px, pw, py, pr, dim32, eps, offset)
    }
}

/// x, dy: [rows, dim], rstd: [rows] f32 → dx: [rows, dim], dw: [dim] (written: Σ over rows, deterministic order)
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_backward<T: GpuFloat>(
    x: &DeviceBuffer<T>,
    weight: &DeviceBuffer<T>,
    rstd: &DeviceBuffer<f32>,
    dy: &DeviceBuffer<T>,
    dim: usize,
    offset: f32,
    dx: &mut DeviceBuffer<T>,
    dw: &mut DeviceBuffer<T>,
) -> Result<()> {
    let rows = check_shapes(x.len(), weight.len(), dim, rstd.len());
    assert_eq!(dy.len(), rows * dim, "rms_norm_backward: dy length");
    assert_eq!(dx.len(), rows * dim, "rms_norm_backward: dx length");
    assert_eq!(dw.len(), dim, "rms_norm_backward: dw length");
    let dev = same_device(
        "rms_norm_backward",
        &[x.device(), weight.device(), rstd.device(), dy.device(), dx.device(), dw.device()],
    );
    if rows == 0 {
        return dw.zero();
    }
    // Block boundaries depend on the shape only, so dw is the same bits on every run.
    let rows_per_block = rows.div_ceil(rows.min(MAX_DW_BLOCKS));
    let blocks = rows.div_ceil(rows_per_block);
    let partial = dev.alloc::<f32>(blocks * dim)?;
    let kernel = kernel!("rms_norm_backward", T);
    let (px, pw, pr, pdy, pdx, pp) = (x.ptr(), weight.ptr(), rstd.ptr(), dy.ptr(), dx.ptr(), partial.ptr());
    let (rows32, dim32) = (u32_arg("rms_norm_backward: rows", rows), u32_arg("rms_norm_backward: dim", dim));
    let (rpb32, blocks32) = (rows_per_block as u32, blocks as u32);
    // SAFETY: rms_norm_backward_T(const T* x, const T* weight, const float* rstd, const T* dy, T* dx,
    // float* dw_partial, unsigned rows, unsigned dim, float offset, unsigned rows_per_block) with `blocks` blocks:
    // x, dy, dx hold rows·dim elements, weight dim, rstd rows (asserted), dw_partial blocks·dim (allocated above;
    // it returns to the pool when dropped, stream-ordered after the reduction below); all on this device.
    unsafe {
        launch!(dev, Module::RmsNorm, kernel, config(blocks32); px, pw, pr, pdy, pdx, pp, rows32, dim32, offset, rpb32)
    }?;
    let kernel = kernel!("rms_norm_dw_reduce", T);
    let pdw = dw.ptr();
    // SAFETY: rms_norm_dw_reduce_T(const float* dw_partial, T* dw, unsigned blocks, unsigned dim): dw_partial holds
    // blocks·dim f32, dw holds dim elements (asserted), on this device.
    unsafe { launch!(dev, Module::RmsNorm, kernel, config(grid_for(dim)); pp, pdw, blocks32, dim32) }
}
