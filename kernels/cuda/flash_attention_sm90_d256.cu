// Flash attention on Hopper wgmma for head_dim ≤ 256 (padded to 256), sm_90a only: the entry points of
// flash_attention_sm90.cuh's and flash_attention_sm90_backward.cuh's templates, bf16 and f16. Forward:
// warp-specialized, a block per work item (two Q buffers would not fit beside d256's tiles), BN 64 keys per tile, 2
// consumer warpgroups (128 query rows, 240 registers: with the cp.async producer's 224 they spilled) with ping-pong +
// 1 producer warpgroup (24 registers; one thread issues TMA loads), O rescaled lazily: 1.37× the all-load forward
// it replaced (H100); backward: two warpgroups sharing 64 keys (1.8× the mma.sync backward there), dQ staged over the
// pair's Q and dO tiles and added by tensor reduce-adds, half of it under dK's product.
// The backward's `_seq_` entry points run it with the sequence slowest in the grid, for packs of equal sequences
// (flash_common.cuh `flash_block`).
// kernels/src/cuda/attention/tables.rs `FLASH_SM90` holds the same numbers.
#include "common.cuh"
#include "flash_common.cuh"
#include "flash_wgmma.cuh"
#include "flash_attention_sm90.cuh"
#include "flash_attention_sm90_backward.cuh"

// qlora-rt: hot
extern "C" __global__ void __launch_bounds__(384, 1) flash_forward_sm90_d256_bf16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_forward_sm90_ws<bf16, 256, 64, 2, true, 24, true, false, true>(p, &maps); }
extern "C" __global__ void __launch_bounds__(384, 1) flash_forward_sm90_d256_f16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_forward_sm90_ws<f16, 256, 64, 2, true, 24, true, false, true>(p, &maps); }
extern "C" __global__ void __launch_bounds__(256, 1) flash_backward_sm90_d256_bf16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_backward_sm90_split<bf16, 256>(p, &maps); }
extern "C" __global__ void __launch_bounds__(256, 1) flash_backward_sm90_d256_f16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_backward_sm90_split<f16, 256>(p, &maps); }
extern "C" __global__ void __launch_bounds__(256, 1) flash_backward_sm90_seq_d256_bf16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_backward_sm90_split<bf16, 256, true>(p, &maps); }
extern "C" __global__ void __launch_bounds__(256, 1) flash_backward_sm90_seq_d256_f16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_backward_sm90_split<f16, 256, true>(p, &maps); }
