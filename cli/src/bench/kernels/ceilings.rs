//! The two ceilings every other row is a fraction of: the device's copy bandwidth (a 1 GiB device-to-device copy,
//! bytes read + written) and its bf16 tensor-core rate (a cuBLASLt GEMM 8192 × 8192 × 8192 through `matmul`, the
//! launcher every linear layer uses).

use super::{dims, Bench, Ceilings, Work};
use anyhow::Result;
use qlora_kernels::cuda::matmul::matmul;
use qlora_kernels::matmul::Gemm;

pub fn run(b: &mut Bench) -> Result<Ceilings> {
    let n = 1usize << 30;
    let src = b.bytes(n)?;
    // Each clone's block returns to the allocator when dropped, so every repetition copies into the same memory.
    let ms = b.row("copy d2d (ceiling)", "1 GiB", Work::Bytes(2.0 * n as f64), |_| {
        drop(src.try_clone()?);
        Ok(())
    })?;
    drop(src);
    let copy_gbps = 2.0 * n as f64 / ms / 1e6;

    let s = 8192;
    let (a, w) = (b.normal_bf16(s * s, 1.0)?, b.normal_bf16(s * s, 1.0)?);
    let mut c = b.dev.alloc(s * s)?;
    let flops = 2.0 * (s as f64).powi(3);
    let g = Gemm::new(s, s, s);
    let ms =
        b.row("gemm bf16 (ceiling)", &dims(&[s, s, s]), Work::Flops(flops), |_| Ok(matmul(&g, &a, &w, &mut c)?))?;
    Ok(Ceilings { copy_gbps, gemm_tflops: flops / ms / 1e9 })
}
