// Twin of kernels/src/rope.rs: rotate-half rotary embeddings, y1 = x1·cos − x2·sin, y2 = x2·cos + x1·sin, and the
// inverse rotation (sin negated) as the backward. Each product and sum is rounded separately (__fmul_rn, no fused
// multiply-add), as the CPU code and transformers' separate tensor ops are, so f32 results are the CPU's to the bit.
#include "common.cuh"

// x: [tokens, heads, head_dim], cos/sin: [tokens, head_dim/2] f32 → y: [tokens, heads, head_dim]. One thread per
// rotated pair; n = tokens·heads·half.
template <bool INVERSE, typename T>
__device__ void rotate(const T* x, const float* cos, const float* sin, T* y, u64 n, unsigned heads, unsigned half) {
    for (u64 k = thread_index(); k < n; k += thread_count()) {
        const u64 i = k % half, head = k / half, token = head / heads;
        const float c = cos[token * half + i];
        const float s = INVERSE ? -sin[token * half + i] : sin[token * half + i];
        const u64 base = head * 2 * half + i;
        const float x1 = to_f32(x[base]), x2 = to_f32(x[base + half]);
        y[base] = from_f32<T>(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
        y[base + half] = from_f32<T>(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
    }
}

// qlora-rt: hot
extern "C" __global__ void rope_forward_f32(const float* x, const float* cos, const float* sin, float* y, u64 n, unsigned heads, unsigned half) {
    rotate<false>(x, cos, sin, y, n, heads, half);
}
extern "C" __global__ void rope_forward_bf16(const bf16* x, const float* cos, const float* sin, bf16* y, u64 n, unsigned heads, unsigned half) {
    rotate<false>(x, cos, sin, y, n, heads, half);
}

// qlora-rt: hot
extern "C" __global__ void rope_backward_f32(const float* dy, const float* cos, const float* sin, float* dx, u64 n, unsigned heads, unsigned half) {
    rotate<true>(dy, cos, sin, dx, n, heads, half);
}
extern "C" __global__ void rope_backward_bf16(const bf16* dy, const float* cos, const float* sin, bf16* dx, u64 n, unsigned heads, unsigned half) {
    rotate<true>(dy, cos, sin, dx, n, heads, half);
}
