//! Launchers of `kernels/cuda/reduce.cu`, twins of [`crate::reduce`]. Accumulation is f32 (the CPU's is f64). The
//! scalar reductions write a one-element device buffer (`*_into`, no synchronisation); the plain forms read it back
//! to the host as f64 (one synchronisation).

use super::source::Module;
use super::{
    config, kernel, launch, multi_config, same_device, table_bytes, u32_arg, CudaDevice, DeviceBuffer, GpuFloat,
    Result, BLOCK,
};
use cudarc::driver::LaunchConfig;

/// Blocks of the first pass of a full reduction: enough to fill a GPU, few enough that one block sums the partials.
const MAX_PARTIALS: usize = 1024;
/// sum_rows splits its rows into at most this many slices (a grid dimension), each at least [`MIN_SPLIT_ROWS`]
/// rows, so that a tall matrix with few columns still spreads over the GPU.
const MAX_ROW_SPLITS: usize = 256;
const MIN_SPLIT_ROWS: usize = 64;

/// x: \[len\] → Σ x (0 for empty)
pub fn sum<T: GpuFloat>(x: &DeviceBuffer<T>) -> Result<f64> {
    to_host(x.device(), |out| sum_into(x, out, false))
}

/// x: \[len\] → Σ x²
pub fn sum_squares<T: GpuFloat>(x: &DeviceBuffer<T>) -> Result<f64> {
    to_host(x.device(), |out| sum_squares_into(x, out, false))
}

/// x: \[len\] → max |x|; 0 for empty, NaN when any element is NaN
pub fn max_abs<T: GpuFloat>(x: &DeviceBuffer<T>) -> Result<f64> {
    to_host(x.device(), |out| scalar_into(x, kernel!("max_abs_partial", T), "max_abs_final_f32", out, false))
}

/// x: \[len\] → out: \[1\] f32 = Σ x, or out + Σ x when `accumulate`.
pub fn sum_into<T: GpuFloat>(x: &DeviceBuffer<T>, out: &mut DeviceBuffer<f32>, accumulate: bool) -> Result<()> {
    scalar_into(x, kernel!("sum_partial", T), "sum_final_f32", out, accumulate)
}

/// x: \[len\] → out: \[1\] f32 = Σ x², or out + Σ x² when `accumulate` (a global norm over many tensors).
pub fn sum_squares_into<T: GpuFloat>(x: &DeviceBuffer<T>, out: &mut DeviceBuffer<f32>, accumulate: bool) -> Result<()> {
    scalar_into(x, kernel!("sum_squares_partial", T), "sum_final_f32", out, accumulate)
}

/// xs: f32 tensors on one device → out: \[1\] f32 = Σ over all of them of Σ x², or out + that when `accumulate`: a
/// global gradient norm in two launches (a row of blocks per tensor, then their partials added in order, so the
/// result is the same bits run to run) instead of two per tensor.
pub fn sum_squares_multi(xs: &[&DeviceBuffer<f32>], out: &mut DeviceBuffer<f32>, accumulate: bool) -> Result<()> {
    assert_eq!(out.len(), 1, "sum_squares_multi: the output is one f32");
    let dev = out.device();
    let mut table = Vec::with_capacity(2 * xs.len());
    for x in xs {
        same_device("sum_squares_multi", &[dev, x.device()]);
        table.extend([x.ptr(), x.len() as u64]);
    }
    let longest = xs.iter().map(|x| x.len()).max().unwrap_or(0);
    if longest == 0 {
        return if accumulate { Ok(()) } else { out.zero() };
    }
    let cfg = multi_config(xs.len(), longest);
    let count = cfg.grid_dim.0 as usize * xs.len();
    let (entries, partial) = (dev.upload(&table_bytes(&table))?, dev.alloc::<f32>(count)?);
    let (pe, pp) = (entries.ptr(), partial.ptr());
    // SAFETY: sum_squares_multi_f32(const SquaresEntry* entries, float* partial) with one row of blocks per entry:
    // `entries` holds xs.len() records (x, n: two u64 words, the struct's layout) naming f32 buffers of n elements on
    // this device (asserted); partial holds one f32 per block of the grid (allocated above).
    unsafe { launch!(dev, Module::Reduce, "sum_squares_multi_f32", cfg; pe, pp) }?;
    finish(&partial, "sum_final_f32", out, accumulate)
}

fn to_host(dev: &CudaDevice, f: impl FnOnce(&mut DeviceBuffer<f32>) -> Result<()>) -> Result<f64> {
    let mut out = dev.alloc::<f32>(1)?;
    f(&mut out)?;
    Ok(out.to_vec()?[0] as f64)
}

fn scalar_into<T: GpuFloat>(
    x: &DeviceBuffer<T>,
    partial_kernel: &'static str,
    final_kernel: &'static str,
    out: &mut DeviceBuffer<f32>,
    accumulate: bool,
) -> Result<()> {
    assert_eq!(out.len(), 1, "{final_kernel}: the output is one f32");
    let dev = same_device(final_kernel, &[x.device(), out.device()]);
    if x.is_empty() {
        return if accumulate { Ok(()) } else { out.zero() };
    }
    // From the length alone, so the summation order (and result) is the same on every run.
    let blocks = x.len().div_ceil(BLOCK as usize).min(MAX_PARTIALS);
    let partial = dev.alloc::<f32>(blocks)?;
    let (px, pp, n) = (x.ptr(), partial.ptr(), x.len() as u64);
    // SAFETY: <op>_partial_T(const T* x, float* partial, u64 n) with `blocks` blocks: x holds n elements, partial
    // one f32 per block (allocated above); on this device.
    unsafe { launch!(dev, Module::Reduce, partial_kernel, config(blocks as u32); px, pp, n) }?;
    finish(&partial, final_kernel, out, accumulate)
}

/// The partials, all of `partial`, combined in order into out (added to it when `accumulate`) by `final_kernel`.
fn finish(
    partial: &DeviceBuffer<f32>,
    final_kernel: &'static str,
    out: &mut DeviceBuffer<f32>,
    accumulate: bool,
) -> Result<()> {
    assert_eq!(out.len(), 1, "{final_kernel}: the output is one f32");
    let dev = same_device(final_kernel, &[partial.device(), out.device()]);
    let (pp, po, count, acc) = (partial.ptr(), out.ptr(), u32_arg(final_kernel, partial.len()), accumulate as i32);
    // SAFETY: <op>_final_f32(const float* partial, float* out, unsigned count, int accumulate), one block: partial
    // holds count f32, out one (asserted); on this device (asserted).
    unsafe { launch!(dev, Module::Reduce, final_kernel, config(1); pp, po, count, acc) }
}

/// x: [rows, cols] → out: \[cols\] = Σ over rows (zeros for no rows)
pub fn sum_rows<T: GpuFloat>(x: &DeviceBuffer<T>, cols: usize, out: &mut DeviceBuffer<T>) -> Result<()> {
    column_sums("sum_rows", x, None, cols, out)
}

/// [x, y]: [rows, cols] each → out: \[cols\] = Σ over rows of x⊙y, each product in f32 and never rounded to T (zeros for no
/// rows): DoRA's magnitude gradient without a [rows, cols] product in memory.
pub fn sum_rows_product<T: GpuFloat>(xy: [&DeviceBuffer<T>; 2], cols: usize, out: &mut DeviceBuffer<T>) -> Result<()> {
    let [x, y] = xy;
    assert_eq!(x.len(), y.len(), "sum_rows_product: x and y lengths");
    column_sums("sum_rows_product", x, Some(y), cols, out)
}

fn column_sums<T: GpuFloat>(
    op: &str,
    x: &DeviceBuffer<T>,
    y: Option<&DeviceBuffer<T>>,
    cols: usize,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    assert_eq!(out.len(), cols, "{op}: out length vs cols");
    if cols == 0 {
        assert!(x.is_empty(), "{op}: {} elements with zero columns", x.len());
        return Ok(());
    }
    assert!(x.len() % cols == 0, "{op}: {} elements are not rows of {cols}", x.len());
    let dev: &CudaDevice = same_device(op, &[x.device(), out.device()]);
    if let Some(y) = y {
        same_device(op, &[dev, y.device()]);
    }
    let rows = x.len() / cols;
    if rows == 0 {
        return out.zero();
    }
    let splits = rows.div_ceil(MIN_SPLIT_ROWS).min(MAX_ROW_SPLITS);
    let rows_per_split = rows.div_ceil(splits);
    let splits = rows.div_ceil(rows_per_split);
    let partial = dev.alloc::<f32>(splits * cols)?;
    let kernel = kernel!("sum_rows_partial", T);
    // No y: a null pointer, which the kernel reads as "sum x itself".
    let (px, py, pp, po) = (x.ptr(), y.map_or(0, |y| y.ptr()), partial.ptr(), out.ptr());
    let (rows32, cols32) = (u32_arg("sum_rows: rows", rows), u32_arg("sum_rows: cols", cols));
    let (rps32, splits32) = (rows_per_split as u32, splits as u32);
    let grid = LaunchConfig {
        grid_dim: (cols.div_ceil(BLOCK as usize) as u32, splits32, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: sum_rows_partial_T(const T* x, const T* y, float* partial, unsigned rows, unsigned cols, unsigned
    // rows_per_split) on a (column blocks, splits) grid: x (and y unless null) hold rows·cols elements (asserted),
    // partial splits·cols f32 (allocated above), and no split starts past the last row; on this device.
    unsafe { launch!(dev, Module::Reduce, kernel, grid; px, py, pp, rows32, cols32, rps32) }?;
    let kernel = kernel!("sum_rows_final", T);
    // SAFETY: sum_rows_final_T(const float* partial, T* out, unsigned splits, unsigned cols): partial holds
    // splits·cols f32, out cols elements (asserted); on this device.
    unsafe { launch!(dev, Module::Reduce, kernel, config(super::grid_for(cols)); pp, po, splits32, cols32) }
}
