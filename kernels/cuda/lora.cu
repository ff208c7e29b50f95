// Twin of kernels/src/lora.rs: LoRA's delta weight s·B·A with every product and sum rounded on its own
// (__fmul_rn, __fadd_rn: no fused multiply-add), k = 0 … r − 1 in turn, so the result is the CPU's to the bit.
// One thread per output element: a block covers 256 columns of one row (its b_ik are one broadcast load per k), A's
// r rows stay in L2 across rows. r multiply-adds per element against 4 bytes written: L2-bound, a fraction of a
// millisecond for a 14336 x 4096 weight, so nothing is staged in shared memory.
#include "common.cuh"

// b: [rows, r], a: [r, cols] → out: [rows, cols]; grid.x over column tiles, grid.y striding over rows.
template <typename T>
__device__ void lora_delta(const T* b, const T* a, T* out, unsigned rows, unsigned cols, unsigned r, float s) {
    const unsigned col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    for (unsigned row = blockIdx.y; row < rows; row += gridDim.y) {
        const T* b_row = b + static_cast<u64>(row) * r;
        float acc = 0.0f;
        for (unsigned k = 0; k < r; ++k) {
            acc = __fadd_rn(acc, __fmul_rn(to_f32(b_row[k]), to_f32(a[static_cast<u64>(k) * cols + col])));
        }
        out[static_cast<u64>(row) * cols + col] = from_f32<T>(__fmul_rn(acc, s));
    }
}

extern "C" __global__ void lora_delta_f32(const float* b, const float* a, float* out, unsigned rows, unsigned cols, unsigned r, float s) { lora_delta(b, a, out, rows, cols, r, s); }
extern "C" __global__ void lora_delta_bf16(const bf16* b, const bf16* a, bf16* out, unsigned rows, unsigned cols, unsigned r, float s) { lora_delta(b, a, out, rows, cols, r, s); }
