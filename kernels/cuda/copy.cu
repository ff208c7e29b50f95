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
    grid_dependency_sync();
    for (u64 i = thread_index(); i < n; i += thread_count()) {
        u64 rem = i, at = v.offset;
        for (int d = static_cast<int>(v.rank) - 1; d >= 0; --d) {
            at += (rem % v.shape[d]) * v.strides[d];
            rem /= v.shape[d];
        }
        dst[i] = src[at];
    }
}

// src: [n] S → dst: [n] D, through f32 (exact for bf16 → f32; round to nearest even for f32 → bf16). 8-element
// chunks (16-byte accesses, two chunks in flight per thread) when both are 16-byte aligned, the rest one element per
// thread; grid-stride (the launcher's grid is one wave).
template <typename S, typename D> __device__ void cast(const S* __restrict__ src, D* __restrict__ dst, u64 n) {
    grid_dependency_sync();
    const u64 chunks = aligned16(src) && aligned16(dst) ? n / 8 : 0, stride = thread_count();
    for (u64 c = thread_index(); c < chunks; c += 2 * stride) {
        const u64 c1 = c + stride;
        const Raw8<S> r0 = load8(src + 8 * c);
        Raw8<S> r1 = {};
        if (c1 < chunks) r1 = load8(src + 8 * c1);
        float v[8];
        unpack8(r0, v);
        store8(dst + 8 * c, v);
        if (c1 < chunks) {
            unpack8(r1, v);
            store8(dst + 8 * c1, v);
        }
    }
    for (u64 i = 8 * chunks + thread_index(); i < n; i += stride) dst[i] = from_f32<D>(to_f32(src[i]));
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
