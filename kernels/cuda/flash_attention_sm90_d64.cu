// Flash attention on Hopper wgmma for head_dim ≤ 64 (padded to 64), sm_90a only: the entry points of
// flash_attention_sm90.cuh's and flash_attention_sm90_backward.cuh's templates, bf16 and f16. Forward:
// warp-specialized and persistent (one block per multiprocessor), BN 96 keys per tile, 3 consumer warpgroups (192
// query rows, 160 registers each: 128-key tiles spilled 232 bytes there) with ping-pong + 1 producer warpgroup (24
// registers; one thread issues TMA loads), O rescaled lazily (only when a row max grows by more than 2^8: +4% on the
// H200); 7% faster than 2 warpgroups × 128 keys, and 64-key tiles 12% slower (H100). Backward: 2 consumer
// warpgroups, 128 keys per block, warp-specialized as at d128 (a producer warpgroup's warp loads Q and dO by TMA,
// another adds each pair's staged dQ by tensor reduce-adds, one per 32 columns): 8% faster than the consumers loading
// and adding dQ by atomics (H100, 2026-12-07; with a bulk reduce-add per row it had been 17% slower), and its
// overlapped variant 1% slower than this one.
// The backward's `_seq_` entry points run it with the sequence slowest in the grid, for packs of equal sequences
// (flash_common.cuh `flash_block`).
// kernels/src/cuda/attention/tables.rs `FLASH_SM90` holds the same numbers for the launch.
#include "common.cuh"
#include "flash_common.cuh"
#include "flash_wgmma.cuh"
#include "flash_attention_sm90.cuh"
#include "flash_attention_sm90_backward.cuh"

// qlora-rt: hot
extern "C" __global__ void __launch_bounds__(512, 1) flash_forward_sm90_d64_bf16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_forward_sm90_ws<bf16, 64, 96, 3, true, 24, true, true, true>(p, &maps); }
extern "C" __global__ void __launch_bounds__(512, 1) flash_forward_sm90_d64_f16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_forward_sm90_ws<f16, 64, 96, 3, true, 24, true, true, true>(p, &maps); }
extern "C" __global__ void __launch_bounds__(384, 1) flash_backward_sm90_d64_bf16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_backward_sm90<bf16, 64, 2, false, true, false, true>(p, &maps); }
extern "C" __global__ void __launch_bounds__(384, 1) flash_backward_sm90_d64_f16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_backward_sm90<f16, 64, 2, false, true, false, true>(p, &maps); }
extern "C" __global__ void __launch_bounds__(384, 1) flash_backward_sm90_seq_d64_bf16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_backward_sm90<bf16, 64, 2, false, true, false, true, true>(p, &maps); }
extern "C" __global__ void __launch_bounds__(384, 1) flash_backward_sm90_seq_d64_f16(const FlashParams p, const __grid_constant__ FlashMaps maps) { flash_backward_sm90<f16, 64, 2, false, true, false, true, true>(p, &maps); }
