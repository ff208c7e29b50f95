// Twin of kernels/src/dora.rs: DoRA's row norms, magnitude ratio, row/column scaling and combined output. Arithmetic
// in f32 except the norms' sums of squares, which accumulate in f64 as the CPU twin does (a weight row is up to
// 14336 wide); one rounding to the output type.
#include "common.cuh"

// Sum over the block in f64, returned to thread 0 (the only reader). A fixed tree for a fixed block size.
__device__ double block_sum_f64(double v) {
    __shared__ double partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.0;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

// t: [rows, cols] → out: [rows], one block per row (grid-stride over rows past the grid).
template <typename T> __device__ void row_norms(const T* t, T* out, unsigned rows, unsigned cols) {
    for (unsigned r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* row = t + static_cast<u64>(r) * cols;
        double acc = 0.0;
        for (unsigned c = threadIdx.x; c < cols; c += blockDim.x) {
            const double v = to_f32(row[c]);
            acc += v * v;
        }
        acc = block_sum_f64(acc);
        if (threadIdx.x == 0) out[r] = from_f32<T>(static_cast<float>(sqrt(acc)));
        __syncthreads();
    }
}

// out = a / b, n elements.
template <typename T> __device__ void ratio(const T* a, const T* b, T* out, u64 n) {
    for (u64 i = thread_index(); i < n; i += thread_count()) out[i] = from_f32<T>(to_f32(a[i]) / to_f32(b[i]));
}

// t: [rows, cols] → out_ij = t_ij·(c_k + offset), k = i when by_rows, else j.
template <typename T>
__device__ void scale_by(const T* t, const T* c, T* out, u64 rows, unsigned cols, float offset, int by_rows) {
    const u64 n = rows * cols;
    for (u64 i = thread_index(); i < n; i += thread_count()) {
        const u64 k = by_rows ? i / cols : i % cols;
        out[i] = from_f32<T>(to_f32(t[i]) * (to_f32(c[k]) + offset));
    }
}

// z, zd, sv: [rows, cols], g: [cols] → y = z + (g − 1)·zd + g·sv, and h = zd + sv unless h is null.
template <typename T>
__device__ void combine(const T* z, const T* zd, const T* sv, const T* g, T* y, T* h, u64 rows, unsigned cols) {
    const u64 n = rows * cols;
    for (u64 i = thread_index(); i < n; i += thread_count()) {
        const float gj = to_f32(g[i % cols]), a = to_f32(zd[i]), b = to_f32(sv[i]);
        y[i] = from_f32<T>(to_f32(z[i]) + (gj - 1.0f) * a + gj * b);
        if (h) h[i] = from_f32<T>(a + b);
    }
}

extern "C" __global__ void dora_row_norms_f32(const float* t, float* out, unsigned rows, unsigned cols) { row_norms(t, out, rows, cols); }
extern "C" __global__ void dora_row_norms_bf16(const bf16* t, bf16* out, unsigned rows, unsigned cols) { row_norms(t, out, rows, cols); }
extern "C" __global__ void dora_ratio_f32(const float* a, const float* b, float* out, u64 n) { ratio(a, b, out, n); }
extern "C" __global__ void dora_ratio_bf16(const bf16* a, const bf16* b, bf16* out, u64 n) { ratio(a, b, out, n); }
extern "C" __global__ void dora_scale_by_f32(const float* t, const float* c, float* out, u64 rows, unsigned cols, float offset, int by_rows) { scale_by(t, c, out, rows, cols, offset, by_rows); }
extern "C" __global__ void dora_scale_by_bf16(const bf16* t, const bf16* c, bf16* out, u64 rows, unsigned cols, float offset, int by_rows) { scale_by(t, c, out, rows, cols, offset, by_rows); }
extern "C" __global__ void dora_combine_f32(const float* z, const float* zd, const float* sv, const float* g, float* y, float* h, u64 rows, unsigned cols) { combine(z, zd, sv, g, y, h, rows, cols); }
extern "C" __global__ void dora_combine_bf16(const bf16* z, const bf16* zd, const bf16* sv, const bf16* g, bf16* y, bf16* h, u64 rows, unsigned cols) { combine(z, zd, sv, g, y, h, rows, cols); }
