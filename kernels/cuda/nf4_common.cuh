// The NF4 code table and the two kinds of block scales, shared by dequantization (nf4.cu) and decoding's GEMV
// (nf4_gemv.cu). Spliced after common.cuh (kernels/src/cuda/source.rs HEADERS).
#pragma once

// nf4/mod.rs NF4_CODE: bitsandbytes' 16 NF4 values, index = the 4-bit code. Each literal is the shortest decimal of its
// f32 value; a unit test (kernels/src/cuda/nf4/mod.rs) checks the table against the Rust constant bit for bit.
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

constexpr unsigned NESTED_BLOCKSIZE = 256;

// nf4/dequantize.rs: ftz(NF4_CODE[q] · absmax), one rounding.
__device__ __forceinline__ float dequantize_one(const float* code, unsigned q, float absmax) {
    return flush_subnormal(__fmul_rn(code[q], absmax));
}

// The scales' interface: scales(block) is a block's absmax; raw(block) is what the GEMV prefetches (its loads only,
// nothing that waits on them) and value(raw) the absmax from it. One f32 absmax per block, as stored:
struct Absmax {
    const float* __restrict__ absmax;
    using Raw = float;
    __device__ void stage() {}
    __device__ Raw raw(u64 block) const { return absmax[block]; }
    __device__ float value(Raw r) const { return r; }
    __device__ float operator()(u64 block) const { return value(raw(block)); }
};

// A double-quantized absmax: block b's is ftz(code2[qabsmax[b]] · absmax2[b / 256]) + offset, each step rounded on
// its own (nested.rs dequantize_absmax_nested). code2 is copied to shared memory first ([`stage`]), since the bytes
// of a warp's blocks index it divergently.
struct NestedAbsmax {
    const unsigned char* __restrict__ qabsmax;
    const float* __restrict__ absmax2;
    const float* code2;
    float offset;
    // Every thread of the block calls it before the block's __syncthreads.
    __device__ void stage() {
        __shared__ float staged[256];
        for (unsigned i = threadIdx.x; i < 256; i += blockDim.x) staged[i] = code2[i];
        code2 = staged;
    }
    struct Raw {
        unsigned q;
        float absmax2;
    };
    __device__ Raw raw(u64 block) const { return Raw{qabsmax[block], absmax2[block / NESTED_BLOCKSIZE]}; }
    __device__ float value(Raw r) const { return __fadd_rn(flush_subnormal(__fmul_rn(code2[r.q], r.absmax2)), offset); }
    __device__ float operator()(u64 block) const { return value(raw(block)); }
};
