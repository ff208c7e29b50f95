// Flash attention for head_dim ≤ 128 (padded to 128): the entry points of flash_attention.cuh's templates, bf16 and f16.
// Tiles (kernels/src/cuda/attention.rs `FLASH` holds the same numbers for the launch): forward BM 64 × BN 64,
// 4 warps; backward BM 64 × BN 64, 8 warps, phase layouts P1K 4, P2K 2, P3Q 4.
#include "common.cuh"
#include "flash_common.cuh"
#include "flash_attention.cuh"

// qlora-rt: hot
extern "C" __global__ void __launch_bounds__(128) flash_forward_d128_bf16(const FlashParams p) { flash_forward<bf16, 128, 64, 64, 4>(p); }
extern "C" __global__ void __launch_bounds__(128) flash_forward_d128_f16(const FlashParams p) { flash_forward<f16, 128, 64, 64, 4>(p); }
extern "C" __global__ void __launch_bounds__(256) flash_backward_d128_bf16(const FlashParams p) { flash_backward<bf16, 128, 64, 64, 8, 4, 2, 4>(p); }
extern "C" __global__ void __launch_bounds__(256) flash_backward_d128_f16(const FlashParams p) { flash_backward<f16, 128, 64, 64, 8, 4, 2, 4>(p); }
