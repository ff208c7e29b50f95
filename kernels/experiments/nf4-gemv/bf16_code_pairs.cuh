// What the tensor-core experiments share (mma-gemv.cu, frag-gemv.cu): the NF4 codes, the table of a packed byte's two
// codes as bf16 pairs, and mma.sync m16n8k16 with bf16 inputs and f32 accumulators. Device code only.
#pragma once
#include <cuda_bf16.h>

__constant__ float NF4[16] = {-1.0f, -0.6961928f, -0.5250731f, -0.3949175f, -0.2844414f, -0.1847734f, -0.0910500f, 0.0f,
                              0.0795803f, 0.1609302f, 0.2461123f, 0.3379152f, 0.4407098f, 0.5626170f, 0.7229568f, 1.0f};

__device__ __forceinline__ unsigned bf16_bits(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }

// Entry v at v·STRIDE: COPIES copies of (code[v >> 4], code[v & 15]) as bf16x2, the even column (high nibble) in the
// low half as an A fragment wants it; HL: 8 bytes a copy, (hi pair, lo pair), hi + lo the code to 16 significant bits.
template <int HL, unsigned STRIDE, unsigned COPIES> __device__ void stage_code_pairs(unsigned char* table) {
    for (unsigned i = threadIdx.x; i < 256 * COPIES; i += blockDim.x) {
        const unsigned v = i / COPIES, copy = i % COPIES;
        const float a = NF4[v >> 4], b = NF4[v & 15];
        const unsigned ha = bf16_bits(a), hb = bf16_bits(b);
        const unsigned hi = ha | hb << 16;
        if (HL) {
            const float ra = a - __uint_as_float(ha << 16), rb = b - __uint_as_float(hb << 16);
            *reinterpret_cast<uint2*>(table + v * STRIDE + 8 * copy) = make_uint2(hi, bf16_bits(ra) | bf16_bits(rb) << 16);
        } else {
            *reinterpret_cast<unsigned*>(table + v * STRIDE + 4 * copy) = hi;
        }
    }
}

// c += A·B for one warp: A 16 × 16 (a0..a3: rows g, g + 8 of k-slots 2t, 2t + 1, then of 2t + 8, 2t + 9, g = lane / 4,
// t = lane % 4), B 16 × 8 (b0, b1: column g of those k-slots), C rows g, g + 8 of columns 2t, 2t + 1.
__device__ __forceinline__ void mma(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                    unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
