// Flash attention for head_dim ≤ 64 (padded to 64): the entry points of flash_attention.cuh's templates, bf16 and f16.
// Tiles (kernels/src/cuda/attention.rs `FLASH` holds the same numbers for the launch): forward BM 128 × BN 64,
// 4 warps; backward BM 64 × BN 64, 4 warps, phase layouts P1K 4, P2K 4, P3Q 4.
#include "common.cuh"
#include "flash_common.cuh"
#include "flash_attention.cuh"

// qlora-rt: hot
extern "C" __global__ void __launch_bounds__(128) flash_forward_d64_bf16(const FlashParams p) { flash_forward<bf16, 64, 128, 64, 4>(p); }
extern "C" __global__ void __launch_bounds__(128) flash_forward_d64_f16(const FlashParams p) { flash_forward<f16, 64, 128, 64, 4>(p); }
extern "C" __global__ void __launch_bounds__(128) flash_backward_d64_bf16(const FlashParams p) { flash_backward<bf16, 64, 64, 64, 4, 4, 4, 4>(p); }
extern "C" __global__ void __launch_bounds__(128) flash_backward_d64_f16(const FlashParams p) { flash_backward<f16, 64, 64, 64, 4, 4, 4, 4>(p); }
