// Twin of the k == 0 / alpha == 0 path of kernels/src/matmul.rs, where A and B are not read and cuBLASLt, which
// wants k ≥ 1, is not called: C = beta·C per batch entry, zeros when beta == 0 (C is then never read, so NaN
// garbage in it cannot survive). The products themselves go through cuBLASLt (kernels/src/cuda/matmul.rs).
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
