// Flash attention on Hopper wgmma for head_dim ≤ 128 (padded to 128), sm_90a only: the entry points of
// flash_attention_sm90.cuh's and flash_attention_sm90_backward.cuh's templates, bf16 and f16. Forward:
// warp-specialized and persistent (one block per multiprocessor), BN 128 keys per tile, 2 consumer warpgroups (128
// query rows) with ping-pong + 1 producer warpgroup (24 registers; one thread issues TMA loads),
// O rescaled lazily (+5% on the H200); backward: 2 consumer warpgroups, 128 keys per block, warp-specialized (a
// producer warpgroup's warp loads Q and dO by TMA, another adds each pair's dQ, staged in shared memory, by tensor
// reduce-adds, one per 32 columns: 7% faster than a bulk reduce-add per row, H100 2026-12-07; staging was +8% at
// 4 × 2048 and +11% at 1 × 8192 over atomics there), P and dS formed under the tensor cores' products (+2%).
// The backward's `_seq_` entry points run it with the sequence slowest in the grid, for packs of equal sequences
// (flash_common.cuh `flash_block`).
// kernels/src/cuda/attention/tables.rs `FLASH_SM90` holds the same numbers for the launch.
#include "common.cuh"
#include "flash_common.cuh"
#include "flash_wgmma.cuh"
#include "flash_attention_sm90.cuh"
#include "flash_attention_sm90_backward.cuh"

// qlora-rt: hot
extern "C" __global__ void __launch_bounds__(384, 1) flash_forward_sm90_d128_bf16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_forward_sm90_ws<bf16, 128, 128, 2, true, 24, true, true, true>(p, &maps); }
extern "C" __global__ void __launch_bounds__(384, 1) flash_forward_sm90_d128_f16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_forward_sm90_ws<f16, 128, 128, 2, true, 24, true, true, true>(p, &maps); }
extern "C" __global__ void __launch_bounds__(384, 1) flash_backward_sm90_d128_bf16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_backward_sm90<bf16, 128, 2, true, true, false, true>(p, &maps); }
extern "C" __global__ void __launch_bounds__(384, 1) flash_backward_sm90_d128_f16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_backward_sm90<f16, 128, 2, true, true, false, true>(p, &maps); }
extern "C" __global__ void __launch_bounds__(384, 1) flash_backward_sm90_seq_d128_bf16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_backward_sm90<bf16, 128, 2, true, true, false, true, true>(p, &maps); }
extern "C" __global__ void __launch_bounds__(384, 1) flash_backward_sm90_seq_d128_f16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_backward_sm90<f16, 128, 2, true, true, false, true, true>(p, &maps); }
