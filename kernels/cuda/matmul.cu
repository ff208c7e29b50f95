// Twin of the k == 0 / alpha == 0 path of kernels/src/matmul.rs, where A and B are not read and cuBLASLt, which
// wants k ≥ 1, is not called: C = beta·C per batch entry, zeros when beta == 0 (C is then never read, so NaN
// garbage in it cannot survive), and of its products with a few rows of A (`gemm_few_rows` below). The other products go
// through cuBLASLt (kernels/src/cuda/matmul.rs).
#include "common.cuh"

// c: [batch entries of mn elements, stride_c apart] → c = beta·c (0 when beta == 0). Grid-stride over batch·mn.
template <typename T> __device__ void gemm_scale_c(T* c, float beta, u64 batch, u64 mn, u64 stride_c) {
    grid_dependency_sync();
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

// C = alpha·A·Bᵀ + beta·C for a few rows of A (m ≤ 8: a decoding step's tokens) against a B of n ≤ a few
// hundred rows with a long k (LoRA's x·Aᵀ: [1, 4096]·[48, 4096]ᵀ). cuBLASLt splits such a k across blocks and adds a
// second kernel to reduce the parts; here one block owns column j of C and its 16 warps split k, meeting in shared
// memory in a fixed order (the same bits every run), so the product is one launch. Each thread has two 8-element
// vectors of B in flight before any arithmetic (m ≤ 4), so k ≤ 8192 is one round trip to memory per block (the
// launch's latency, not its bytes, is its cost). f32 sums, one rounding to T.
// A row-major [m, k] (lda), B row-major [n, k] (ldb), C row-major [m, n] (ldc); k, lda, ldb multiples of 8 and A, B
// 16-byte aligned (the launcher checks: kernels/src/cuda/matmul.rs `few_rows`). M rows of A are a template (1, 2, 4,
// 8); rows m..M-1 re-read row m - 1 and are not written.
constexpr unsigned GEMM_FEW_ROWS_WARPS = 16;

template <typename T, unsigned M>
__device__ __forceinline__ void few_rows_fma(const T* __restrict__ a, u64 lda, unsigned m, unsigned i,
                                             const float (&bv)[8], float (&acc)[M]) {
#pragma unroll
    for (unsigned r = 0; r < M; ++r) {
        float av[8];
        load8_f32(a + min(r, m - 1) * lda + i, av);
#pragma unroll
        for (unsigned e = 0; e < 8; ++e) acc[r] = fmaf(av[e], bv[e], acc[r]);
    }
}

template <typename T, unsigned M>
__device__ void gemm_few_rows(const T* __restrict__ a, u64 lda, const T* __restrict__ b, u64 ldb, T* c, u64 ldc,
                              unsigned m, unsigned k, float alpha, float beta) {
    __shared__ float partial[GEMM_FEW_ROWS_WARPS][M];
    grid_dependency_sync();
    const unsigned j = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const T* bj = b + static_cast<u64>(j) * ldb;
    float acc[M];
#pragma unroll
    for (unsigned r = 0; r < M; ++r) acc[r] = 0.0f;
    // With 8 rows of A, their loads alone keep enough in flight: a second vector of B would only spill (f32).
    constexpr unsigned ahead = M <= 4 ? 2 : 1;
    const unsigned stride = 8 * blockDim.x;
    for (unsigned i0 = 8 * threadIdx.x; i0 < k; i0 += ahead * stride) {
        Raw8<T> bs[ahead];
#pragma unroll
        for (unsigned u = 0; u < ahead; ++u) bs[u] = load8(bj + min(i0 + u * stride, k - 8));  // past k: a vector read, unused
#pragma unroll
        for (unsigned u = 0; u < ahead; ++u) {
            if (i0 + u * stride < k) {
                float bv[8];
                unpack8(bs[u], bv);
                few_rows_fma<T, M>(a, lda, m, i0 + u * stride, bv, acc);
            }
        }
    }
#pragma unroll
    for (unsigned r = 0; r < M; ++r) {
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

extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_m1_f32(const float* a, u64 lda, const float* b, u64 ldb, float* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) { gemm_few_rows<float, 1>(a, lda, b, ldb, c, ldc, m, k, alpha, beta); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_m2_f32(const float* a, u64 lda, const float* b, u64 ldb, float* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) { gemm_few_rows<float, 2>(a, lda, b, ldb, c, ldc, m, k, alpha, beta); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_m4_f32(const float* a, u64 lda, const float* b, u64 ldb, float* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) { gemm_few_rows<float, 4>(a, lda, b, ldb, c, ldc, m, k, alpha, beta); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_m8_f32(const float* a, u64 lda, const float* b, u64 ldb, float* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) { gemm_few_rows<float, 8>(a, lda, b, ldb, c, ldc, m, k, alpha, beta); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_m1_bf16(const bf16* a, u64 lda, const bf16* b, u64 ldb, bf16* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) { gemm_few_rows<bf16, 1>(a, lda, b, ldb, c, ldc, m, k, alpha, beta); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_m2_bf16(const bf16* a, u64 lda, const bf16* b, u64 ldb, bf16* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) { gemm_few_rows<bf16, 2>(a, lda, b, ldb, c, ldc, m, k, alpha, beta); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_m4_bf16(const bf16* a, u64 lda, const bf16* b, u64 ldb, bf16* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) { gemm_few_rows<bf16, 4>(a, lda, b, ldb, c, ldc, m, k, alpha, beta); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_m8_bf16(const bf16* a, u64 lda, const bf16* b, u64 ldb, bf16* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) { gemm_few_rows<bf16, 8>(a, lda, b, ldb, c, ldc, m, k, alpha, beta); }
