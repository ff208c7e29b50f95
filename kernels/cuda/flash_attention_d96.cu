// Flash attention for head_dim ≤ 96 (padded to 96): the entry points of flash_attention.cuh's templates, bf16 and f16.
// Tiles (kernels/src/cuda/attention.rs `FLASH` holds the same numbers for the launch): forward BM 64 × BN 64,
// 4 warps; backward BM 64 × BN 128, 8 warps, phase layouts P1K 8, P2K 4, P3Q 4.
#include "common.cuh"
#include "flash_common.cuh"
#include "flash_attention.cuh"

// qlora-rt: hot
extern "C" __global__ void __launch_bounds__(128) flash_forward_d96_bf16(const FlashParams p) { flash_forward<bf16, 96, 64, 64, 4>(p); }
extern "C" __global__ void __launch_bounds__(128) flash_forward_d96_f16(const FlashParams p) { flash_forward<f16, 96, 64, 64, 4>(p); }
extern "C" __global__ void __launch_bounds__(256) flash_backward_d96_bf16(const FlashParams p) { flash_backward<bf16, 96, 64, 128, 8, 8, 4, 4>(p); }
extern "C" __global__ void __launch_bounds__(256) flash_backward_d96_f16(const FlashParams p) { flash_backward<f16, 96, 64, 128, 8, 8, 4, 4>(p); }
