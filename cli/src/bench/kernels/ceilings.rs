//! The two ceilings every other row is a fraction of: the device's copy bandwidth (a 1 GiB device-to-device copy,
//! bytes read + written) and its bf16 tensor-core rate (a cuBLASLt GEMM 8192 × 8192 × 8192 through `matmul`, the
//! launcher every linear layer uses).

use super::{dims, median_ms, Bench, Ceilings, Work};
use anyhow::Result;
use qlora_kernels::cuda::matmul::matmul;
use qlora_kernels::cuda::{CudaDevice, DeviceBuffer};
use qlora_kernels::matmul::Gemm;
use qlora_runtime::Device;

/// Bytes the copy ceiling copies per repetition.
const COPY_BYTES: usize = 1 << 30;
/// What one repetition moves: every byte read once and written once.
const COPY_WORK: f64 = 2.0 * COPY_BYTES as f64;

pub fn run(b: &mut Bench) -> Result<Ceilings> {
    let src = b.bytes(COPY_BYTES)?;
    let ms = b.row("copy d2d (ceiling)", "1 GiB", Work::Bytes(COPY_WORK), |_| copy(&src))?;
    drop(src);
    let copy_gbps = COPY_WORK / ms / 1e6;

    let s = 8192;
    let (a, w) = (b.normal_bf16(s * s, 1.0)?, b.normal_bf16(s * s, 1.0)?);
    let mut c = b.dev.alloc(s * s)?;
    let flops = 2.0 * (s as f64).powi(3);
    let g = Gemm::new(s, s, s);
    let ms =
        b.row("gemm bf16 (ceiling)", &dims(&[s, s, s]), Work::Flops(flops), |_| Ok(matmul(&g, &a, &w, &mut c)?))?;
    Ok(Ceilings { copy_gbps, gemm_tflops: flops / ms / 1e9 })
}

/// The copy ceiling alone, in GB/s (what `bench decode` compares its reads with): the median of `reps` copies after
/// `warmup`. The source is one repeated byte: a device-to-device copy moves bytes without looking at them.
pub fn copy_gbps(dev: &CudaDevice, warmup: usize, reps: usize) -> Result<f64> {
    let mut src = dev.alloc::<u8>(COPY_BYTES)?;
    src.fill(0xA5)?;
    let ms = median_ms(Device::Cuda(dev.ordinal()), warmup, reps, |_| copy(&src))?;
    Ok(COPY_WORK / ms / 1e6)
}

/// One repetition of the copy ceiling. Each clone's block returns to the allocator when dropped, so every repetition
/// copies into the same memory.
fn copy(src: &DeviceBuffer<u8>) -> Result<()> {
    drop(src.try_clone()?);
    Ok(())
}
