//! Launchers of `kernels/cuda/nf4.cu`, twins of [`crate::nf4`]'s dequantization: [`dequantize_nf4`] and the rebuild
//! of a double-quantized absmax, [`dequantize_absmax_nested`]. Both are bit-exact with the CPU.

use super::source::Module;
use super::{config, grid_for, launched, same_device, u32_arg, DeviceBuffer, GpuFloat, Result};
use crate::nf4::{nf4_num_blocks, nf4_packed_len, NESTED_BLOCKSIZE};
use cudarc::driver::PushKernelArg;

/// packed: [(n + 1) / 2] u8, absmax: [ceil(n / blocksize)] f32 → out: [n] (f32 or bf16). `blocksize`: a power of two
/// in 32..=4096.
pub fn dequantize_nf4<T: GpuFloat>(
    packed: &DeviceBuffer<u8>,
    absmax: &DeviceBuffer<f32>,
    blocksize: usize,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    assert!(
        blocksize.is_power_of_two() && (32..=4096).contains(&blocksize),
        "dequantize_nf4: blocksize {blocksize} is not a power of two in 32..=4096"
    );
    let n = out.len();
    assert_eq!(packed.len(), nf4_packed_len(n), "dequantize_nf4: packed length vs (n + 1) / 2 for n = {n}");
    assert_eq!(absmax.len(), nf4_num_blocks(n, blocksize), "dequantize_nf4: absmax length vs blocks for n = {n}");
    let dev = same_device("dequantize_nf4", &[packed.device(), absmax.device(), out.device()]);
    if n == 0 {
        return Ok(());
    }
    let kernel = T::pick("dequantize_nf4_f32", "dequantize_nf4_bf16");
    let f = dev.function(Module::Nf4, kernel)?;
    let (pq, pa, po, n64, bs) = (packed.ptr(), absmax.ptr(), out.ptr(), n as u64, blocksize as u32);
    // SAFETY: dequantize_nf4_T(const unsigned char* packed, const float* absmax, T* out, u64 n, unsigned blocksize):
    // packed holds (n + 1) / 2 bytes, absmax ceil(n / blocksize) f32, out n elements (asserted), on this device.
    launched(kernel, unsafe {
        dev.stream().launch_builder(f).arg(&pq).arg(&pa).arg(&po).arg(&n64).arg(&bs).launch(config(grid_for(n)))
    })
}

/// qabsmax: [nb] u8, absmax2: [ceil(nb / 256)] f32, code2: [256] f32 → out: [nb] f32 = code2[q]·absmax2 + offset
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
    let f = dev.function(Module::Nf4, kernel)?;
    let (pq, pa, pc, po, nb64) = (qabsmax.ptr(), absmax2.ptr(), code2.ptr(), out.ptr(), nb as u64);
    // SAFETY: dequantize_absmax_nested_f32(const unsigned char* qabsmax, const float* absmax2, const float* code2,
    // float offset, float* out, u64 nb): qabsmax and out hold nb elements, absmax2 ceil(nb / 256), code2 256
    // (asserted; every byte indexes code2 in range), on this device.
    launched(kernel, unsafe {
        dev.stream()
            .launch_builder(f)
            .arg(&pq)
            .arg(&pa)
            .arg(&pc)
            .arg(&offset)
            .arg(&po)
            .arg(&nb64)
            .launch(config(grid_for(u32_arg("dequantize_absmax_nested: blocks", nb) as usize)))
    })
}

#[cfg(test)]
mod tests {
    use super::super::source::Module;
    use crate::nf4::NF4_CODE;

    /// The `.cu` spells the code table out; it must be the Rust constant to the bit.
    #[test]
    fn cuda_code_table_is_the_rust_constant() {
        let src = Module::Nf4.file_text();
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
