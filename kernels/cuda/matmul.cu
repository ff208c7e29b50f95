// Twin of the k == 0 / alpha == 0 path of kernels/src/matmul.rs, where A and B are not read and cuBLASLt, which
// wants k ≥ 1, is not called: C = beta·C per batch entry, zeros when beta == 0 (C is then never read, so NaN
// garbage in it cannot survive), and of its products with a few rows of A (`gemm_few_rows` below), A stored or an MLP's
// GLU or a row's RMS norm formed on the way (`glu_few_rows`: twin of activation.rs glu_forward, then matmul;
// `norm_few_rows`: of rms_norm.rs's forward, then matmul). The other products go through cuBLASLt
// (kernels/src/cuda/matmul.rs).
#include "common.cuh"
#include "activation.cuh"
#include "rms_norm.cuh"

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
// A's rows come from a source (`StoredRows`; `GluRows`: an MLP's GLU formed on the way, decoding's U = x·Aᵀ of
// down_proj's adapter, which then needs no GLU launch of its own; `NormRows`: the norm before q/k/v or gate/up formed
// on the way, for their adapters' U, which then needs no norm launch of its own).
constexpr unsigned GEMM_FEW_ROWS_WARPS = 16;

// A as stored: 8 values of row min(r, m - 1) from column i.
template <typename T> struct StoredRows {
    const T* __restrict__ a;
    u64 lda;
    __device__ __forceinline__ void prepare(unsigned, unsigned) {}
    __device__ __forceinline__ void row8(unsigned r, unsigned m, unsigned i, float (&v)[8]) const {
        load8_f32(a + min(r, m - 1) * lda + i, v);
    }
};

// A = act(gate) ⊙ up (gate, up, x: [m, k] packed), each value rounded to T as glu_forward stores it. The block
// whose index is the 8-value chunk's index modulo the grid also writes the chunk of the m real rows to x, so every
// element of x is written exactly once.
template <Act ACT, typename T> struct GluRows {
    const T* __restrict__ gate;
    const T* __restrict__ up;
    T* __restrict__ x;
    u64 k;
    __device__ __forceinline__ void prepare(unsigned, unsigned) {}
    __device__ __forceinline__ void row8(unsigned r, unsigned m, unsigned i, float (&v)[8]) const {
        const u64 at = min(r, m - 1) * k + i;
        float g[8], u[8];
        load8_f32(gate + at, g);
        load8_f32(up + at, u);
#pragma unroll
        for (unsigned e = 0; e < 8; ++e) v[e] = to_f32(from_f32<T>(glu_value<ACT>(g[e], u[e])));
        if (r < m && (i / 8) % gridDim.x == blockIdx.x) store8(x + at, v);
    }
};

// A = rms_norm(x [+ residual]) · (offset + weight) ([m, k] packed), rms_norm_forward_rows' values bit for bit while
// k ≤ 8·blockDim (the launcher's condition): each thread's share of a row's Σ x² is then its one chunk, as in the
// norm kernel's block of k/8 threads, and block_sum's tree over the extra warps adds zeros. `prepare` sums every row
// first; `row8` forms a chunk again where the product reads it. The block whose index is the chunk's index modulo the
// grid writes the m real rows' chunk of y and, with ADD, of h = x + residual (the residual stream, rounded to T).
template <bool ADD, typename T, unsigned M> struct NormRows {
    const T* __restrict__ x;
    const T* __restrict__ residual;
    const T* __restrict__ weight;
    T* __restrict__ h;
    T* __restrict__ y;
    u64 k;
    float eps, offset;
    float rstd[M];
    __device__ __forceinline__ void input8(unsigned r, unsigned m, unsigned i, float (&v)[8]) const {
        const u64 at = min(r, m - 1) * k + i;
        load8_f32(x + at, v);
        if (ADD) {
            float res[8];
            load8_f32(residual + at, res);
#pragma unroll
            for (unsigned e = 0; e < 8; ++e) v[e] = rounded<T>(v[e] + res[e]);
        }
    }
    __device__ __forceinline__ void prepare(unsigned m, unsigned) {
        const unsigned c = 8 * threadIdx.x;
#pragma unroll
        for (unsigned r = 0; r < M; ++r) {
            float v[8];
            float s = 0.0f;
            if (c < k) {
                input8(r, m, c, v);
                s = sum_sq8(v);
            }
            rstd[r] = rms_rstd(block_sum(s), static_cast<unsigned>(k), eps);
        }
    }
    __device__ __forceinline__ void row8(unsigned r, unsigned m, unsigned i, float (&v)[8]) const {
        float in[8], w_off[8];
        input8(r, m, i, in);
        load8_f32(weight + i, w_off);
#pragma unroll
        for (unsigned e = 0; e < 8; ++e) w_off[e] = offset + w_off[e];
        rms_scale8(in, rstd[r], w_off, v);
#pragma unroll
        for (unsigned e = 0; e < 8; ++e) v[e] = rounded<T>(v[e]);
        if (r < m && (i / 8) % gridDim.x == blockIdx.x) {
            const u64 at = static_cast<u64>(r) * k + i;
            if (ADD) store8(h + at, in);
            store8(y + at, v);
        }
    }
};

template <unsigned M, typename R>
__device__ __forceinline__ void few_rows_fma(const R& rows, unsigned m, unsigned i, const float (&bv)[8],
                                             float (&acc)[M]) {
#pragma unroll
    for (unsigned r = 0; r < M; ++r) {
        float av[8];
        rows.row8(r, m, i, av);
#pragma unroll
        for (unsigned e = 0; e < 8; ++e) acc[r] = fmaf(av[e], bv[e], acc[r]);
    }
}

template <typename T, unsigned M, typename R>
__device__ void gemm_few_rows(R rows, const T* __restrict__ b, u64 ldb, T* c, u64 ldc, unsigned m, unsigned k,
                              float alpha, float beta) {
    __shared__ float partial[GEMM_FEW_ROWS_WARPS][M];
    grid_dependency_sync();
    rows.prepare(m, k);
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
                few_rows_fma<M>(rows, m, i0 + u * stride, bv, acc);
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

// x[, residual]: [m, k], weight: [k] → [h = x + residual,] y = rms_norm(h or x)·(offset + weight) ([m, k] each,
// rms_norm_forward_rows' values) and c = y·Bᵀ ([m, n], ldc = n), B [n, k]: gemm_few_rows over NormRows, alpha 1,
// beta 0. k ≤ 8·blockDim.
template <bool ADD, typename T, unsigned M>
__device__ void norm_few_rows(const T* x, const T* residual, const T* weight, T* h, T* y, const T* b, T* c, unsigned m,
                              unsigned n, unsigned k, float eps, float offset) {
    NormRows<ADD, T, M> rows{x, residual, weight, h, y, k, eps, offset, {}};
    gemm_few_rows<T, M>(rows, b, k, c, n, m, k, 1.0f, 0.0f);
}

// gate, up: [m, k] → x = act(gate) ⊙ up ([m, k], glu_forward's values) and c = x·Bᵀ ([m, n], ldc = n), B [n, k]:
// gemm_few_rows over GluRows, alpha 1, beta 0.
template <Act ACT, typename T, unsigned M>
__device__ void glu_few_rows(const T* gate, const T* up, T* x, const T* b, T* c, unsigned m, unsigned n, unsigned k) {
    gemm_few_rows<T, M>(GluRows<ACT, T>{gate, up, x, k}, b, k, c, n, m, k, 1.0f, 0.0f);
}

extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_m1_f32(const float* a, u64 lda, const float* b, u64 ldb, float* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) { gemm_few_rows<float, 1>(StoredRows<float>{a, lda}, b, ldb, c, ldc, m, k, alpha, beta); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_m2_f32(const float* a, u64 lda, const float* b, u64 ldb, float* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) { gemm_few_rows<float, 2>(StoredRows<float>{a, lda}, b, ldb, c, ldc, m, k, alpha, beta); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_m4_f32(const float* a, u64 lda, const float* b, u64 ldb, float* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) { gemm_few_rows<float, 4>(StoredRows<float>{a, lda}, b, ldb, c, ldc, m, k, alpha, beta); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_m8_f32(const float* a, u64 lda, const float* b, u64 ldb, float* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) { gemm_few_rows<float, 8>(StoredRows<float>{a, lda}, b, ldb, c, ldc, m, k, alpha, beta); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_m1_bf16(const bf16* a, u64 lda, const bf16* b, u64 ldb, bf16* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) { gemm_few_rows<bf16, 1>(StoredRows<bf16>{a, lda}, b, ldb, c, ldc, m, k, alpha, beta); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_m2_bf16(const bf16* a, u64 lda, const bf16* b, u64 ldb, bf16* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) { gemm_few_rows<bf16, 2>(StoredRows<bf16>{a, lda}, b, ldb, c, ldc, m, k, alpha, beta); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_m4_bf16(const bf16* a, u64 lda, const bf16* b, u64 ldb, bf16* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) { gemm_few_rows<bf16, 4>(StoredRows<bf16>{a, lda}, b, ldb, c, ldc, m, k, alpha, beta); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) gemm_few_rows_m8_bf16(const bf16* a, u64 lda, const bf16* b, u64 ldb, bf16* c, u64 ldc, unsigned m, unsigned k, float alpha, float beta) { gemm_few_rows<bf16, 8>(StoredRows<bf16>{a, lda}, b, ldb, c, ldc, m, k, alpha, beta); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) swiglu_few_rows_m1_f32(const float* gate, const float* up, float* x, const float* b, float* c, unsigned m, unsigned n, unsigned k) { glu_few_rows<SILU, float, 1>(gate, up, x, b, c, m, n, k); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) swiglu_few_rows_m2_f32(const float* gate, const float* up, float* x, const float* b, float* c, unsigned m, unsigned n, unsigned k) { glu_few_rows<SILU, float, 2>(gate, up, x, b, c, m, n, k); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) swiglu_few_rows_m4_f32(const float* gate, const float* up, float* x, const float* b, float* c, unsigned m, unsigned n, unsigned k) { glu_few_rows<SILU, float, 4>(gate, up, x, b, c, m, n, k); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) swiglu_few_rows_m8_f32(const float* gate, const float* up, float* x, const float* b, float* c, unsigned m, unsigned n, unsigned k) { glu_few_rows<SILU, float, 8>(gate, up, x, b, c, m, n, k); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) swiglu_few_rows_m1_bf16(const bf16* gate, const bf16* up, bf16* x, const bf16* b, bf16* c, unsigned m, unsigned n, unsigned k) { glu_few_rows<SILU, bf16, 1>(gate, up, x, b, c, m, n, k); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) swiglu_few_rows_m2_bf16(const bf16* gate, const bf16* up, bf16* x, const bf16* b, bf16* c, unsigned m, unsigned n, unsigned k) { glu_few_rows<SILU, bf16, 2>(gate, up, x, b, c, m, n, k); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) swiglu_few_rows_m4_bf16(const bf16* gate, const bf16* up, bf16* x, const bf16* b, bf16* c, unsigned m, unsigned n, unsigned k) { glu_few_rows<SILU, bf16, 4>(gate, up, x, b, c, m, n, k); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) swiglu_few_rows_m8_bf16(const bf16* gate, const bf16* up, bf16* x, const bf16* b, bf16* c, unsigned m, unsigned n, unsigned k) { glu_few_rows<SILU, bf16, 8>(gate, up, x, b, c, m, n, k); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) geglu_few_rows_m1_f32(const float* gate, const float* up, float* x, const float* b, float* c, unsigned m, unsigned n, unsigned k) { glu_few_rows<GELU_TANH, float, 1>(gate, up, x, b, c, m, n, k); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) geglu_few_rows_m2_f32(const float* gate, const float* up, float* x, const float* b, float* c, unsigned m, unsigned n, unsigned k) { glu_few_rows<GELU_TANH, float, 2>(gate, up, x, b, c, m, n, k); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) geglu_few_rows_m4_f32(const float* gate, const float* up, float* x, const float* b, float* c, unsigned m, unsigned n, unsigned k) { glu_few_rows<GELU_TANH, float, 4>(gate, up, x, b, c, m, n, k); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) geglu_few_rows_m8_f32(const float* gate, const float* up, float* x, const float* b, float* c, unsigned m, unsigned n, unsigned k) { glu_few_rows<GELU_TANH, float, 8>(gate, up, x, b, c, m, n, k); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) geglu_few_rows_m1_bf16(const bf16* gate, const bf16* up, bf16* x, const bf16* b, bf16* c, unsigned m, unsigned n, unsigned k) { glu_few_rows<GELU_TANH, bf16, 1>(gate, up, x, b, c, m, n, k); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) geglu_few_rows_m2_bf16(const bf16* gate, const bf16* up, bf16* x, const bf16* b, bf16* c, unsigned m, unsigned n, unsigned k) { glu_few_rows<GELU_TANH, bf16, 2>(gate, up, x, b, c, m, n, k); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) geglu_few_rows_m4_bf16(const bf16* gate, const bf16* up, bf16* x, const bf16* b, bf16* c, unsigned m, unsigned n, unsigned k) { glu_few_rows<GELU_TANH, bf16, 4>(gate, up, x, b, c, m, n, k); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) geglu_few_rows_m8_bf16(const bf16* gate, const bf16* up, bf16* x, const bf16* b, bf16* c, unsigned m, unsigned n, unsigned k) { glu_few_rows<GELU_TANH, bf16, 8>(gate, up, x, b, c, m, n, k); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) rms_norm_few_rows_m1_f32(const float* x, const float* residual, const float* weight, float* h, float* y, const float* b, float* c, unsigned m, unsigned n, unsigned k, float eps, float offset) { norm_few_rows<false, float, 1>(x, residual, weight, h, y, b, c, m, n, k, eps, offset); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) rms_norm_few_rows_m2_f32(const float* x, const float* residual, const float* weight, float* h, float* y, const float* b, float* c, unsigned m, unsigned n, unsigned k, float eps, float offset) { norm_few_rows<false, float, 2>(x, residual, weight, h, y, b, c, m, n, k, eps, offset); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) rms_norm_few_rows_m4_f32(const float* x, const float* residual, const float* weight, float* h, float* y, const float* b, float* c, unsigned m, unsigned n, unsigned k, float eps, float offset) { norm_few_rows<false, float, 4>(x, residual, weight, h, y, b, c, m, n, k, eps, offset); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) rms_norm_few_rows_m8_f32(const float* x, const float* residual, const float* weight, float* h, float* y, const float* b, float* c, unsigned m, unsigned n, unsigned k, float eps, float offset) { norm_few_rows<false, float, 8>(x, residual, weight, h, y, b, c, m, n, k, eps, offset); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) rms_norm_few_rows_m1_bf16(const bf16* x, const bf16* residual, const bf16* weight, bf16* h, bf16* y, const bf16* b, bf16* c, unsigned m, unsigned n, unsigned k, float eps, float offset) { norm_few_rows<false, bf16, 1>(x, residual, weight, h, y, b, c, m, n, k, eps, offset); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) rms_norm_few_rows_m2_bf16(const bf16* x, const bf16* residual, const bf16* weight, bf16* h, bf16* y, const bf16* b, bf16* c, unsigned m, unsigned n, unsigned k, float eps, float offset) { norm_few_rows<false, bf16, 2>(x, residual, weight, h, y, b, c, m, n, k, eps, offset); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) rms_norm_few_rows_m4_bf16(const bf16* x, const bf16* residual, const bf16* weight, bf16* h, bf16* y, const bf16* b, bf16* c, unsigned m, unsigned n, unsigned k, float eps, float offset) { norm_few_rows<false, bf16, 4>(x, residual, weight, h, y, b, c, m, n, k, eps, offset); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) rms_norm_few_rows_m8_bf16(const bf16* x, const bf16* residual, const bf16* weight, bf16* h, bf16* y, const bf16* b, bf16* c, unsigned m, unsigned n, unsigned k, float eps, float offset) { norm_few_rows<false, bf16, 8>(x, residual, weight, h, y, b, c, m, n, k, eps, offset); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) add_rms_norm_few_rows_m1_f32(const float* x, const float* residual, const float* weight, float* h, float* y, const float* b, float* c, unsigned m, unsigned n, unsigned k, float eps, float offset) { norm_few_rows<true, float, 1>(x, residual, weight, h, y, b, c, m, n, k, eps, offset); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) add_rms_norm_few_rows_m2_f32(const float* x, const float* residual, const float* weight, float* h, float* y, const float* b, float* c, unsigned m, unsigned n, unsigned k, float eps, float offset) { norm_few_rows<true, float, 2>(x, residual, weight, h, y, b, c, m, n, k, eps, offset); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) add_rms_norm_few_rows_m4_f32(const float* x, const float* residual, const float* weight, float* h, float* y, const float* b, float* c, unsigned m, unsigned n, unsigned k, float eps, float offset) { norm_few_rows<true, float, 4>(x, residual, weight, h, y, b, c, m, n, k, eps, offset); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) add_rms_norm_few_rows_m8_f32(const float* x, const float* residual, const float* weight, float* h, float* y, const float* b, float* c, unsigned m, unsigned n, unsigned k, float eps, float offset) { norm_few_rows<true, float, 8>(x, residual, weight, h, y, b, c, m, n, k, eps, offset); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) add_rms_norm_few_rows_m1_bf16(const bf16* x, const bf16* residual, const bf16* weight, bf16* h, bf16* y, const bf16* b, bf16* c, unsigned m, unsigned n, unsigned k, float eps, float offset) { norm_few_rows<true, bf16, 1>(x, residual, weight, h, y, b, c, m, n, k, eps, offset); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) add_rms_norm_few_rows_m2_bf16(const bf16* x, const bf16* residual, const bf16* weight, bf16* h, bf16* y, const bf16* b, bf16* c, unsigned m, unsigned n, unsigned k, float eps, float offset) { norm_few_rows<true, bf16, 2>(x, residual, weight, h, y, b, c, m, n, k, eps, offset); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) add_rms_norm_few_rows_m4_bf16(const bf16* x, const bf16* residual, const bf16* weight, bf16* h, bf16* y, const bf16* b, bf16* c, unsigned m, unsigned n, unsigned k, float eps, float offset) { norm_few_rows<true, bf16, 4>(x, residual, weight, h, y, b, c, m, n, k, eps, offset); }
extern "C" __global__ void __launch_bounds__(32 * GEMM_FEW_ROWS_WARPS) add_rms_norm_few_rows_m8_bf16(const bf16* x, const bf16* residual, const bf16* weight, bf16* h, bf16* y, const bf16* b, bf16* c, unsigned m, unsigned n, unsigned k, float eps, float offset) { norm_few_rows<true, bf16, 8>(x, residual, weight, h, y, b, c, m, n, k, eps, offset); }
