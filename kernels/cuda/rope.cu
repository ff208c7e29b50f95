// Twin of kernels/src/rope.rs: rotate-half rotary embeddings, y1 = x1·cos − x2·sin, y2 = x2·cos + x1·sin, and the
// inverse rotation (sin negated) as the backward. Each product and sum is rounded separately (__fmul_rn, no fused
// multiply-add), as the CPU code and transformers' separate tensor ops are, so f32 results are the CPU's to the bit.
//
// Vector path (half a multiple of 8): a thread rotates 8 consecutive pairs of one head with 16-byte accesses (x1, x2,
// y1, y2: one each for bf16, two for f32; cos and sin: two each, read by every head of the token from cache).
// Scalar path: one pair per thread. The fused kernels rotate q and k of the same tokens in one launch.
#include "common.cuh"

template <unsigned W, typename T> __device__ __forceinline__ void load_pairs(const T* p, float (&v)[W]) {
    if constexpr (W == 8) load8_f32(p, v);
    else v[0] = to_f32(*p);
}

template <unsigned W, typename T> __device__ __forceinline__ void store_pairs(T* p, const float (&v)[W]) {
    if constexpr (W == 8) store8(p, v);
    else *p = from_f32<T>(v[0]);
}

// Rotates W pairs per step over up to two tensors, and with COPY a third is copied: chunks [0, chunks_a) are those of
// xa (heads_a heads per token), [chunks_a, chunks_b) those of xb (heads_b heads), [chunks_b, chunks) those of xc (heads_b
// heads, copied to yc unrotated: a value row written beside its key's); a chunk is W consecutive pairs of one head
// (half / W chunks per head). x: [tokens, heads, 2·half], cos/sin: [tokens, half] f32 → y: like x (y may be x: every
// element is read before the thread that owns it writes it, and no other thread touches it).
template <bool INVERSE, unsigned W, bool COPY, typename T>
__device__ void rotate(const T* xa, T* ya, unsigned heads_a, unsigned chunks_a, const T* xb, T* yb, unsigned heads_b,
                       unsigned chunks_b, const T* xc, T* yc, unsigned chunks, const float* __restrict__ cos,
                       const float* __restrict__ sin, unsigned half) {
    grid_dependency_sync();
    const unsigned per_head = half / W;
    for (unsigned k = blockIdx.x * blockDim.x + threadIdx.x; k < chunks; k += gridDim.x * blockDim.x) {
        const bool a = k < chunks_a, copy = COPY && k >= chunks_b;
        const unsigned local = a ? k : copy ? k - chunks_b : k - chunks_a, heads = a ? heads_a : heads_b;
        const T* x = a ? xa : copy ? xc : xb;
        T* y = a ? ya : copy ? yc : yb;
        const unsigned head = local / per_head, i = (local - head * per_head) * W, token = head / heads;
        const u64 at = static_cast<u64>(head) * 2 * half + i, t = static_cast<u64>(token) * half + i;
        float x1[W], x2[W];
        load_pairs(x + at, x1);
        load_pairs(x + at + half, x2);
        if (COPY && copy) {
            store_pairs(y + at, x1);
            store_pairs(y + at + half, x2);
            continue;
        }
        float c[W], s[W];
        load_pairs(cos + t, c);
        load_pairs(sin + t, s);
        float y1[W], y2[W];
#pragma unroll
        for (unsigned j = 0; j < W; ++j) {
            const float sj = INVERSE ? -s[j] : s[j];
            y1[j] = __fsub_rn(__fmul_rn(x1[j], c[j]), __fmul_rn(x2[j], sj));
            y2[j] = __fadd_rn(__fmul_rn(x2[j], c[j]), __fmul_rn(x1[j], sj));
        }
        store_pairs(y + at, y1);
        store_pairs(y + at + half, y2);
    }
}

// Entry points: x: [tokens, heads, 2·half] → y with chunks = tokens·heads·half/W; the fused ones q: [tokens,
// q_heads, 2·half] → yq and k: [tokens, k_heads, 2·half] → yk, q_chunks = tokens·q_heads·half/W, chunks = q_chunks +
// tokens·k_heads·half/W; rope_qkv_forward also v: like k → yv copied, k_chunks = q_chunks + tokens·k_heads·half/W,
// chunks = k_chunks + the same again (a layer's keys and values entering its KV cache in the launch that rotates q). W = 8 (vector path) unless named scalar (W = 1).

// qlora-rt: hot
extern "C" __global__ void rope_forward_f32(const float* x, const float* cos, const float* sin, float* y, unsigned chunks, unsigned heads, unsigned half) { rotate<false, 8, false>(x, y, heads, chunks, x, y, heads, chunks, x, y, chunks, cos, sin, half); }
extern "C" __global__ void rope_forward_bf16(const bf16* x, const float* cos, const float* sin, bf16* y, unsigned chunks, unsigned heads, unsigned half) { rotate<false, 8, false>(x, y, heads, chunks, x, y, heads, chunks, x, y, chunks, cos, sin, half); }
extern "C" __global__ void rope_backward_f32(const float* dy, const float* cos, const float* sin, float* dx, unsigned chunks, unsigned heads, unsigned half) { rotate<true, 8, false>(dy, dx, heads, chunks, dy, dx, heads, chunks, dy, dx, chunks, cos, sin, half); }
extern "C" __global__ void rope_backward_bf16(const bf16* dy, const float* cos, const float* sin, bf16* dx, unsigned chunks, unsigned heads, unsigned half) { rotate<true, 8, false>(dy, dx, heads, chunks, dy, dx, heads, chunks, dy, dx, chunks, cos, sin, half); }

extern "C" __global__ void rope_forward_scalar_f32(const float* x, const float* cos, const float* sin, float* y, unsigned chunks, unsigned heads, unsigned half) { rotate<false, 1, false>(x, y, heads, chunks, x, y, heads, chunks, x, y, chunks, cos, sin, half); }
extern "C" __global__ void rope_forward_scalar_bf16(const bf16* x, const float* cos, const float* sin, bf16* y, unsigned chunks, unsigned heads, unsigned half) { rotate<false, 1, false>(x, y, heads, chunks, x, y, heads, chunks, x, y, chunks, cos, sin, half); }
extern "C" __global__ void rope_backward_scalar_f32(const float* dy, const float* cos, const float* sin, float* dx, unsigned chunks, unsigned heads, unsigned half) { rotate<true, 1, false>(dy, dx, heads, chunks, dy, dx, heads, chunks, dy, dx, chunks, cos, sin, half); }
extern "C" __global__ void rope_backward_scalar_bf16(const bf16* dy, const float* cos, const float* sin, bf16* dx, unsigned chunks, unsigned heads, unsigned half) { rotate<true, 1, false>(dy, dx, heads, chunks, dy, dx, heads, chunks, dy, dx, chunks, cos, sin, half); }

// qlora-rt: hot
extern "C" __global__ void rope_qk_forward_f32(const float* q, const float* k, float* yq, float* yk, const float* cos, const float* sin, unsigned q_chunks, unsigned chunks, unsigned q_heads, unsigned k_heads, unsigned half) { rotate<false, 8, false>(q, yq, q_heads, q_chunks, k, yk, k_heads, chunks, k, yk, chunks, cos, sin, half); }
extern "C" __global__ void rope_qk_forward_bf16(const bf16* q, const bf16* k, bf16* yq, bf16* yk, const float* cos, const float* sin, unsigned q_chunks, unsigned chunks, unsigned q_heads, unsigned k_heads, unsigned half) { rotate<false, 8, false>(q, yq, q_heads, q_chunks, k, yk, k_heads, chunks, k, yk, chunks, cos, sin, half); }
extern "C" __global__ void rope_qk_backward_f32(const float* dq, const float* dk, float* dxq, float* dxk, const float* cos, const float* sin, unsigned q_chunks, unsigned chunks, unsigned q_heads, unsigned k_heads, unsigned half) { rotate<true, 8, false>(dq, dxq, q_heads, q_chunks, dk, dxk, k_heads, chunks, dk, dxk, chunks, cos, sin, half); }
extern "C" __global__ void rope_qk_backward_bf16(const bf16* dq, const bf16* dk, bf16* dxq, bf16* dxk, const float* cos, const float* sin, unsigned q_chunks, unsigned chunks, unsigned q_heads, unsigned k_heads, unsigned half) { rotate<true, 8, false>(dq, dxq, q_heads, q_chunks, dk, dxk, k_heads, chunks, dk, dxk, chunks, cos, sin, half); }

extern "C" __global__ void rope_qk_forward_scalar_f32(const float* q, const float* k, float* yq, float* yk, const float* cos, const float* sin, unsigned q_chunks, unsigned chunks, unsigned q_heads, unsigned k_heads, unsigned half) { rotate<false, 1, false>(q, yq, q_heads, q_chunks, k, yk, k_heads, chunks, k, yk, chunks, cos, sin, half); }
extern "C" __global__ void rope_qk_forward_scalar_bf16(const bf16* q, const bf16* k, bf16* yq, bf16* yk, const float* cos, const float* sin, unsigned q_chunks, unsigned chunks, unsigned q_heads, unsigned k_heads, unsigned half) { rotate<false, 1, false>(q, yq, q_heads, q_chunks, k, yk, k_heads, chunks, k, yk, chunks, cos, sin, half); }
extern "C" __global__ void rope_qk_backward_scalar_f32(const float* dq, const float* dk, float* dxq, float* dxk, const float* cos, const float* sin, unsigned q_chunks, unsigned chunks, unsigned q_heads, unsigned k_heads, unsigned half) { rotate<true, 1, false>(dq, dxq, q_heads, q_chunks, dk, dxk, k_heads, chunks, dk, dxk, chunks, cos, sin, half); }
extern "C" __global__ void rope_qk_backward_scalar_bf16(const bf16* dq, const bf16* dk, bf16* dxq, bf16* dxk, const float* cos, const float* sin, unsigned q_chunks, unsigned chunks, unsigned q_heads, unsigned k_heads, unsigned half) { rotate<true, 1, false>(dq, dxq, q_heads, q_chunks, dk, dxk, k_heads, chunks, dk, dxk, chunks, cos, sin, half); }

// qlora-rt: hot
extern "C" __global__ void rope_qkv_forward_f32(const float* q, const float* k, const float* v, float* yq, float* yk, float* yv, const float* cos, const float* sin, unsigned q_chunks, unsigned k_chunks, unsigned chunks, unsigned q_heads, unsigned k_heads, unsigned half) { rotate<false, 8, true>(q, yq, q_heads, q_chunks, k, yk, k_heads, k_chunks, v, yv, chunks, cos, sin, half); }
extern "C" __global__ void rope_qkv_forward_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* yq, bf16* yk, bf16* yv, const float* cos, const float* sin, unsigned q_chunks, unsigned k_chunks, unsigned chunks, unsigned q_heads, unsigned k_heads, unsigned half) { rotate<false, 8, true>(q, yq, q_heads, q_chunks, k, yk, k_heads, k_chunks, v, yv, chunks, cos, sin, half); }
extern "C" __global__ void rope_qkv_forward_scalar_f32(const float* q, const float* k, const float* v, float* yq, float* yk, float* yv, const float* cos, const float* sin, unsigned q_chunks, unsigned k_chunks, unsigned chunks, unsigned q_heads, unsigned k_heads, unsigned half) { rotate<false, 1, true>(q, yq, q_heads, q_chunks, k, yk, k_heads, k_chunks, v, yv, chunks, cos, sin, half); }
extern "C" __global__ void rope_qkv_forward_scalar_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* yq, bf16* yk, bf16* yv, const float* cos, const float* sin, unsigned q_chunks, unsigned k_chunks, unsigned chunks, unsigned q_heads, unsigned k_heads, unsigned half) { rotate<false, 1, true>(q, yq, q_heads, q_chunks, k, yk, k_heads, k_chunks, v, yv, chunks, cos, sin, half); }
