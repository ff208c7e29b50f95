// Shared by every kernel source: the bf16 storage type and its f32 conversions, grid-stride indexing, block
// reductions. The loader splices this file in place of each source's `#include "common.cuh"` line, so NVRTC needs no
// include path and no CUDA headers (nvcc compiles the sources unchanged, finding this file beside them).
//
// Conventions: I/O in f32 or bf16, arithmetic in f32, one rounding to the output type. Every entry point is
// `extern "C"` and named `<op>_<dtype>`; its launcher in kernels/src/cuda/<op>.rs passes arguments in the same
// order. Blocks are 1-D; row kernels take one block per row and a block size that is a multiple of 32.
#pragma once

typedef unsigned long long u64;

// bf16 as stored (half::bf16 on the Rust side): the top 16 bits of an f32. A struct, so no arithmetic happens on it
// by accident.
struct bf16 {
    unsigned short bits;
};

// IEEE half as stored (half::f16 on the Rust side); the attention kernels read it, NF4 dequantization writes it.
struct f16 {
    unsigned short bits;
};

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float(static_cast<unsigned>(v.bits) << 16); }
__device__ __forceinline__ float to_f32(f16 v) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(v.bits));
    return r;
}

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
// Round to nearest even, as half::bf16::from_f32 (sm_80+ instruction).
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) {
    bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float v) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
}

__device__ __forceinline__ float f32_nan() { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ float f32_neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float f32_pos_inf() { return __int_as_float(0x7f800000); }

// A subnormal becomes a zero of the same sign (what bitsandbytes' --use_fast_math kernels do; nf4.rs `ftz`).
__device__ __forceinline__ float flush_subnormal(float v) {
    return fabsf(v) < 1.17549435e-38f ? copysignf(0.0f, v) : v;
}

// Grid-stride loops over element counts past 2^32.
__device__ __forceinline__ u64 thread_index() { return static_cast<u64>(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64 thread_count() { return static_cast<u64>(gridDim.x) * blockDim.x; }

// Sum over the block, returned to every thread. A fixed tree for a fixed block size, so results are reproducible
// run to run. Every thread of the block must call it.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // the previous call's readers are done with `partial`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Max over the block (NaN-ignoring, like Rust's f32::max), returned to every thread.
__device__ float block_max(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : f32_neg_inf();
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
