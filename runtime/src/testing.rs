//! Test support: the kernels crate's tolerances, closeness checks and GPU lookup, plus [`test_device!`](crate::test_device), which runs
//! one test body on the CPU and on CUDA (candle's `test_device!`): an op's tests are written once for both devices.

pub use qlora_kernels::testing::*;

use crate::Device;

/// `cuda:0` when a usable GPU is present (printing `qlora-gpu: <test>: ran on …`), else None after printing
/// `skipped` (a failure under QLORA_REQUIRE_GPU=1): the CUDA half of [`test_device!`](crate::test_device).
pub fn gpu_device(test: &str) -> Option<Device> {
    gpu(test).map(|dev| Device::Cuda(dev.ordinal()))
}

/// `test_device!(body, name_cpu, name_cuda)` defines two tests that call `body(device: Device)`: `name_cpu` on the
/// CPU and `name_cuda` on the first GPU (skipped, and passing, without one unless QLORA_REQUIRE_GPU=1). Two names,
/// so that the GPU runner's per-test logs and table keep them apart.
#[macro_export]
macro_rules! test_device {
    ($body:path, $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() {
            $body($crate::Device::Cpu)
        }

        #[test]
        fn $cuda() {
            if let Some(device) = $crate::testing::gpu_device(stringify!($cuda)) {
                $body(device)
            }
        }
    };
}
