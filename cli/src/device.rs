//! `--device`: where a command runs. Owns the choice between the CPU and a GPU and its one-line notice; the
//! commands move their model and batches there.

use anyhow::{anyhow, ensure, Result};
use qlora_runtime::{DType, Device};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

/// Where to run and in what precision: cuda:0 in `gpu_dtype` when asked for (one error line when it cannot be
/// opened) or when `auto` finds a GPU it can open; the CPU in f32 otherwise. `auto` prints which, in one line
/// ("note: <doing> on cuda:0 (NVIDIA H100 …)" or "note: no usable CUDA GPU (why); <doing> on CPU").
pub fn pick(device: DeviceArg, gpu_dtype: DType, doing: &str) -> Result<(Device, DType)> {
    pick_gpu(0, device, gpu_dtype, doing)
}

/// As [`pick`], with cuda:`ordinal` as the GPU (a launched rank's `LOCAL_RANK`).
pub fn pick_gpu(ordinal: usize, device: DeviceArg, gpu_dtype: DType, doing: &str) -> Result<(Device, DType)> {
    // Opening the device (driver, context, NVRTC) proves it usable, not just present.
    let open = || -> Result<String> {
        let n = qlora_runtime::device_count().map_err(|e| anyhow!("{e}"))?;
        ensure!(n > 0, "the CUDA driver sees no GPU; run with --device cpu");
        ensure!(ordinal < n, "cuda:{ordinal} does not exist: {n} CUDA GPU(s) visible (check CUDA_VISIBLE_DEVICES)");
        Ok(qlora_runtime::cuda_device(ordinal)?.to_string())
    };
    match device {
        DeviceArg::Cpu => Ok((Device::Cpu, DType::F32)),
        // The causes name --device cpu as the way out.
        DeviceArg::Cuda => {
            open().map_err(|e| anyhow!("--device cuda: {e:#}"))?;
            Ok((Device::Cuda(ordinal), gpu_dtype))
        }
        DeviceArg::Auto => match open() {
            Ok(name) => {
                // The device's own description reads "cuda:0 (NVIDIA H100 80GB HBM3, sm_90a)".
                eprintln!("qlora-rt: note: {doing} on {name}");
                Ok((Device::Cuda(ordinal), gpu_dtype))
            }
            Err(e) => {
                eprintln!("qlora-rt: note: no usable CUDA GPU ({e:#}); {doing} on CPU");
                Ok((Device::Cpu, DType::F32))
            }
        },
    }
}

/// "cpu (f32)", "cuda:0 (bf16 compute)".
pub fn describe((device, dtype): (Device, DType)) -> String {
    match (device, dtype) {
        (Device::Cpu, _) => "cpu (f32)".into(),
        (device, DType::BF16) => format!("{device} (bf16 compute)"),
        (device, _) => format!("{device} (f32)"),
    }
}
