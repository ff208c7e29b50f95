// Twin of the k == 0 / alpha == 0 path of kernels/src/matmul.rs, where A and B are not read and cuBLASLt, which
// wants k ≥ 1, is not called: C = beta·C per batch entry, zeros when beta == 0 (C is then never read, so NaN
// garbage in it cannot survive), and of its products with a few rows of A (`gemm_few_rows` below). The other products go
// through cuBLASLt (kernels/src/cuda/matmul.rs).
#include "common.cuh"

// c: [batch entries of mn elements, stride_c apart] → c = beta·c (0 when beta == 0). Grid-stride over batch·mn.
template <typename T> __device__ void gemm_scale_c(T* c, float beta, u64 batch, u64 mn, u64 stride_c) {
    for (u64 i = thread_index(); i < batch * mn; i += thread_count()) {
        T* p = c + (i / mn) * stride_c + i % mn;
        *p = from_f32<T>(beta == 0.0f ? 0.0f : beta * to_f32(*p));
    }
}

extern "C" __global__ void gemm_scale_c_f32(float* c, float beta, u64 batch, u64 mn, u64 stride_c) {
    gemm_scale_c(c, beta, batch, mn, stride_c);
}
extern "C" __global__ void gemm_scale_c_bf16(bf16* c, float beta, u64 batch, u64 mn, u64 stride_c) {
    gemm_scale_c(c, beta, batch, mn, stride_c);
}

// C = alpha·A·Bᵀ + beta·C for a few rows of A (m ≤ GEMM_FEW_ROWS: a decoding step's tokens) against a B of n ≤ a few
// hundred rows with a long k (LoRA's x·Aᵀ: [1, 4096]·[48, 4096]ᵀ). cuBLASLt splits such a k across blocks and adds a
// second kernel to reduce the parts; here one block owns column j of C and its warps split k, meeting in shared
// memory in a fixed order (the same bits every run), so the product is one launch. f32 sums, one rounding to T.
// A row-major [m, k] (lda), B row-major [n, k] (ldb), C row-major [m, n] (ldc); k, lda, ldb multiples of 8 and A, B
// 16-byte aligned (the launcher checks: kernels/src/cuda/matmul.rs `few_rows`).
constexpr unsigned GEMM_FEW_ROWS = 8;
constexpr unsigned GEMM_FEW_ROWS_WARPS = 4;

template <typename T>
__device__ void gemm_few_rows(const T* __restrict__ a, u64 lda, const T* __restrict__ b, u64 ldb, T* c, u64 ldc,
                              unsigned m, unsigned k, float alpha, float beta) {
    __shared__ float partial[GEMM_FEW_ROWS_WARPS][GEMM_FEW_ROWS];
    const unsigned j = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const T* bj = b + static_cast<u64>(j) * ldb;
    float acc[GEMM_FEW_ROWS];
#pragma unroll
    for (unsigned r = 0; r < GEMM_FEW_ROWS; ++r) acc[r] = 0.0f;
    for (unsigned i = 8 * threadIdx.x; i < k; i += 8 * blockDim.x) {
        float bv[8];
        load8_f32(bj + i, bv);
#pragma unroll
        for (unsigned r = 0; r < GEMM_FEW_ROWS; ++r) {
            if (r < m) {
                float av[8];
                load8_f32(a + r * lda + i, av);
#pragma unroll
                for (unsigned e = 0; e < 8; ++e) acc[r] = fmaf(av[e], bv[e], acc[r]);
            }
        }
    }
#pragma unroll
    for (unsigned r = 0; r < GEMM_FEW_ROWS; ++r) {
        float s = acc[r];
        for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(0xffffffffu, s, d);
        if (lane == 0) partial[warp][r] = s;
    }
    __syncthreads();
    if (threadIdx.x < m) {
        float s = partial[0][threadIdx.x];
        for (unsigned w = 1; w < blockDim.x / 32; ++w) s += partial[w][threadIdx.x];
        T* out = c + threadIdx.x * ldc + j;
        *out = from_f32<T>(beta == 0.0f ? alpha * s : fmaf(alpha, s, beta * to_f32(*out)));
    }
}

extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_f32(const float* a, u64 lda, const float* b, u64 ldb, float* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) {
    gemm_few_rows(a, lda, b, ldb, c, ldc, m, k, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_bf16(const bf16* a, u64 lda, const bf16* b, u64 ldb, bf16* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) {
    gemm_few_rows(a, lda, b, ldb, c, ldc, m, k, alpha, beta);
}
