// Twin of kernels/src/nf4.rs's dequantization: NF4 codes × block absmax (bitsandbytes' kDequantizeBlockwise), and
// the rebuild of a double-quantized absmax (dequantize_blockwise + offset). Products flush subnormals, as bnb's
// --use_fast_math kernels and the CPU code do, and are rounded on their own (__fmul_rn, __fadd_rn: no fused
// multiply-add), so results are the CPU's to the bit.
#include "common.cuh"

// nf4.rs NF4_CODE: bitsandbytes' 16 NF4 values, index = the 4-bit code. Each literal is the shortest decimal of its
// f32 value; a unit test (kernels/src/cuda/nf4.rs) checks the table against the Rust constant bit for bit.
__constant__ float NF4_CODE[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// packed: [(n + 1) / 2] u8 (high nibble = even element), absmax: [ceil(n / blocksize)] f32 → out: [n]
template <typename T> __device__ void dequantize_nf4(const unsigned char* packed, const float* absmax, T* out, u64 n, unsigned blocksize) {
    for (u64 i = thread_index(); i < n; i += thread_count()) {
        const unsigned char byte = packed[i / 2];
        const unsigned q = (i % 2 == 0) ? (byte >> 4) : (byte & 0x0F);
        out[i] = from_f32<T>(flush_subnormal(__fmul_rn(NF4_CODE[q], absmax[i / blocksize])));
    }
}

// qlora-rt: hot
extern "C" __global__ void dequantize_nf4_f32(const unsigned char* packed, const float* absmax, float* out, u64 n, unsigned blocksize) {
    dequantize_nf4(packed, absmax, out, n, blocksize);
}
extern "C" __global__ void dequantize_nf4_bf16(const unsigned char* packed, const float* absmax, bf16* out, u64 n, unsigned blocksize) {
    dequantize_nf4(packed, absmax, out, n, blocksize);
}

// qabsmax: [nb] u8, absmax2: [ceil(nb / 256)] f32, code2: [256] f32 → out: [nb] f32 = ftz(code2[q]·absmax2) + offset
extern "C" __global__ void dequantize_absmax_nested_f32(const unsigned char* qabsmax, const float* absmax2, const float* code2, float offset,
                                                        float* out, u64 nb) {
    for (u64 i = thread_index(); i < nb; i += thread_count())
        out[i] = __fadd_rn(flush_subnormal(__fmul_rn(code2[qabsmax[i]], absmax2[i / 256])), offset);
}
