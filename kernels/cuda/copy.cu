// What the runtime needs for views and dtypes on the device (its CPU side lives in runtime's tensor code): gathering
// a strided view into contiguous memory, and dtype conversion. The gather moves bytes, so it is instantiated by
// element size (u8, u16, u32), not by type.
#include "common.cuh"

#define MAX_RANK 8

// A strided view: element [i0, …, i_{rank−1}] of the view is src[offset + Σ i_d·strides[d]]. Passed by value
// (kernels/src/cuda/copy.rs has the same layout).
struct View {
    u64 shape[MAX_RANK];
    u64 strides[MAX_RANK];
    u64 offset;
    unsigned rank;
};

// src: the view v (n = Π shape elements) → dst: [n] row-major. Grid-stride over n.
template <typename E> __device__ void strided_copy(const E* src, E* dst, View v, u64 n) {
    for (u64 i = thread_index(); i < n; i += thread_count()) {
        u64 rem = i, at = v.offset;
        for (int d = static_cast<int>(v.rank) - 1; d >= 0; --d) {
            at += (rem % v.shape[d]) * v.strides[d];
            rem /= v.shape[d];
        }
        dst[i] = src[at];
    }
}

// src: [n] S → dst: [n] D, through f32 (exact for bf16 → f32; round to nearest even for f32 → bf16).
template <typename S, typename D> __device__ void cast(const S* src, D* dst, u64 n) {
    for (u64 i = thread_index(); i < n; i += thread_count()) dst[i] = from_f32<D>(to_f32(src[i]));
}

// qlora-rt: hot
extern "C" __global__ void strided_copy_u8(const unsigned char* src, unsigned char* dst, View v, u64 n) { strided_copy(src, dst, v, n); }
extern "C" __global__ void strided_copy_u16(const unsigned short* src, unsigned short* dst, View v, u64 n) { strided_copy(src, dst, v, n); }
extern "C" __global__ void strided_copy_u32(const unsigned* src, unsigned* dst, View v, u64 n) { strided_copy(src, dst, v, n); }

// qlora-rt: hot
extern "C" __global__ void cast_f32_to_f32(const float* src, float* dst, u64 n) { cast(src, dst, n); }
extern "C" __global__ void cast_f32_to_bf16(const float* src, bf16* dst, u64 n) { cast(src, dst, n); }
extern "C" __global__ void cast_bf16_to_f32(const bf16* src, float* dst, u64 n) { cast(src, dst, n); }
extern "C" __global__ void cast_bf16_to_bf16(const bf16* src, bf16* dst, u64 n) { cast(src, dst, n); }
