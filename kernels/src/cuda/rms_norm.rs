//! Launchers of `kernels/cuda/rms_norm.cu`, twins of [`crate::rms_norm`]. rstd is f32 whatever the I/O type.
//!
//! Rows of a multiple of 8 elements take the vector path: a block of one thread per 8 elements owns a step of rows
//! (two bf16 or one f32) at a time and loads the next step before it reduces the current one; the forward's grid is
//! one wave of blocks, the backward's just enough blocks to keep the GPU's bytes in flight (each block adds a row of
//! dw partial sums). Other rows, and rows longer than a block covers, take the scalar path: one block per row.

use super::source::Module;
use super::{aligned16, config, kernel, launch, resident_blocks, same_device, u32_arg, DeviceBuffer, GpuFloat, Result};
use crate::rms_norm::check_shapes;
use cudarc::driver::LaunchConfig;

/// Elements per thread on the vector path: one 16-byte access of bf16, two of f32.
const CHUNK: usize = 8;
/// The scalar backward reduces dw over at most this many row blocks: enough blocks to fill a GPU, and a bound on the
/// f32 scratch (this many rows of `dim`).
const MAX_SCALAR_DW_BLOCKS: usize = 256;

/// x: [rows, dim], weight: \[dim\] → y: [rows, dim], rstd: \[rows\] f32. With `add` = (residual, h), both
/// [rows, dim], the residual stream's add is fused in (`add_rms_norm_forward` on the CPU): h = x + residual is written
/// and normalized in one pass (h is rounded to T before it is normalized).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_forward<T: GpuFloat>(
    x: &DeviceBuffer<T>,
    add: Option<(&DeviceBuffer<T>, &mut DeviceBuffer<T>)>,
    weight: &DeviceBuffer<T>,
    dim: usize,
    eps: f32,
    offset: f32,
    y: &mut DeviceBuffer<T>,
    rstd: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let what = if add.is_some() { "add_rms_norm_forward" } else { "rms_norm_forward" };
    let rows = check_shapes(x.len(), weight.len(), dim, rstd.len());
    if let Some((residual, h)) = &add {
        assert_eq!(residual.len(), rows * dim, "{what}: residual length");
        assert_eq!(h.len(), rows * dim, "{what}: h length");
    }
    assert_eq!(y.len(), rows * dim, "{what}: y length");
    // Fixed arrays, not vectors: a decoding step runs this per layer and is bound by the host's time per launch.
    let dev = same_device(what, &[x.device(), weight.device(), y.device(), rstd.device()]);
    if let Some((residual, h)) = &add {
        same_device(what, &[dev, residual.device(), h.device()]);
    }
    if rows == 0 {
        return Ok(());
    }
    let (px, pw, py, pr) = (x.ptr(), weight.ptr(), y.ptr(), rstd.ptr());
    let add = add.as_ref().map(|(residual, h)| (residual.ptr(), h.ptr()));
    let (rows32, dim32) = (u32_arg(what, rows), u32_arg(what, dim));
    // Without the add, x stands in for residual and h in the alignment check.
    let (pres, ph) = add.unwrap_or((px, px));
    let ptrs = [px, pw, py, pres, ph];
    let [vector, scalar] = match add {
        None => [kernel!("rms_norm_forward", T), kernel!("rms_norm_forward_scalar", T)],
        Some(_) => [kernel!("add_rms_norm_forward", T), kernel!("add_rms_norm_forward_scalar", T)],
    };
    let (kernel, cfg, on_vector_path) = match vector_threads(dim, 1024, &ptrs) {
        Some(threads) => {
            let resident = resident_blocks(dev, Module::RmsNorm, vector, threads)?;
            (vector, block_config(resident.min(rows.div_ceil(step_rows::<T>()) as u32), threads), true)
        }
        None => (scalar, config(rows32), false),
    };
    // SAFETY: the vector kernels take (const T* x, [const T* residual,] const T* weight, [T* h,] T* y, float* rstd,
    // unsigned rows, unsigned dim, float eps, float offset), the scalar ones the same without rows; residual and h
    // exactly for the add_ kernels. The vector kernels run blocks of ⌈dim/8⌉ threads (rounded up to a warp) looping
    // over rows, the scalar ones one block per row. x, residual, h and y hold rows·dim elements, weight dim, rstd rows
    // (asserted); h and y are distinct buffers (two &mut borrows). On the vector path dim is a multiple of 8 and the
    // bases 16-byte aligned (vector_threads). All on this device.
    unsafe {
        match (add, on_vector_path) {
            (None, true) => launch!(dev, Module::RmsNorm, kernel, cfg; px, pw, py, pr, rows32, dim32, eps, offset),
            (None, false) => launch!(dev, Module::RmsNorm, kernel, cfg; px, pw, py, pr, dim32, eps, offset),
            (Some(_), true) => {
                launch!(dev, Module::RmsNorm, kernel, cfg; px, pres, pw, ph, py, pr, rows32, dim32, eps, offset)
            }
            (Some(_), false) => {
                launch!(dev, Module::RmsNorm, kernel, cfg; px, pres, pw, ph, py, pr, dim32, eps, offset)
            }
        }
    }
}

/// The entry points of one backward, by path.
struct BackwardKernels {
    /// The kernels' name, for messages.
    what: &'static str,
    /// Rows of up to 512 threads, [`step_rows`] per step.
    vector: &'static str,
    /// bf16 rows of 513 to 1024 threads, one per step (f32 rows that long take the scalar path: an f32 chunk needs
    /// twice the registers, which 1024 threads do not have).
    wide: &'static str,
    scalar: &'static str,
}

impl BackwardKernels {
    /// The plain backward's, or with `fused` the residual-add one's.
    fn of<T: GpuFloat>(fused: bool) -> BackwardKernels {
        match fused {
            false => BackwardKernels {
                what: "rms_norm_backward",
                vector: kernel!("rms_norm_backward", T),
                wide: "rms_norm_backward_wide_bf16",
                scalar: kernel!("rms_norm_backward_scalar", T),
            },
            true => BackwardKernels {
                what: "add_rms_norm_backward",
                vector: kernel!("add_rms_norm_backward", T),
                wide: "add_rms_norm_backward_wide_bf16",
                scalar: kernel!("add_rms_norm_backward_scalar", T),
            },
        }
    }
}

/// x, dy: [rows, dim], rstd: \[rows\] f32 → dx: [rows, dim], dw: \[dim\] when given (written: Σ over rows, deterministic
/// order; None for a frozen weight, QLoRA's norms, skips the dw partial sums and their reduction launch).
///
/// After [`rms_norm_forward`] with a residual add, x is h and `d_residual` [rows, dim] what reached h from its other
/// readers: the fused kernels then write dx = d_residual + the norm's dx, the gradient of both x and residual of the
/// forward.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_backward<T: GpuFloat>(
    x: &DeviceBuffer<T>,
    weight: &DeviceBuffer<T>,
    rstd: &DeviceBuffer<f32>,
    dy: &DeviceBuffer<T>,
    d_residual: Option<&DeviceBuffer<T>>,
    dim: usize,
    offset: f32,
    dx: &mut DeviceBuffer<T>,
    dw: Option<&mut DeviceBuffer<T>>,
) -> Result<()> {
    let k = BackwardKernels::of::<T>(d_residual.is_some());
    let what = k.what;
    let rows = check_shapes(x.len(), weight.len(), dim, rstd.len());
    assert_eq!(dy.len(), rows * dim, "{what}: dy length");
    assert_eq!(dx.len(), rows * dim, "{what}: dx length");
    let mut devices = vec![x.device(), weight.device(), rstd.device(), dy.device(), dx.device()];
    if let Some(d) = d_residual {
        assert_eq!(d.len(), rows * dim, "{what}: d_residual length");
        devices.push(d.device());
    }
    if let Some(dw) = &dw {
        assert_eq!(dw.len(), dim, "{what}: dw length");
        devices.push(dw.device());
    }
    same_device(what, &devices);
    let dev = x.device();
    if rows == 0 {
        return dw.map_or(Ok(()), |dw| dw.zero());
    }
    let (px, pw, pr, pdy, pdx) = (x.ptr(), weight.ptr(), rstd.ptr(), dy.ptr(), dx.ptr());
    let pdr = d_residual.map_or(0, |d| d.ptr());
    let (rows32, dim32) = (u32_arg(what, rows), u32_arg(what, dim));
    let mut ptrs = vec![px, pw, pdy, pdx];
    ptrs.extend(d_residual.map(|d| d.ptr()));
    let (kernel, cfg, rows_per_block) = match vector_threads(dim, if step_rows::<T>() == 2 { 1024 } else { 512 }, &ptrs)
    {
        Some(threads) => {
            let (kernel, step_rows) = if threads > 512 { (k.wide, 1) } else { (k.vector, step_rows::<T>()) };
            let resident = resident_blocks(dev, Module::RmsNorm, kernel, threads)? as usize;
            // A block has one step of rows of x and dy in flight while it works on the previous one: with dw, enough
            // blocks for 16 bytes per resident thread of the GPU in flight (more would only add dw partial rows);
            // without, all that fit.
            let in_flight = 16 * dev.resident_threads();
            let step_bytes = step_rows * 2 * dim * size_of::<T>();
            let wanted = if dw.is_some() { in_flight.div_ceil(step_bytes).clamp(1, resident) } else { resident };
            let rows_per_block = rows.div_ceil(wanted).next_multiple_of(step_rows);
            (kernel, block_config(rows.div_ceil(rows_per_block) as u32, threads), rows_per_block)
        }
        None => {
            let rows_per_block = rows.div_ceil(rows.min(MAX_SCALAR_DW_BLOCKS));
            (k.scalar, config(rows.div_ceil(rows_per_block) as u32), rows_per_block)
        }
    };
    // Block boundaries depend on the shape and the GPU only, so dw is the same bits on every run.
    let blocks = cfg.grid_dim.0;
    let partial = dev.alloc::<f32>(if dw.is_some() { blocks as usize * dim } else { 0 })?;
    // Null (an empty buffer's address) tells the kernel to skip dw.
    let (pp, rpb32) = (partial.ptr(), rows_per_block as u32);
    // SAFETY: the vector and wide kernels take (const T* x, const T* weight, const float* rstd, const T* dy,
    // [const T* d_residual,] T* dx, float* dw_partial, unsigned rows, unsigned dim, float offset,
    // unsigned rows_per_block), the scalar ones the same; d_residual exactly for the fused kernels. x, dy, dx and
    // d_residual hold rows·dim elements, weight dim, rstd rows (asserted), dw_partial blocks·dim f32 (allocated
    // above, or null without dw; it returns to the pool when dropped, stream-ordered after the reduction below);
    // block b touches rows
    // [b·rows_per_block, (b+1)·rows_per_block) ∩ [0, rows). On the vector paths dim is a multiple of 8 and the bases
    // 16-byte aligned (vector_threads). All on this device.
    unsafe {
        match d_residual {
            None => launch!(dev, Module::RmsNorm, kernel, cfg; px, pw, pr, pdy, pdx, pp, rows32, dim32, offset, rpb32),
            Some(_) => {
                launch!(dev, Module::RmsNorm, kernel, cfg; px, pw, pr, pdy, pdr, pdx, pp, rows32, dim32, offset, rpb32)
            }
        }
    }?;
    let Some(dw) = dw else { return Ok(()) };
    let kernel = kernel!("rms_norm_dw_reduce", T);
    let pdw = dw.ptr();
    // SAFETY: rms_norm_dw_reduce_T(const float* dw_partial, T* dw, unsigned blocks, unsigned dim), ⌈dim/32⌉ blocks
    // of 1024 threads: dw_partial holds blocks·dim f32, dw holds dim elements (asserted), on this device.
    unsafe {
        launch!(dev, Module::RmsNorm, kernel, block_config(dim.div_ceil(32) as u32, 1024); pp, pdw, blocks, dim32)
    }
}

/// Rows a vector-path block takes per step (the forwards, and the backwards of up to 512 threads): two of bf16, one of
/// f32, whose 8-element chunks take twice the registers.
fn step_rows<T: GpuFloat>() -> usize {
    if size_of::<T>() == 2 {
        2
    } else {
        1
    }
}

/// The vector path's threads per block (one per 8 elements, rounded up to a warp), or None when a row is not whole
/// 8-element chunks, needs more than `max_threads`, or a base is not 16-byte aligned.
fn vector_threads(dim: usize, max_threads: usize, ptrs: &[u64]) -> Option<u32> {
    let chunks = dim / CHUNK;
    (dim % CHUNK == 0 && chunks <= max_threads && aligned16(ptrs)).then(|| chunks.next_multiple_of(32) as u32)
}

fn block_config(grid: u32, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}
