// Twin of kernels/src/embedding.rs: row lookup, and its scatter-add backward made deterministic the CPU's way: the
// launcher groups token positions by id (a stable counting sort, done on the host) and one block owns each touched
// table row, adding its tokens in position order from the row's prior value, in f32, with one rounding at the end.
// f32 results are therefore the CPU's to the bit.
#include "common.cuh"

// table: [vocab, dim], ids: [n] → out: [n, dim]; a row whose id is outside 0..vocab (a caller bug the CPU kernel
// asserts) is NaN. Vector path (dim a multiple of 8, every row 16-byte aligned): chunks = n·dim/8 copies of 8
// elements (16-byte accesses), EMB_UNROLL per thread per step so that their ids and then their table loads are in
// flight together (each table load waits for its id). Grid-stride; the launcher's grid is one wave.
constexpr unsigned EMB_UNROLL = 4;

template <typename T>
__device__ void embedding_forward(const T* __restrict__ table, const int* __restrict__ ids, T* __restrict__ out, unsigned chunks,
                                  unsigned dim, unsigned vocab) {
    const unsigned per_row = dim / 8, stride = gridDim.x * blockDim.x;
    for (unsigned k = blockIdx.x * blockDim.x + threadIdx.x; k < chunks; k += EMB_UNROLL * stride) {
        unsigned row[EMB_UNROLL], col[EMB_UNROLL];
        int id[EMB_UNROLL];
        bool live[EMB_UNROLL];
#pragma unroll
        for (unsigned u = 0; u < EMB_UNROLL; ++u) {
            const unsigned kk = k + u * stride;
            live[u] = kk < chunks;
            row[u] = kk / per_row;
            col[u] = (kk - row[u] * per_row) * 8;
            id[u] = live[u] ? ids[row[u]] : 0;
        }
        Raw8<T> v[EMB_UNROLL] = {};
#pragma unroll
        for (unsigned u = 0; u < EMB_UNROLL; ++u) {
            if (!live[u]) continue;
            if (id[u] >= 0 && static_cast<unsigned>(id[u]) < vocab) {
                v[u] = load8(table + static_cast<u64>(id[u]) * dim + col[u]);
            } else {
                float nan[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) nan[j] = f32_nan();
                store8(out + static_cast<u64>(row[u]) * dim + col[u], nan);
                live[u] = false;
            }
        }
#pragma unroll
        for (unsigned u = 0; u < EMB_UNROLL; ++u)
            if (live[u]) store_raw8(out + static_cast<u64>(row[u]) * dim + col[u], v[u]);
    }
}

// The scalar path: one element per thread, n_dim = n·dim.
template <typename T>
__device__ void embedding_forward_scalar(const T* table, const int* ids, T* out, u64 n_dim, unsigned dim, unsigned vocab) {
    for (u64 i = thread_index(); i < n_dim; i += thread_count()) {
        const int id = ids[i / dim];
        out[i] = (id >= 0 && static_cast<unsigned>(id) < vocab) ? table[static_cast<u64>(id) * dim + i % dim] : from_f32<T>(f32_nan());
    }
}

// d_out: [n, dim]; segment s covers order[seg_start[s] .. seg_start[s+1]] (token positions, ascending) whose id is
// seg_row[s] → d_table[seg_row[s], :] += Σ d_out[position, :]. Grid: one block per segment.
template <typename T>
__device__ void embedding_backward_accumulate(const T* d_out, const int* order, const int* seg_start, const int* seg_row, T* d_table, unsigned dim) {
    const int s = blockIdx.x;
    T* dst = d_table + static_cast<u64>(seg_row[s]) * dim;
    for (unsigned c = threadIdx.x; c < dim; c += blockDim.x) {
        float acc = to_f32(dst[c]);
        for (int k = seg_start[s]; k < seg_start[s + 1]; ++k) acc = acc + to_f32(d_out[static_cast<u64>(order[k]) * dim + c]);
        dst[c] = from_f32<T>(acc);
    }
}

// qlora-rt: hot
extern "C" __global__ void embedding_forward_f32(const float* table, const int* ids, float* out, unsigned chunks, unsigned dim, unsigned vocab) { embedding_forward(table, ids, out, chunks, dim, vocab); }
extern "C" __global__ void embedding_forward_bf16(const bf16* table, const int* ids, bf16* out, unsigned chunks, unsigned dim, unsigned vocab) { embedding_forward(table, ids, out, chunks, dim, vocab); }

extern "C" __global__ void embedding_forward_scalar_f32(const float* table, const int* ids, float* out, u64 n_dim, unsigned dim, unsigned vocab) { embedding_forward_scalar(table, ids, out, n_dim, dim, vocab); }
extern "C" __global__ void embedding_forward_scalar_bf16(const bf16* table, const int* ids, bf16* out, u64 n_dim, unsigned dim, unsigned vocab) { embedding_forward_scalar(table, ids, out, n_dim, dim, vocab); }

extern "C" __global__ void embedding_backward_accumulate_f32(const float* d_out, const int* order, const int* seg_start, const int* seg_row, float* d_table, unsigned dim) { embedding_backward_accumulate(d_out, order, seg_start, seg_row, d_table, dim); }
extern "C" __global__ void embedding_backward_accumulate_bf16(const bf16* d_out, const int* order, const int* seg_start, const int* seg_row, bf16* d_table, unsigned dim) { embedding_backward_accumulate(d_out, order, seg_start, seg_row, d_table, dim); }
