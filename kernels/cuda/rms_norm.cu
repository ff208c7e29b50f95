// Twin of kernels/src/rms_norm.rs: y = (x · rstd) · (offset + w), rstd = 1/√(mean(x²) + eps); offset 0 is Llama,
// 1 is Gemma. rstd is always f32 (a saved statistic). One block per row.
#include "common.cuh"

// x: [rows, dim], weight: [dim] → y: [rows, dim], rstd: [rows] f32. Grid: rows blocks.
template <typename T>
__device__ void rms_norm_forward(const T* x, const T* weight, T* y, float* rstd, unsigned dim, float eps, float offset) {
    const u64 row = blockIdx.x;
    const T* xr = x + row * dim;
    T* yr = y + row * dim;
    float sum_sq = 0.0f;
    for (unsigned j = threadIdx.x; j < dim; j += blockDim.x) {
        const float v = to_f32(xr[j]);
        sum_sq += v * v;
    }
    sum_sq = block_sum(sum_sq);
    const float r = 1.0f / sqrtf(sum_sq / static_cast<float>(dim) + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (unsigned j = threadIdx.x; j < dim; j += blockDim.x) yr[j] = from_f32<T>(to_f32(xr[j]) * r * (offset + to_f32(weight[j])));
}

// x, dy: [rows, dim], rstd: [rows] → dx: [rows, dim], dw_partial: [gridDim.x, dim] f32 (this block's Σ over its rows
// of dy ⊙ x·rstd). Block b takes rows [b·rows_per_block, (b+1)·rows_per_block). A column is always handled by the same
// thread, so each partial is private to one thread and summed in row order.
template <typename T>
__device__ void rms_norm_backward(const T* x, const T* weight, const float* rstd, const T* dy, T* dx, float* dw_partial,
                                  unsigned rows, unsigned dim, float offset, unsigned rows_per_block) {
    float* partial = dw_partial + static_cast<u64>(blockIdx.x) * dim;
    for (unsigned j = threadIdx.x; j < dim; j += blockDim.x) partial[j] = 0.0f;
    const unsigned first = blockIdx.x * rows_per_block;
    const unsigned last = min(rows, first + rows_per_block);
    const float n = static_cast<float>(dim);
    for (unsigned row = first; row < last; ++row) {
        const T* xr = x + static_cast<u64>(row) * dim;
        const T* dyr = dy + static_cast<u64>(row) * dim;
        T* dxr = dx + static_cast<u64>(row) * dim;
        const float r = rstd[row];
        // With g = dy ⊙ (offset + w): dx = rstd·(g − x·rstd²·Σ(g ⊙ x)/dim).
        float g_dot_x = 0.0f;
        for (unsigned j = threadIdx.x; j < dim; j += blockDim.x)
            g_dot_x += to_f32(dyr[j]) * (offset + to_f32(weight[j])) * to_f32(xr[j]);
        g_dot_x = block_sum(g_dot_x);
        const float c = g_dot_x * r * r / n;
        for (unsigned j = threadIdx.x; j < dim; j += blockDim.x) {
            const float xv = to_f32(xr[j]), dyv = to_f32(dyr[j]);
            dxr[j] = from_f32<T>(r * (dyv * (offset + to_f32(weight[j])) - xv * c));
            partial[j] += dyv * (xv * r);
        }
    }
}

// dw_partial: [blocks, dim] f32 → dw: [dim] = Σ over blocks in block order. One thread per column.
template <typename T> __device__ void rms_norm_dw_reduce(const float* dw_partial, T* dw, unsigned blocks, unsigned dim) {
    for (u64 j = thread_index(); j < dim; j += thread_count()) {
        float s = 0.0f;
        for (unsigned b = 0; b < blocks; ++b) s += dw_partial[static_cast<u64>(b) * dim + j];
        dw[j] = from_f32<T>(s);
    }
}

// qlora-rt: hot
extern "C" __global__ void rms_norm_forward_f32(const float* x, const float* weight, float* y, float* rstd, unsigned dim, float eps, float offset) {
    rms_norm_forward(x, weight, y, rstd, dim, eps, offset);
}
extern "C" __global__ void rms_norm_forward_bf16(const bf16* x, const bf16* weight, bf16* y, float* rstd, unsigned dim, float eps, float offset) {
    rms_norm_forward(x, weight, y, rstd, dim, eps, offset);
}

// qlora-rt: hot
extern "C" __global__ void rms_norm_backward_f32(const float* x, const float* weight, const float* rstd, const float* dy, float* dx,
                                                 float* dw_partial, unsigned rows, unsigned dim, float offset, unsigned rows_per_block) {
    rms_norm_backward(x, weight, rstd, dy, dx, dw_partial, rows, dim, offset, rows_per_block);
}
extern "C" __global__ void rms_norm_backward_bf16(const bf16* x, const bf16* weight, const float* rstd, const bf16* dy, bf16* dx,
                                                  float* dw_partial, unsigned rows, unsigned dim, float offset, unsigned rows_per_block) {
    rms_norm_backward(x, weight, rstd, dy, dx, dw_partial, rows, dim, offset, rows_per_block);
}

extern "C" __global__ void rms_norm_dw_reduce_f32(const float* dw_partial, float* dw, unsigned blocks, unsigned dim) {
    rms_norm_dw_reduce(dw_partial, dw, blocks, dim);
}
extern "C" __global__ void rms_norm_dw_reduce_bf16(const float* dw_partial, bf16* dw, unsigned blocks, unsigned dim) {
    rms_norm_dw_reduce(dw_partial, dw, blocks, dim);
}
