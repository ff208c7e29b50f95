// Twin of kernels/src/reduce.rs: full sums, sum of squares, max |x| and column sums, accumulated in f32 (the CPU
// accumulates in f64; the tests bound the difference by the sum of magnitudes). Every grid is sized from the shape
// alone and every partial is combined in a fixed order, so results are the same bits run to run.
#include "common.cuh"

#define OP_SUM 0
#define OP_SUM_SQUARES 1
#define OP_MAX_ABS 2

// max that returns NaN when either side is NaN (fmaxf drops NaN, which would hide a diverged step), as reduce.rs.
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || b != b) ? f32_nan() : fmaxf(a, b); }

// nan_max over the block of values ≥ 0 (0 is the identity).
DEFINE_BLOCK_REDUCE(block_nan_max, nan_max, 0.0f)

template <int OP> __device__ __forceinline__ float reduce_block(float v) {
    return OP == OP_MAX_ABS ? block_nan_max(v) : block_sum(v);
}

// x: [n] → partial: [gridDim.x] f32, this block's share of the grid-stride pass.
template <typename T, int OP> __device__ void reduce_partial(const T* x, float* partial, u64 n) {
    float acc = 0.0f;
    for (u64 i = thread_index(); i < n; i += thread_count()) {
        const float v = to_f32(x[i]);
        if (OP == OP_SUM) acc += v;
        else if (OP == OP_SUM_SQUARES) acc += v * v;
        else acc = nan_max(acc, fabsf(v));
    }
    acc = reduce_block<OP>(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// partial: [count] f32 → out: [1] f32 (added to what out holds when `accumulate`: a sum over several tensors, such as
// a gradient norm, builds up on the device without a trip to the host). One block.
template <int OP> __device__ void reduce_final(const float* partial, float* out, unsigned count, int accumulate) {
    float acc = 0.0f;
    for (unsigned i = threadIdx.x; i < count; i += blockDim.x) acc = OP == OP_MAX_ABS ? nan_max(acc, partial[i]) : acc + partial[i];
    acc = reduce_block<OP>(acc);
    if (threadIdx.x == 0) out[0] = accumulate ? out[0] + acc : acc;
}

// x: [rows, cols] → partial: [gridDim.y, cols] f32, Σ over rows [y·rows_per_split, (y+1)·rows_per_split) in row order
// of x, or of x⊙y when y is given (the f32 product, never rounded to T). Grid: (column blocks, row splits); adjacent
// threads take adjacent columns, so every row read is coalesced.
template <typename T>
__device__ void sum_rows_partial(const T* x, const T* y, float* partial, unsigned rows, unsigned cols,
                                 unsigned rows_per_split) {
    const unsigned c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const unsigned first = blockIdx.y * rows_per_split, last = min(rows, first + rows_per_split);
    float acc = 0.0f;
    for (unsigned r = first; r < last; ++r) {
        const u64 i = static_cast<u64>(r) * cols + c;
        acc += y ? to_f32(x[i]) * to_f32(y[i]) : to_f32(x[i]);
    }
    partial[static_cast<u64>(blockIdx.y) * cols + c] = acc;
}

// partial: [splits, cols] f32 → out: [cols] = Σ over splits in order. One thread per column.
template <typename T> __device__ void sum_rows_final(const float* partial, T* out, unsigned splits, unsigned cols) {
    for (u64 c = thread_index(); c < cols; c += thread_count()) {
        float acc = 0.0f;
        for (unsigned s = 0; s < splits; ++s) acc += partial[static_cast<u64>(s) * cols + c];
        out[c] = from_f32<T>(acc);
    }
}

extern "C" __global__ void sum_partial_f32(const float* x, float* partial, u64 n) { reduce_partial<float, OP_SUM>(x, partial, n); }
extern "C" __global__ void sum_partial_bf16(const bf16* x, float* partial, u64 n) { reduce_partial<bf16, OP_SUM>(x, partial, n); }
extern "C" __global__ void sum_squares_partial_f32(const float* x, float* partial, u64 n) { reduce_partial<float, OP_SUM_SQUARES>(x, partial, n); }
extern "C" __global__ void sum_squares_partial_bf16(const bf16* x, float* partial, u64 n) { reduce_partial<bf16, OP_SUM_SQUARES>(x, partial, n); }
extern "C" __global__ void max_abs_partial_f32(const float* x, float* partial, u64 n) { reduce_partial<float, OP_MAX_ABS>(x, partial, n); }
extern "C" __global__ void max_abs_partial_bf16(const bf16* x, float* partial, u64 n) { reduce_partial<bf16, OP_MAX_ABS>(x, partial, n); }

// One tensor of a multi-tensor sum of squares, as kernels/src/cuda/reduce.rs `sum_squares_multi` writes it.
struct SquaresEntry {
    const float* x;
    u64 n;
};

// entries: [gridDim.y] → partial: [gridDim.y, gridDim.x] f32, Σ x² over each block's share of its tensor's
// grid-stride pass (sum_final_f32 then adds them in order: a global gradient norm in two launches, not two a tensor).
extern "C" __global__ void sum_squares_multi_f32(const SquaresEntry* entries, float* partial) {
    const SquaresEntry e = entries[blockIdx.y];
    float acc = 0.0f;
    for (u64 i = static_cast<u64>(blockIdx.x) * blockDim.x + threadIdx.x; i < e.n; i += static_cast<u64>(gridDim.x) * blockDim.x) {
        const float v = e.x[i];
        acc += v * v;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[static_cast<u64>(blockIdx.y) * gridDim.x + blockIdx.x] = acc;
}

// The partials are f32 whatever the input type.
extern "C" __global__ void sum_final_f32(const float* partial, float* out, unsigned count, int accumulate) {
    reduce_final<OP_SUM>(partial, out, count, accumulate);
}
extern "C" __global__ void max_abs_final_f32(const float* partial, float* out, unsigned count, int accumulate) {
    reduce_final<OP_MAX_ABS>(partial, out, count, accumulate);
}

extern "C" __global__ void sum_rows_partial_f32(const float* x, const float* y, float* partial, unsigned rows, unsigned cols, unsigned rows_per_split) {
    sum_rows_partial(x, y, partial, rows, cols, rows_per_split);
}
extern "C" __global__ void sum_rows_partial_bf16(const bf16* x, const bf16* y, float* partial, unsigned rows, unsigned cols, unsigned rows_per_split) {
    sum_rows_partial(x, y, partial, rows, cols, rows_per_split);
}
extern "C" __global__ void sum_rows_final_f32(const float* partial, float* out, unsigned splits, unsigned cols) {
    sum_rows_final(partial, out, splits, cols);
}
extern "C" __global__ void sum_rows_final_bf16(const float* partial, bf16* out, unsigned splits, unsigned cols) {
    sum_rows_final(partial, out, splits, cols);
}
