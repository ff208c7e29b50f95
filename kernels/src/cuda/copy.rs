//! Launchers of `kernels/cuda/copy.cu`: the device side of `runtime`'s views and dtype conversions. The CPU
//! references are plain index arithmetic and `half`'s conversions, which the parity tests spell out.

use super::source::Module;
use super::{config, grid_for, launch, same_device, wave_config, DeviceBuffer, DeviceCopy, GpuFloat, Result};
use cudarc::driver::DeviceRepr;

/// The most dimensions a view may have (`MAX_RANK` in copy.cu).
pub const MAX_RANK: usize = 8;

/// copy.cu's `View`, passed to the kernel by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct View {
    shape: [u64; MAX_RANK],
    strides: [u64; MAX_RANK],
    offset: u64,
    rank: u32,
}

// SAFETY: `View` is `repr(C)` plain data with the field types, order and (hence) padding of copy.cu's `struct View`.
unsafe impl DeviceRepr for View {}

/// src: the view (offset, shape, strides in elements, rank 0..=8) → dst: [Π shape] row-major (gathered)
pub fn strided_copy<T: DeviceCopy>(
    src: &DeviceBuffer<T>,
    offset: usize,
    shape: &[usize],
    strides: &[usize],
    dst: &mut DeviceBuffer<T>,
) -> Result<()> {
    assert_eq!(shape.len(), strides.len(), "strided_copy: {} dims but {} strides", shape.len(), strides.len());
    assert!(shape.len() <= MAX_RANK, "strided_copy: rank {} > {MAX_RANK}", shape.len());
    let n: usize = shape.iter().product();
    assert_eq!(dst.len(), n, "strided_copy: dst length vs Π shape {shape:?}");
    let dev = same_device("strided_copy", &[src.device(), dst.device()]);
    if n == 0 {
        return Ok(());
    }
    let last = shape.iter().zip(strides).map(|(&s, &st)| (s - 1) * st).sum::<usize>() + offset;
    assert!(last < src.len(), "strided_copy: view reaches element {last} of a buffer of {}", src.len());
    let mut view =
        View { shape: [1; MAX_RANK], strides: [0; MAX_RANK], offset: offset as u64, rank: shape.len() as u32 };
    for (d, (&s, &st)) in shape.iter().zip(strides).enumerate() {
        view.shape[d] = s as u64;
        view.strides[d] = st as u64;
    }
    let kernel = match size_of::<T>() {
        1 => "strided_copy_u8",
        2 => "strided_copy_u16",
        4 => "strided_copy_u32",
        size => unreachable!("DeviceCopy types are 1, 2 or 4 bytes, not {size}"),
    };
    let (ps, pd, n64) = (src.ptr(), dst.ptr(), n as u64);
    // SAFETY: strided_copy_uN(const uN* src, uN* dst, View v, u64 n) with N = 8·size_of::<T>(): it moves whole
    // elements, so any DeviceCopy value survives; dst holds n elements and every element the view reaches is below
    // src.len() (both asserted); on this device.
    unsafe { launch!(dev, Module::Copy, kernel, config(grid_for(n)); ps, pd, view, n64) }
}

/// src: \[len\] S → dst: \[len\] D (round to nearest even into bf16, as `half::bf16::from_f32`; exact otherwise), in
/// 8-element chunks of 16-byte accesses on a one-wave grid
pub fn cast<S: GpuFloat, D: GpuFloat>(src: &DeviceBuffer<S>, dst: &mut DeviceBuffer<D>) -> Result<()> {
    assert_eq!(src.len(), dst.len(), "cast: src vs dst length");
    let dev = same_device("cast", &[src.device(), dst.device()]);
    if dst.is_empty() {
        return Ok(());
    }
    let kernel =
        S::pick(D::pick("cast_f32_to_f32", "cast_f32_to_bf16"), D::pick("cast_bf16_to_f32", "cast_bf16_to_bf16"));
    let cfg = wave_config(dev, Module::Copy, kernel, dst.len().div_ceil(8))?;
    let (ps, pd, n) = (src.ptr(), dst.ptr(), dst.len() as u64);
    // SAFETY: cast_S_to_D(const S* src, D* dst, u64 n); both hold n elements (asserted), on this device.
    unsafe { launch!(dev, Module::Copy, kernel, cfg; ps, pd, n) }
}
