//! Launchers of `kernels/cuda/dora.cu`, twins of [`crate::dora`]: row norms (one block per row, f64 sums), and the
//! ratio, scaling and combine maps (grid-stride, one wave).

use super::source::Module;
use super::{
    config, elementwise_device, grid_for, kernel, launch, same_device, u32_arg, wave_config, DeviceBuffer, GpuFloat,
    Result, BLOCK,
};
pub use crate::dora::Axis;

// The CPU twin sums each row in this block's order (`crate::dora::sum_of_squares`): the two must agree to the bit.
const _: () = assert!(crate::dora::NORM_THREADS == BLOCK as usize, "dora_row_norms' block is the CPU twin's order");

/// t: [rows, cols] → out: \[rows\] of ‖t_i‖₂
pub fn row_norms<T: GpuFloat>(t: &DeviceBuffer<T>, cols: usize, out: &mut DeviceBuffer<T>) -> Result<()> {
    let rows = out.len();
    assert!(cols > 0 && t.len() == rows * cols, "dora row_norms: {} values for {rows} rows of {cols}", t.len());
    let dev = same_device("dora row_norms", &[t.device(), out.device()]);
    if rows == 0 {
        return Ok(());
    }
    let kernel = kernel!("dora_row_norms", T);
    let (pt, po) = (t.ptr(), out.ptr());
    let (rows32, cols32) = (u32_arg("dora row_norms: rows", rows), u32_arg("dora row_norms: cols", cols));
    // SAFETY: dora_row_norms_T(const T* t, T* out, unsigned rows, unsigned cols), blocks of 256 threads striding
    // over rows: t holds rows·cols elements and out rows (asserted), on this device.
    unsafe { launch!(dev, Module::Dora, kernel, config(grid_for(rows * BLOCK as usize)); pt, po, rows32, cols32) }
}

/// a, b: \[n\] → out: \[n\] = a / b
pub fn ratio<T: GpuFloat>(a: &DeviceBuffer<T>, b: &DeviceBuffer<T>, out: &mut DeviceBuffer<T>) -> Result<()> {
    let Some(dev) = elementwise_device("dora ratio", &[a, b, out]) else { return Ok(()) };
    let n = out.len();
    let kernel = kernel!("dora_ratio", T);
    let cfg = wave_config(dev, Module::Dora, kernel, n)?;
    let (pa, pb, po, n64) = (a.ptr(), b.ptr(), out.ptr(), n as u64);
    // SAFETY: dora_ratio_T(const T* a, const T* b, T* out, u64 n): all three hold n elements on this device.
    unsafe { launch!(dev, Module::Dora, kernel, cfg; pa, pb, po, n64) }
}

/// t: [rows, cols] → out_ij = t_ij·(c_k + offset), k along `axis`
pub fn scale_by<T: GpuFloat>(
    t: &DeviceBuffer<T>,
    cols: usize,
    c: &DeviceBuffer<T>,
    offset: f32,
    axis: Axis,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    let n = t.len();
    assert!(cols > 0 && n % cols == 0, "dora scale_by: {n} values of rows of {cols}");
    let rows = n / cols;
    assert_eq!(c.len(), if axis == Axis::Rows { rows } else { cols }, "dora scale_by: the vector along {axis:?}");
    let Some(dev) = elementwise_device("dora scale_by", &[t, out]) else { return Ok(()) };
    same_device("dora scale_by", &[dev, c.device()]);
    let kernel = kernel!("dora_scale_by", T);
    let cfg = wave_config(dev, Module::Dora, kernel, n)?;
    let (pt, pc, po, rows64) = (t.ptr(), c.ptr(), out.ptr(), rows as u64);
    let (cols32, by_rows) = (u32_arg("dora scale_by: cols", cols), i32::from(axis == Axis::Rows));
    // SAFETY: dora_scale_by_T(const T* t, const T* c, T* out, u64 rows, unsigned cols, float offset, int by_rows):
    // t and out hold rows·cols elements, c rows or cols as by_rows says (asserted), on this device.
    unsafe { launch!(dev, Module::Dora, kernel, cfg; pt, pc, po, rows64, cols32, offset, by_rows) }
}

/// z, z_d, sv: [rows, cols], g: \[cols\] → y = z + (g − 1)⊙z_d + g⊙sv, and h = z_d + sv when given
pub fn combine<T: GpuFloat>(
    z: &DeviceBuffer<T>,
    zd: &DeviceBuffer<T>,
    sv: &DeviceBuffer<T>,
    g: &DeviceBuffer<T>,
    y: &mut DeviceBuffer<T>,
    h: Option<&mut DeviceBuffer<T>>,
) -> Result<()> {
    let (n, cols) = (z.len(), g.len());
    assert!(cols > 0 && n % cols == 0, "dora combine: {n} values for columns of {cols}");
    let mut same: Vec<&DeviceBuffer<T>> = vec![z, zd, sv, y];
    same.extend(h.as_deref());
    let Some(dev) = elementwise_device("dora combine", &same) else { return Ok(()) };
    same_device("dora combine", &[dev, g.device()]);
    let kernel = kernel!("dora_combine", T);
    let cfg = wave_config(dev, Module::Dora, kernel, n)?;
    let (pz, pzd, psv, pg, py) = (z.ptr(), zd.ptr(), sv.ptr(), g.ptr(), y.ptr());
    let ph = h.as_ref().map_or(0, |h| h.ptr());
    let (rows64, cols32) = ((n / cols) as u64, u32_arg("dora combine: cols", cols));
    // SAFETY: dora_combine_T(const T* z, const T* zd, const T* sv, const T* g, T* y, T* h, u64 rows, unsigned
    // cols): z, zd, sv, y (and h unless null) hold rows·cols elements and g cols (asserted), on this device; y and h
    // are distinct buffers (two &mut borrows).
    unsafe { launch!(dev, Module::Dora, kernel, cfg; pz, pzd, psv, pg, py, ph, rows64, cols32) }
}
