// Flash attention on Hopper wgmma for head_dim ≤ 256 (padded to 256), sm_90a only: the forward entry points of
// flash_attention_sm90.cuh's templates, bf16 and f16: every thread loads, BN 64 keys per tile, 2 warpgroups (128
// query rows), no intra-warpgroup overlap (with it the d256 accumulators spill). The d256 backward is
// flash_attention_d256.cu's mma.sync one. kernels/src/cuda/attention.rs `FLASH_SM90` holds the same numbers.
#include "common.cuh"
#include "flash_common.cuh"
#include "flash_wgmma.cuh"
#include "flash_attention_sm90.cuh"

// qlora-rt: hot
extern "C" __global__ void __launch_bounds__(256, 1) flash_forward_sm90_d256_bf16(const FlashParams p) { flash_forward_sm90<bf16, 256, 64, 2, false>(p); }
extern "C" __global__ void __launch_bounds__(256, 1) flash_forward_sm90_d256_f16(const FlashParams p) { flash_forward_sm90<f16, 256, 64, 2, false>(p); }
