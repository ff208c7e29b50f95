// Twin of kernels/src/embedding.rs: row lookup, and its scatter-add backward made deterministic the CPU's way: the
// launcher groups token positions by id (a stable counting sort, done on the host) and one block owns each touched
// table row, adding its tokens in position order from the row's prior value, in f32, with one rounding at the end.
// f32 results are therefore the CPU's to the bit.
#include "common.cuh"

// table: [vocab, dim], ids: [n] → out: [n, dim]; a row whose id is outside 0..vocab (a caller bug the CPU kernel
// asserts) is NaN. n_dim = n·dim.
template <typename T> __device__ void embedding_forward(const T* table, const int* ids, T* out, u64 n_dim, unsigned dim, unsigned vocab) {
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

extern "C" __global__ void embedding_forward_f32(const float* table, const int* ids, float* out, u64 n_dim, unsigned dim, unsigned vocab) {
    embedding_forward(table, ids, out, n_dim, dim, vocab);
}
extern "C" __global__ void embedding_forward_bf16(const bf16* table, const int* ids, bf16* out, u64 n_dim, unsigned dim, unsigned vocab) {
    embedding_forward(table, ids, out, n_dim, dim, vocab);
}

extern "C" __global__ void embedding_backward_accumulate_f32(const float* d_out, const int* order, const int* seg_start, const int* seg_row,
                                                             float* d_table, unsigned dim) {
    embedding_backward_accumulate(d_out, order, seg_start, seg_row, d_table, dim);
}
extern "C" __global__ void embedding_backward_accumulate_bf16(const bf16* d_out, const int* order, const int* seg_start, const int* seg_row,
                                                              bf16* d_table, unsigned dim) {
    embedding_backward_accumulate(d_out, order, seg_start, seg_row, d_table, dim);
}
