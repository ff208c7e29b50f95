// Twin of kernels/src/rms_norm.rs: y = (x · rstd) · (offset + w), rstd = 1/√(mean(x²) + eps); offset 0 is Llama,
// 1 is Gemma. rstd is always f32 (a saved statistic). The fused variants add a residual first (h = x + residual,
// rounded to T, is written and normalized) and, backward, add the residual stream's gradient to dx.
//
// Vector path (rows of 8k ≤ 8192 elements, so every row start is 16-byte aligned): a block of ⌈dim/8⌉ threads,
// rounded up to a warp, owns a step of G rows at a time (two of bf16, one of f32: the same bytes) and thread t owns
// their elements [8t, 8t + 8), loaded with 16-byte accesses (common.cuh Raw8). A row must be summed before anything
// of it is written, so a block loads its next step into registers before it reduces the current one: the launcher
// sizes the grid so that these prefetches keep the bytes the GPU needs in flight (kernels/NOTES.md). Scalar path (any
// other row length): one block per row, each element read twice.
#include "common.cuh"
#include "rms_norm.cuh"

// The vector path's block sums for G rows at once (one pair of barriers).
template <unsigned G> __device__ __forceinline__ void block_sum_rows(float (&v)[G]);
template <> __device__ __forceinline__ void block_sum_rows<1>(float (&v)[1]) { v[0] = block_sum(v[0]); }
template <> __device__ __forceinline__ void block_sum_rows<2>(float (&v)[2]) {
    const float2 s = block_sum2(make_float2(v[0], v[1]));
    v[0] = s.x;
    v[1] = s.y;
}

// x[, residual]: [rows, dim], weight: [dim] → [h: [rows, dim],] y: [rows, dim], rstd: [rows] f32. Vector path,
// G rows per step, grid-stride over steps (block b takes rows G·b … G·b + G − 1, then G·(b + gridDim.x) …).
template <bool ADD, unsigned G, typename T>
__device__ void rms_norm_forward_rows(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ weight,
                                      T* __restrict__ h, T* __restrict__ y, float* __restrict__ rstd, unsigned rows,
                                      unsigned dim, float eps, float offset) {
    grid_dependency_sync();
    const unsigned c = threadIdx.x * 8;
    const bool own = c < dim;
    float w[8] = {};
    if (own) {
        load8_f32(weight + c, w);
#pragma unroll
        for (int k = 0; k < 8; ++k) w[k] = offset + w[k];
    }
    // Threads past the row keep zeros, which add nothing to the sums.
    Raw8<T> next_x[G] = {}, next_r[G] = {};
    const unsigned step = G * gridDim.x;
    unsigned first = G * blockIdx.x;
#pragma unroll
    for (unsigned g = 0; g < G; ++g) {
        if (own && first + g < rows) {
            next_x[g] = load8(x + static_cast<u64>(first + g) * dim + c);
            if (ADD) next_r[g] = load8(residual + static_cast<u64>(first + g) * dim + c);
        }
    }
    for (; first < rows; first += step) {
        float v[G][8], sum_sq[G];
#pragma unroll
        for (unsigned g = 0; g < G; ++g) {
            unpack8(next_x[g], v[g]);
            if (ADD) {
                float r[8];
                unpack8(next_r[g], r);
#pragma unroll
                for (int k = 0; k < 8; ++k) v[g][k] = rounded<T>(v[g][k] + r[k]);
            }
        }
#pragma unroll
        for (unsigned g = 0; g < G; ++g) {
            const unsigned after = first + step + g;
            if (own && after < rows) {
                next_x[g] = load8(x + static_cast<u64>(after) * dim + c);
                if (ADD) next_r[g] = load8(residual + static_cast<u64>(after) * dim + c);
            }
        }
#pragma unroll
        for (unsigned g = 0; g < G; ++g) sum_sq[g] = sum_sq8(v[g]);
        block_sum_rows<G>(sum_sq);
#pragma unroll
        for (unsigned g = 0; g < G; ++g) {
            const unsigned row = first + g;
            if (row >= rows) break;
            const float r = rms_rstd(sum_sq[g], dim, eps);
            if (threadIdx.x == 0) rstd[row] = r;
            if (own) {
                const u64 at = static_cast<u64>(row) * dim + c;
                if (ADD) store8(h + at, v[g]);
                float out[8];
                rms_scale8(v[g], r, w, out);
                store8(y + at, out);
            }
        }
    }
}

// x (fused: h), dy[, d_residual]: [rows, dim], rstd: [rows] → dx: [rows, dim] (fused: + d_residual),
// dw_partial: [gridDim.x, dim] f32 (this block's Σ over its rows of dy ⊙ x·rstd, in row order; null when the weight
// is frozen and dw not wanted). Vector path, G rows per step; block b takes rows [b·rows_per_block,
// (b+1)·rows_per_block), so dw's bits depend on the launch's shape only.
template <bool ADD, unsigned G, typename T>
__device__ void rms_norm_backward_rows(const T* __restrict__ x, const T* __restrict__ weight, const float* __restrict__ rstd,
                                       const T* __restrict__ dy, const T* __restrict__ d_residual, T* __restrict__ dx,
                                       float* __restrict__ dw_partial, unsigned rows, unsigned dim, float offset,
                                       unsigned rows_per_block) {
    grid_dependency_sync();
    const unsigned c = threadIdx.x * 8;
    const bool own = c < dim;
    float w[8] = {}, acc[8] = {};
    if (own) {
        load8_f32(weight + c, w);
#pragma unroll
        for (int k = 0; k < 8; ++k) w[k] = offset + w[k];
    }
    const unsigned first = blockIdx.x * rows_per_block, last = min(rows, first + rows_per_block);
    const float n = static_cast<float>(dim);
    Raw8<T> next_x[G] = {}, next_dy[G] = {};
    float next_rstd[G] = {};
#pragma unroll
    for (unsigned g = 0; g < G; ++g) {
        if (first + g < last) {
            next_rstd[g] = rstd[first + g];
            if (own) {
                const u64 at = static_cast<u64>(first + g) * dim + c;
                next_x[g] = load8(x + at);
                next_dy[g] = load8(dy + at);
            }
        }
    }
    for (unsigned row = first; row < last; row += G) {
        // The current rows stay packed across the reduction (unpacked twice): fewer registers, more blocks.
        Raw8<T> cx[G], cdy[G];
        float r[G], dot[G];
#pragma unroll
        for (unsigned g = 0; g < G; ++g) {
            cx[g] = next_x[g];
            cdy[g] = next_dy[g];
            r[g] = next_rstd[g];
        }
#pragma unroll
        for (unsigned g = 0; g < G; ++g) {
            const unsigned after = row + G + g;
            if (after < last) {
                next_rstd[g] = rstd[after];
                if (own) {
                    const u64 at = static_cast<u64>(after) * dim + c;
                    next_x[g] = load8(x + at);
                    next_dy[g] = load8(dy + at);
                }
            }
        }
        // With g = dy ⊙ (offset + w): dx = rstd·(g − x·rstd²·Σ(g ⊙ x)/dim).
#pragma unroll
        for (unsigned g = 0; g < G; ++g) {
            float xv[8], dyv[8];
            unpack8(cx[g], xv);
            unpack8(cdy[g], dyv);
            dot[g] = 0.0f;
#pragma unroll
            for (int k = 0; k < 8; ++k) dot[g] += dyv[k] * w[k] * xv[k];
        }
        block_sum_rows<G>(dot);
        // The residual's gradient is needed only here: loaded now rather than a step ahead, which would take the
        // registers of another row in flight.
        Raw8<T> dr[G] = {};
        if (ADD && own) {
#pragma unroll
            for (unsigned g = 0; g < G; ++g)
                if (row + g < last) dr[g] = load8(d_residual + static_cast<u64>(row + g) * dim + c);
        }
#pragma unroll
        for (unsigned g = 0; g < G; ++g) {
            if (!own || row + g >= last) continue;
            const float cg = dot[g] * r[g] * r[g] / n;
            float xv[8], dyv[8], out[8];
            unpack8(cx[g], xv);
            unpack8(cdy[g], dyv);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                out[k] = r[g] * (dyv[k] * w[k] - xv[k] * cg);
                if (dw_partial) acc[k] += dyv[k] * (xv[k] * r[g]);
            }
            if (ADD) {
                float d[8];
                unpack8(dr[g], d);
#pragma unroll
                for (int k = 0; k < 8; ++k) out[k] = d[k] + out[k];
            }
            store8(dx + static_cast<u64>(row + g) * dim + c, out);
        }
    }
    if (own && dw_partial) store8(dw_partial + static_cast<u64>(blockIdx.x) * dim + c, acc);
}

// Scalar path of the forward: one block per row.
template <bool ADD, typename T>
__device__ void rms_norm_forward_scalar(const T* x, const T* residual, const T* weight, T* h, T* y, float* rstd, unsigned dim,
                                        float eps, float offset) {
    grid_dependency_sync();
    const u64 row = blockIdx.x;
    const T* xr = x + row * dim;
    const T* rr = residual + row * dim;
    T* hr = h + row * dim;
    T* yr = y + row * dim;
    // The input as normalized: x, or h = x + residual rounded to T (written here, read back below).
    auto input = [&](unsigned j) { return ADD ? rounded<T>(to_f32(xr[j]) + to_f32(rr[j])) : to_f32(xr[j]); };
    float sum_sq = 0.0f;
    for (unsigned j = threadIdx.x; j < dim; j += blockDim.x) {
        const float v = input(j);
        sum_sq += v * v;
    }
    sum_sq = block_sum(sum_sq);
    const float r = rms_rstd(sum_sq, dim, eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (unsigned j = threadIdx.x; j < dim; j += blockDim.x) {
        const float v = input(j);
        if (ADD) hr[j] = from_f32<T>(v);
        yr[j] = from_f32<T>(v * r * (offset + to_f32(weight[j])));
    }
}

// Scalar path of the backward: blocks of rows as in the vector path, a column always handled by the same thread.
template <bool ADD, typename T>
__device__ void rms_norm_backward_scalar(const T* x, const T* weight, const float* rstd, const T* dy, const T* d_residual, T* dx,
                                         float* dw_partial, unsigned rows, unsigned dim, float offset, unsigned rows_per_block) {
    grid_dependency_sync();
    float* partial = dw_partial ? dw_partial + static_cast<u64>(blockIdx.x) * dim : nullptr;
    if (partial)
        for (unsigned j = threadIdx.x; j < dim; j += blockDim.x) partial[j] = 0.0f;
    const unsigned first = blockIdx.x * rows_per_block;
    const unsigned last = min(rows, first + rows_per_block);
    const float n = static_cast<float>(dim);
    for (unsigned row = first; row < last; ++row) {
        const u64 at = static_cast<u64>(row) * dim;
        const float r = rstd[row];
        float g_dot_x = 0.0f;
        for (unsigned j = threadIdx.x; j < dim; j += blockDim.x)
            g_dot_x += to_f32(dy[at + j]) * (offset + to_f32(weight[j])) * to_f32(x[at + j]);
        g_dot_x = block_sum(g_dot_x);
        const float c = g_dot_x * r * r / n;
        for (unsigned j = threadIdx.x; j < dim; j += blockDim.x) {
            const float xv = to_f32(x[at + j]), dyv = to_f32(dy[at + j]);
            const float d = r * (dyv * (offset + to_f32(weight[j])) - xv * c);
            dx[at + j] = from_f32<T>(ADD ? to_f32(d_residual[at + j]) + d : d);
            if (partial) partial[j] += dyv * (xv * r);
        }
    }
}

// dw_partial: [blocks, dim] f32 → dw: [dim], in a fixed order: warp w of a block of 1024 threads sums partials w,
// w + 32, … of its block's 32 columns, then the 32 warp sums are added in warp order. Grid: ⌈dim/32⌉ blocks.
template <typename T> __device__ void rms_norm_dw_reduce(const float* __restrict__ dw_partial, T* __restrict__ dw, unsigned blocks, unsigned dim) {
    __shared__ float sums[32][33];
    grid_dependency_sync();
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, col = blockIdx.x * 32 + lane;
    float s = 0.0f;
    if (col < dim) {
        // The launchers' partials are about 8 per warp (a wave of backward blocks): all their loads in flight at once,
        // then added in order.
        for (unsigned first = warp; first < blocks; first += 32 * 8) {
            float v[8];
#pragma unroll
            for (unsigned u = 0; u < 8; ++u) {
                const unsigned b = first + 32 * u;
                v[u] = b < blocks ? dw_partial[static_cast<u64>(b) * dim + col] : 0.0f;
            }
#pragma unroll
            for (unsigned u = 0; u < 8; ++u) s += v[u];
        }
    }
    sums[warp][lane] = s;
    __syncthreads();
    if (warp == 0 && col < dim) {
        float t = 0.0f;
        for (unsigned w = 0; w < 32; ++w) t += sums[w][lane];
        dw[col] = from_f32<T>(t);
    }
}

// qlora-rt: hot
extern "C" __global__ void __launch_bounds__(1024) rms_norm_forward_f32(const float* x, const float* weight, float* y, float* rstd, unsigned rows, unsigned dim, float eps, float offset) {
    rms_norm_forward_rows<false, 1>(x, x, weight, y, y, rstd, rows, dim, eps, offset);
}
extern "C" __global__ void __launch_bounds__(1024) rms_norm_forward_bf16(const bf16* x, const bf16* weight, bf16* y, float* rstd, unsigned rows, unsigned dim, float eps, float offset) {
    rms_norm_forward_rows<false, 2>(x, x, weight, y, y, rstd, rows, dim, eps, offset);
}
extern "C" __global__ void __launch_bounds__(512) rms_norm_backward_f32(const float* x, const float* weight, const float* rstd, const float* dy, float* dx,
                                                                        float* dw_partial, unsigned rows, unsigned dim, float offset, unsigned rows_per_block) {
    rms_norm_backward_rows<false, 1>(x, weight, rstd, dy, dy, dx, dw_partial, rows, dim, offset, rows_per_block);
}
extern "C" __global__ void __launch_bounds__(512) rms_norm_backward_bf16(const bf16* x, const bf16* weight, const float* rstd, const bf16* dy, bf16* dx,
                                                                         float* dw_partial, unsigned rows, unsigned dim, float offset, unsigned rows_per_block) {
    rms_norm_backward_rows<false, 2>(x, weight, rstd, dy, dy, dx, dw_partial, rows, dim, offset, rows_per_block);
}
// bf16 rows of more than 512 threads (4096 < dim ≤ 8192): one row per step, so that 1024 threads fit the registers.
extern "C" __global__ void __launch_bounds__(1024) rms_norm_backward_wide_bf16(const bf16* x, const bf16* weight, const float* rstd, const bf16* dy, bf16* dx,
                                                                               float* dw_partial, unsigned rows, unsigned dim, float offset, unsigned rows_per_block) {
    rms_norm_backward_rows<false, 1>(x, weight, rstd, dy, dy, dx, dw_partial, rows, dim, offset, rows_per_block);
}

// qlora-rt: hot
extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_forward_f32(const float* x, const float* residual, const float* weight, float* h, float* y, float* rstd,
                                                                            unsigned rows, unsigned dim, float eps, float offset) {
    rms_norm_forward_rows<true, 1>(x, residual, weight, h, y, rstd, rows, dim, eps, offset);
}
extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_forward_bf16(const bf16* x, const bf16* residual, const bf16* weight, bf16* h, bf16* y, float* rstd,
                                                                             unsigned rows, unsigned dim, float eps, float offset) {
    rms_norm_forward_rows<true, 2>(x, residual, weight, h, y, rstd, rows, dim, eps, offset);
}
extern "C" __global__ void __launch_bounds__(512) add_rms_norm_backward_f32(const float* h, const float* weight, const float* rstd, const float* dy, const float* d_residual,
                                                                            float* dx, float* dw_partial, unsigned rows, unsigned dim, float offset,
                                                                            unsigned rows_per_block) {
    rms_norm_backward_rows<true, 1>(h, weight, rstd, dy, d_residual, dx, dw_partial, rows, dim, offset, rows_per_block);
}
extern "C" __global__ void __launch_bounds__(512) add_rms_norm_backward_bf16(const bf16* h, const bf16* weight, const float* rstd, const bf16* dy, const bf16* d_residual,
                                                                             bf16* dx, float* dw_partial, unsigned rows, unsigned dim, float offset,
                                                                             unsigned rows_per_block) {
    rms_norm_backward_rows<true, 2>(h, weight, rstd, dy, d_residual, dx, dw_partial, rows, dim, offset, rows_per_block);
}
extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_backward_wide_bf16(const bf16* h, const bf16* weight, const float* rstd, const bf16* dy,
                                                                                   const bf16* d_residual, bf16* dx, float* dw_partial, unsigned rows,
                                                                                   unsigned dim, float offset, unsigned rows_per_block) {
    rms_norm_backward_rows<true, 1>(h, weight, rstd, dy, d_residual, dx, dw_partial, rows, dim, offset, rows_per_block);
}

extern "C" __global__ void rms_norm_forward_scalar_f32(const float* x, const float* weight, float* y, float* rstd, unsigned dim, float eps, float offset) {
    rms_norm_forward_scalar<false>(x, x, weight, y, y, rstd, dim, eps, offset);
}
extern "C" __global__ void rms_norm_forward_scalar_bf16(const bf16* x, const bf16* weight, bf16* y, float* rstd, unsigned dim, float eps, float offset) {
    rms_norm_forward_scalar<false>(x, x, weight, y, y, rstd, dim, eps, offset);
}
extern "C" __global__ void rms_norm_backward_scalar_f32(const float* x, const float* weight, const float* rstd, const float* dy, float* dx, float* dw_partial,
                                                        unsigned rows, unsigned dim, float offset, unsigned rows_per_block) {
    rms_norm_backward_scalar<false>(x, weight, rstd, dy, dy, dx, dw_partial, rows, dim, offset, rows_per_block);
}
extern "C" __global__ void rms_norm_backward_scalar_bf16(const bf16* x, const bf16* weight, const float* rstd, const bf16* dy, bf16* dx, float* dw_partial,
                                                         unsigned rows, unsigned dim, float offset, unsigned rows_per_block) {
    rms_norm_backward_scalar<false>(x, weight, rstd, dy, dy, dx, dw_partial, rows, dim, offset, rows_per_block);
}
extern "C" __global__ void add_rms_norm_forward_scalar_f32(const float* x, const float* residual, const float* weight, float* h, float* y, float* rstd,
                                                           unsigned dim, float eps, float offset) {
    rms_norm_forward_scalar<true>(x, residual, weight, h, y, rstd, dim, eps, offset);
}
extern "C" __global__ void add_rms_norm_forward_scalar_bf16(const bf16* x, const bf16* residual, const bf16* weight, bf16* h, bf16* y, float* rstd,
                                                            unsigned dim, float eps, float offset) {
    rms_norm_forward_scalar<true>(x, residual, weight, h, y, rstd, dim, eps, offset);
}
extern "C" __global__ void add_rms_norm_backward_scalar_f32(const float* h, const float* weight, const float* rstd, const float* dy, const float* d_residual,
                                                            float* dx, float* dw_partial, unsigned rows, unsigned dim, float offset, unsigned rows_per_block) {
    rms_norm_backward_scalar<true>(h, weight, rstd, dy, d_residual, dx, dw_partial, rows, dim, offset, rows_per_block);
}
extern "C" __global__ void add_rms_norm_backward_scalar_bf16(const bf16* h, const bf16* weight, const float* rstd, const bf16* dy, const bf16* d_residual,
                                                             bf16* dx, float* dw_partial, unsigned rows, unsigned dim, float offset, unsigned rows_per_block) {
    rms_norm_backward_scalar<true>(h, weight, rstd, dy, d_residual, dx, dw_partial, rows, dim, offset, rows_per_block);
}

extern "C" __global__ void __launch_bounds__(1024) rms_norm_dw_reduce_f32(const float* dw_partial, float* dw, unsigned blocks, unsigned dim) {
    rms_norm_dw_reduce(dw_partial, dw, blocks, dim);
}
extern "C" __global__ void __launch_bounds__(1024) rms_norm_dw_reduce_bf16(const float* dw_partial, bf16* dw, unsigned blocks, unsigned dim) {
    rms_norm_dw_reduce(dw_partial, dw, blocks, dim);
}
