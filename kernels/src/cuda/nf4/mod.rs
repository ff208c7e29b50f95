//! Launchers of `kernels/cuda/nf4.cu`, twins of [`crate::nf4`]'s dequantization: [`dequantize_nf4_into`] (one launch
//! for plain or double-quantized scales, into any range of a buffer), its whole-buffer form [`dequantize_nf4`], the
//! form with each row scaled [`dequantize_nf4_rows_into`], and the
//! standalone rebuild of a double-quantized absmax, [`dequantize_absmax_nested`], all bit-exact with the CPU; and
//! decoding's product with a packed weight, [`nf4_gemv`] (`gemv.rs`, launchers of `kernels/cuda/nf4_gemv.cu`).

use super::source::Module;
use super::{
    config, grid_for, kernel, launch, same_device, u32_arg, CudaDevice, DeviceBuffer, DeviceCopy, GpuFloat, Result,
    BLOCK,
};
use crate::nf4::{nf4_num_blocks, nf4_packed_len, NESTED_BLOCKSIZE};

mod gemv;
pub use gemv::{nf4_gemv, GemvLora, GemvWeight, GEMV_MAX_ROWS};
use half::f16;

/// Elements a warp dequantizes per step of the kernel's vector path (`TILE` in nf4.cu): 32 lanes × 16 packed bytes.
const TILE: usize = 1024;

/// The types NF4 dequantizes to on the GPU: f32 and bf16 (every [`GpuFloat`]), and f16.
pub trait Nf4Output: DeviceCopy {
    /// The kernels writing this type: (one f32 absmax per block, double-quantized absmax).
    fn kernels() -> (&'static str, &'static str);
    /// The same with each row scaled ([`dequantize_nf4_rows_into`]).
    fn row_kernels() -> (&'static str, &'static str);
}

impl<T: GpuFloat> Nf4Output for T {
    fn kernels() -> (&'static str, &'static str) {
        (kernel!("dequantize_nf4", T), kernel!("dequantize_nf4_nested", T))
    }
    fn row_kernels() -> (&'static str, &'static str) {
        (kernel!("dequantize_nf4_rows", T), kernel!("dequantize_nf4_nested_rows", T))
    }
}

impl Nf4Output for f16 {
    fn kernels() -> (&'static str, &'static str) {
        ("dequantize_nf4_f16", "dequantize_nf4_nested_f16")
    }
    fn row_kernels() -> (&'static str, &'static str) {
        ("dequantize_nf4_rows_f16", "dequantize_nf4_nested_rows_f16")
    }
}

/// A factor per row of a weight [rows, row_len] (`row_len` a multiple of the blocksize): `scale` \[rows\] f32.
#[derive(Clone, Copy, Debug)]
pub struct RowScale<'a> {
    pub scale: &'a DeviceBuffer<f32>,
    pub row_len: usize,
}

/// An NF4 weight's per-block scales on the device.
#[derive(Clone, Copy, Debug)]
pub enum Nf4Scales<'a> {
    /// absmax: \[blocks\] f32, as bitsandbytes stores it without double quantization.
    Absmax(&'a DeviceBuffer<f32>),
    /// Double quantization ([`crate::nf4::NestedAbsmax`]): block b's absmax is `code2[qabsmax[b]]·absmax2[b / 256]`
    /// `+ offset`, rebuilt inside the dequantization kernel. qabsmax: \[blocks\] u8, absmax2: [ceil(blocks / 256)] f32,
    /// code2: \[256\] f32 (the checkpoint's `nested_quant_map`).
    Nested { qabsmax: &'a DeviceBuffer<u8>, absmax2: &'a DeviceBuffer<f32>, code2: &'a DeviceBuffer<f32>, offset: f32 },
}

/// packed: [(n + 1) / 2] u8, absmax: [ceil(n / blocksize)] f32 → out: \[n\] (f32, bf16 or f16). `blocksize`: a power of
/// two in 32..=4096. [`dequantize_nf4_into`] with the whole of `out`.
pub fn dequantize_nf4<T: Nf4Output>(
    packed: &DeviceBuffer<u8>,
    absmax: &DeviceBuffer<f32>,
    blocksize: usize,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    let n = out.len();
    dequantize_nf4_into(packed, Nf4Scales::Absmax(absmax), blocksize, n, out, 0)
}

/// packed: [(n + 1) / 2] u8, scales: [ceil(n / blocksize)] blocks → out[start..start + n] (f32, bf16 or f16), in one
/// launch whatever the scales: bit-identical to [`crate::nf4::dequantize_nf4`] (after
/// [`crate::nf4::dequantize_absmax_nested`] for nested scales). The rest of `out` is left as it was, so one scratch
/// buffer sized for the largest weight serves every weight, and weights that share an input can be written side by
/// side ([q; k; v] rows in one buffer). `blocksize`: a power of two in 32..=4096.
///
/// Speed: the vector path needs `out[start]` 16-byte aligned (`start · size_of::<T>()` a multiple of 16); from any
/// other start the kernel is as exact but goes element by element.
pub fn dequantize_nf4_into<T: Nf4Output>(
    packed: &DeviceBuffer<u8>,
    scales: Nf4Scales<'_>,
    blocksize: usize,
    n: usize,
    out: &mut DeviceBuffer<T>,
    start: usize,
) -> Result<()> {
    dequantize_nf4_rows_into(packed, scales, None, blocksize, n, out, start)
}

/// [`dequantize_nf4_into`], with each row scaled when `rows` is given: W' = diag(rows.scale)·W, each block's absmax
/// times its row's factor (one f32 rounding) before the codes multiply it, bit-identical to
/// [`crate::nf4::dequantize_nf4_rows_scaled`]. DoRA folds m/n into its weight this way instead of scaling the
/// product's columns.
pub fn dequantize_nf4_rows_into<T: Nf4Output>(
    packed: &DeviceBuffer<u8>,
    scales: Nf4Scales<'_>,
    rows: Option<RowScale<'_>>,
    blocksize: usize,
    n: usize,
    out: &mut DeviceBuffer<T>,
    start: usize,
) -> Result<()> {
    assert!(
        start.checked_add(n).is_some_and(|end| end <= out.len()),
        "dequantize_nf4: {n} elements from {start} overrun an output of {}",
        out.len()
    );
    let dev = weight_device("dequantize_nf4", packed, scales, blocksize, n);
    same_device("dequantize_nf4", &[dev, out.device()]);
    if let Some(r) = rows {
        assert!(
            r.row_len > 0 && r.row_len % blocksize == 0 && r.scale.len() * r.row_len == n,
            "dequantize_nf4: {} row factors for rows of {} (whole blocks of {blocksize}) over {n} elements",
            r.scale.len(),
            r.row_len
        );
        same_device("dequantize_nf4", &[dev, r.scale.device()]);
    }
    if n == 0 {
        return Ok(());
    }
    let po = out.ptr() + (start * size_of::<T>()) as u64;
    // Device buffers start 256-byte aligned, so only `start` can leave the vector path out.
    let n_vec = if (packed.ptr() | po) % 16 == 0 { n / TILE * TILE } else { 0 };
    let block = BLOCK as usize;
    let wanted = (n_vec / TILE).div_ceil(block / 32).max((n - n_vec).div_ceil(block));
    // One wave: more blocks would only queue behind the resident ones, each then looping over fewer tiles.
    let grid = wanted.clamp(1, (dev.resident_threads() / block).max(1)) as u32;
    let (pp, n64, nv64, log2) = (packed.ptr(), n as u64, n_vec as u64, blocksize.trailing_zeros());
    let ((plain, nested), row_args) = match rows {
        None => (T::kernels(), None),
        Some(r) => (T::row_kernels(), Some((r.scale.ptr(), (r.row_len / blocksize) as u64))),
    };
    // SAFETY: dequantize_nf4[_nested][_rows]_T(const unsigned char* packed, <scales>, [const float*
    // row_scale, u64 blocks_per_row,] T* out, u64 n, u64 n_vec, unsigned log2_blocksize): packed holds (n + 1) / 2
    // bytes and out n elements from po (asserted), on this device; n_vec is a multiple of TILE, nonzero only when
    // packed and po are 16-byte aligned; the block of BLOCK threads is the kernel's at most 256, a multiple of 32.
    // <scales> is `const float* absmax` (ceil(n / blocksize) f32) or `const unsigned char* qabsmax, const float*
    // absmax2, const float* code2, float offset` (qabsmax ceil(n / blocksize) bytes, absmax2 one f32 per 256 of
    // them, code2 256 f32, so every byte indexes code2 in range), asserted by weight_device; row_scale holds
    // n / row_len f32 and rows are whole blocks (asserted), so block / blocks_per_row is in range.
    unsafe {
        match (scales, row_args) {
            (Nf4Scales::Absmax(absmax), None) => {
                launch!(dev, Module::Nf4, plain, config(grid); pp, absmax.ptr(), po, n64, nv64, log2)
            }
            (Nf4Scales::Absmax(absmax), Some((pr, bpr))) => {
                launch!(dev, Module::Nf4, plain, config(grid); pp, absmax.ptr(), pr, bpr, po, n64, nv64, log2)
            }
            (Nf4Scales::Nested { qabsmax, absmax2, code2, offset }, None) => {
                let (pq, p2, pc) = (qabsmax.ptr(), absmax2.ptr(), code2.ptr());
                launch!(dev, Module::Nf4, nested, config(grid); pp, pq, p2, pc, offset, po, n64, nv64, log2)
            }
            (Nf4Scales::Nested { qabsmax, absmax2, code2, offset }, Some((pr, bpr))) => {
                let (pq, p2, pc) = (qabsmax.ptr(), absmax2.ptr(), code2.ptr());
                launch!(dev, Module::Nf4, nested, config(grid); pp, pq, p2, pc, offset, pr, bpr, po, n64, nv64, log2)
            }
        }
    }
}

/// The device of an NF4 weight of `n` elements (packed bytes and scales), after asserting the blocksize, the lengths
/// and that every buffer is on it.
fn weight_device<'a>(
    op: &str,
    packed: &'a DeviceBuffer<u8>,
    scales: Nf4Scales<'_>,
    blocksize: usize,
    n: usize,
) -> &'a CudaDevice {
    assert!(
        blocksize.is_power_of_two() && (32..=4096).contains(&blocksize),
        "{op}: blocksize {blocksize} is not a power of two in 32..=4096"
    );
    assert_eq!(packed.len(), nf4_packed_len(n), "{op}: packed length vs (n + 1) / 2 for n = {n}");
    let blocks = nf4_num_blocks(n, blocksize);
    let dev = packed.device();
    match scales {
        Nf4Scales::Absmax(absmax) => {
            assert_eq!(absmax.len(), blocks, "{op}: absmax length vs blocks for n = {n}");
            same_device(op, &[dev, absmax.device()]);
        }
        Nf4Scales::Nested { qabsmax, absmax2, code2, .. } => {
            assert_eq!(qabsmax.len(), blocks, "{op}: nested absmax length vs blocks for n = {n}");
            assert_eq!(absmax2.len(), blocks.div_ceil(NESTED_BLOCKSIZE), "{op}: absmax2 length vs nested blocks");
            assert_eq!(code2.len(), 256, "{op}: the 8-bit code has {} entries, not 256", code2.len());
            same_device(op, &[dev, qabsmax.device(), absmax2.device(), code2.device()]);
        }
    }
    dev
}

/// qabsmax: \[nb\] u8, absmax2: [ceil(nb / 256)] f32, code2: \[256\] f32 → out: \[nb\] f32 = code2\[q\]·absmax2 + offset
pub fn dequantize_absmax_nested(
    qabsmax: &DeviceBuffer<u8>,
    absmax2: &DeviceBuffer<f32>,
    offset: f32,
    code2: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let nb = qabsmax.len();
    assert_eq!(code2.len(), 256, "dequantize_absmax_nested: the 8-bit code has {} entries, not 256", code2.len());
    assert_eq!(out.len(), nb, "dequantize_absmax_nested: out length vs qabsmax");
    assert_eq!(absmax2.len(), nb.div_ceil(NESTED_BLOCKSIZE), "dequantize_absmax_nested: absmax2 length vs blocks");
    let dev =
        same_device("dequantize_absmax_nested", &[qabsmax.device(), absmax2.device(), code2.device(), out.device()]);
    if nb == 0 {
        return Ok(());
    }
    let kernel = "dequantize_absmax_nested_f32";
    let (pq, pa, pc, po, nb64) = (qabsmax.ptr(), absmax2.ptr(), code2.ptr(), out.ptr(), nb as u64);
    // SAFETY: dequantize_absmax_nested_f32(const unsigned char* qabsmax, const float* absmax2, const float* code2,
    // float offset, float* out, u64 nb): qabsmax and out hold nb elements, absmax2 ceil(nb / 256), code2 256
    // (asserted; every byte indexes code2 in range), on this device.
    unsafe {
        launch!(dev, Module::Nf4, kernel, config(grid_for(u32_arg("dequantize_absmax_nested: blocks", nb) as usize)); pq, pa, pc, offset, po, nb64)
    }
}

#[cfg(test)]
mod tests {
    use super::super::source::Module;
    use crate::nf4::NF4_CODE;

    /// nf4_common.cuh spells the code table out; it must be the Rust constant to the bit.
    #[test]
    fn cuda_code_table_is_the_rust_constant() {
        let src = Module::Nf4.source();
        let table = src.split("NF4_CODE[16] = {").nth(1).and_then(|rest| rest.split("};").next()).expect("table");
        let values: Vec<f32> = table
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| v.trim_end_matches('f').parse().expect("an f32 literal"))
            .collect();
        assert_eq!(values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), NF4_CODE.map(f32::to_bits));
    }
}
