// Twin of kernels/src/nf4/dequantize.rs: NF4 codes × block absmax (bitsandbytes' kDequantizeBlockwise), with the
// double-quantized absmax rebuilt in the same pass (kernels/src/nf4/nested.rs dequantize_absmax_nested, then + offset).
// Products flush subnormals, as bnb's --use_fast_math kernels and the CPU code do, and every multiply and add is
// rounded on its own (__fmul_rn, __fadd_rn: no fused multiply-add), so results are the CPU's to the bit.
//
// Memory-bound: 0.5 byte read per element against 2 (bf16) or 4 (f32) written, so the design is about moving bytes
// (kernels/NOTES.md): each lane loads 16 packed bytes (32 elements) at once, its warp re-reads the 512 bytes from
// shared memory in store order so that every 16-byte store of the warp covers 512 contiguous bytes, each block's
// absmax is read (or rebuilt) by one lane and shuffled to the lanes that need it, and the code tables sit in shared
// memory, where 16 distinct indices hit 16 distinct banks.
#include "common.cuh"

// nf4/mod.rs NF4_CODE: bitsandbytes' 16 NF4 values, index = the 4-bit code. Each literal is the shortest decimal of its
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

// Elements a warp dequantizes per step of the vector path: 32 lanes × 16 packed bytes × 2 nibbles. The launcher
// (kernels/src/cuda/nf4.rs TILE) hands the kernel a multiple of it.
constexpr unsigned TILE = 1024;
constexpr unsigned NESTED_BLOCKSIZE = 256;
constexpr unsigned MAX_THREADS = 256;

// Nibble k of packed bytes read little-endian: byte k / 2, its high nibble for even k (FORMATS.md).
__device__ __forceinline__ unsigned nibble(unsigned bits, unsigned k) {
    return (bits >> (8 * (k / 2) + 4 * (1 - k % 2))) & 15;
}

// nf4/dequantize.rs: ftz(NF4_CODE[q] · absmax), one rounding.
__device__ __forceinline__ float dequantize_one(const float* code, unsigned q, float absmax) {
    return flush_subnormal(__fmul_rn(code[q], absmax));
}

// 16 bytes of output from the nibbles in `bits`: 4 f32 from 16 bits.
__device__ __forceinline__ void store16(float* out, unsigned bits, float absmax, const float* code) {
    float4 v;
    v.x = dequantize_one(code, nibble(bits, 0), absmax);
    v.y = dequantize_one(code, nibble(bits, 1), absmax);
    v.z = dequantize_one(code, nibble(bits, 2), absmax);
    v.w = dequantize_one(code, nibble(bits, 3), absmax);
    *reinterpret_cast<float4*>(out) = v;
}

// 16 bytes of output from the nibbles in `bits`: 8 bf16 or f16 from 32 bits.
template <typename T> __device__ __forceinline__ void store16(T* out, unsigned bits, float absmax, const float* code) {
    float v[8];
#pragma unroll
    for (unsigned k = 0; k < 8; ++k) v[k] = dequantize_one(code, nibble(bits, k), absmax);
    uint4 packed;
    packed.x = pack2<T>(v[0], v[1]);
    packed.y = pack2<T>(v[2], v[3]);
    packed.z = pack2<T>(v[4], v[5]);
    packed.w = pack2<T>(v[6], v[7]);
    *reinterpret_cast<uint4*>(out) = packed;
}

// One f32 absmax per block, as stored.
struct Absmax {
    const float* __restrict__ absmax;
    __device__ void stage() {}
    __device__ float operator()(u64 block) const { return absmax[block]; }
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
    __device__ float operator()(u64 block) const {
        return __fadd_rn(flush_subnormal(__fmul_rn(code2[qabsmax[block]], absmax2[block / NESTED_BLOCKSIZE])), offset);
    }
};

// packed: [(n + 1) / 2] u8, scales: one absmax per 2^log2_blocksize elements → out: [n]. Elements below n_vec (a
// multiple of TILE, 0 unless packed and out are 16-byte aligned) take the vector path, one warp per tile of a
// grid-stride loop; the rest, one thread per element. Blocks of at most MAX_THREADS threads, a multiple of 32.
template <typename T, typename Scales>
__device__ void dequantize_nf4(const unsigned char* __restrict__ packed, Scales scales, T* __restrict__ out, u64 n,
                               u64 n_vec, unsigned log2_blocksize) {
    constexpr unsigned VALS = 16 / sizeof(T);  // outputs per 16-byte store
    __shared__ float code[16];
    // Each lane's 16 packed bytes, as 32-bit words (the type the uint4 stores and the reads both access).
    __shared__ __align__(16) unsigned staged[4 * MAX_THREADS];
    if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
    scales.stage();
    __syncthreads();

    const unsigned lane = threadIdx.x % 32;
    // Blocks a tile touches: lane l holds block l of the tile (blocksize ≥ 32, so never more than 32).
    const unsigned tile_blocks = log2_blocksize >= 10 ? 1 : TILE >> log2_blocksize;
    const unsigned* warp_staged = staged + 4 * (threadIdx.x - lane);
    for (u64 tile = thread_index() / 32; tile < n_vec / TILE; tile += thread_count() / 32) {
        const u64 first = tile * TILE;
        // Lanes past the tile's blocks repeat its last one: without a branch, the scale's reads (two dependent ones
        // when nested) are issued beside the packed bytes' instead of after them.
        const uint4 bytes = reinterpret_cast<const uint4*>(packed + first / 2)[lane];
        const float lane_absmax = scales((first >> log2_blocksize) + min(lane, tile_blocks - 1));
        reinterpret_cast<uint4*>(staged)[threadIdx.x] = bytes;
        __syncwarp();
#pragma unroll
        for (unsigned s = 0; s < 32 / VALS; ++s) {
            // Step s: lane l writes the tile's (32·s + l)-th run of VALS elements, so the warp's stores are contiguous.
            const unsigned run = 32 * s + lane;
            const float absmax = __shfl_sync(0xffffffffu, lane_absmax, (run * VALS) >> log2_blocksize);
            // The run's 4 (bf16, f16) or 2 (f32) packed bytes.
            const unsigned bits = VALS == 8 ? warp_staged[run] : warp_staged[run / 2] >> (16 * (run % 2));
            store16(out + first + run * VALS, bits, absmax, code);
        }
        __syncwarp();  // the warp's staged bytes are read before the next tile overwrites them
    }
    for (u64 i = n_vec + thread_index(); i < n; i += thread_count()) {
        const unsigned byte = packed[i / 2];
        out[i] = from_f32<T>(dequantize_one(code, i % 2 == 0 ? byte >> 4 : byte & 15, scales(i >> log2_blocksize)));
    }
}

// qlora-rt: hot
extern "C" __global__ void dequantize_nf4_f32(const unsigned char* packed, const float* absmax, float* out, u64 n, u64 n_vec, unsigned log2_blocksize) {
    dequantize_nf4(packed, Absmax{absmax}, out, n, n_vec, log2_blocksize);
}
extern "C" __global__ void dequantize_nf4_bf16(const unsigned char* packed, const float* absmax, bf16* out, u64 n, u64 n_vec, unsigned log2_blocksize) {
    dequantize_nf4(packed, Absmax{absmax}, out, n, n_vec, log2_blocksize);
}
extern "C" __global__ void dequantize_nf4_f16(const unsigned char* packed, const float* absmax, f16* out, u64 n, u64 n_vec, unsigned log2_blocksize) {
    dequantize_nf4(packed, Absmax{absmax}, out, n, n_vec, log2_blocksize);
}
extern "C" __global__ void dequantize_nf4_nested_f32(const unsigned char* packed, const unsigned char* qabsmax, const float* absmax2, const float* code2,
                                                     float offset, float* out, u64 n, u64 n_vec, unsigned log2_blocksize) {
    dequantize_nf4(packed, NestedAbsmax{qabsmax, absmax2, code2, offset}, out, n, n_vec, log2_blocksize);
}
extern "C" __global__ void dequantize_nf4_nested_bf16(const unsigned char* packed, const unsigned char* qabsmax, const float* absmax2, const float* code2,
                                                      float offset, bf16* out, u64 n, u64 n_vec, unsigned log2_blocksize) {
    dequantize_nf4(packed, NestedAbsmax{qabsmax, absmax2, code2, offset}, out, n, n_vec, log2_blocksize);
}
extern "C" __global__ void dequantize_nf4_nested_f16(const unsigned char* packed, const unsigned char* qabsmax, const float* absmax2, const float* code2,
                                                     float offset, f16* out, u64 n, u64 n_vec, unsigned log2_blocksize) {
    dequantize_nf4(packed, NestedAbsmax{qabsmax, absmax2, code2, offset}, out, n, n_vec, log2_blocksize);
}

// qabsmax: [nb] u8, absmax2: [ceil(nb / 256)] f32, code2: [256] f32 → out: [nb] f32 = ftz(code2[q]·absmax2) + offset
extern "C" __global__ void dequantize_absmax_nested_f32(const unsigned char* qabsmax, const float* absmax2, const float* code2, float offset,
                                                        float* out, u64 nb) {
    for (u64 i = thread_index(); i < nb; i += thread_count())
        out[i] = __fadd_rn(flush_subnormal(__fmul_rn(code2[qabsmax[i]], absmax2[i / 256])), offset);
}

// Twin of kernels/src/nf4/gemv.rs. x: [m, in] (m ≤ GEMV_MAX_ROWS) times W [out, in] NF4 → y: [m, out], for decoding:
// the weight is read packed (0.5 byte per element, the whole cost at batch 1) and never written out. One warp per
// output row, grid-stride over rows. On the vector path (in % 32 == 0, 16-byte aligned bases) each lane takes 32
// consecutive elements per step, 16 packed bytes in one load, so a warp reads 512 contiguous bytes of the row per
// step; the 32 elements lie in one scale block (blocksize ≥ 32). Otherwise one element per lane per step. Sums in
// f32 per lane, then across the warp by a fixed shuffle tree: the same bits run to run.
constexpr unsigned GEMV_MAX_ROWS = 8;

template <typename T, typename Scales>
__device__ void nf4_gemv(const unsigned char* __restrict__ packed, Scales scales, const T* __restrict__ x,
                         T* __restrict__ y, unsigned m, unsigned out_f, unsigned in_f, unsigned log2_blocksize,
                         int vector) {
    __shared__ float code[16];
    if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
    scales.stage();
    __syncthreads();
    const unsigned lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (unsigned o = blockIdx.x * warps + threadIdx.x / 32; o < out_f; o += gridDim.x * warps) {
        float acc[GEMV_MAX_ROWS];
#pragma unroll
        for (unsigned r = 0; r < GEMV_MAX_ROWS; ++r) acc[r] = 0.0f;
        const u64 row = static_cast<u64>(o) * in_f;
        if (vector) {
            for (unsigned c = 32 * lane; c < in_f; c += 32 * 32) {
                const u64 e = row + c;
                const uint4 bytes = *reinterpret_cast<const uint4*>(packed + e / 2);
                const float absmax = scales(e >> log2_blocksize);
                const unsigned words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
                float w[32];
#pragma unroll
                for (unsigned j = 0; j < 4; ++j) {
#pragma unroll
                    for (unsigned k = 0; k < 8; ++k) w[8 * j + k] = dequantize_one(code, nibble(words[j], k), absmax);
                }
#pragma unroll
                for (unsigned r = 0; r < GEMV_MAX_ROWS; ++r) {
                    if (r < m) {
                        const T* xr = x + static_cast<u64>(r) * in_f + c;
#pragma unroll
                        for (unsigned j = 0; j < 4; ++j) {
                            float v[8];
                            unpack8(load8(xr + 8 * j), v);
#pragma unroll
                            for (unsigned k = 0; k < 8; ++k) acc[r] += w[8 * j + k] * v[k];
                        }
                    }
                }
            }
        } else {
            for (unsigned i = lane; i < in_f; i += 32) {
                const u64 e = row + i;
                const unsigned byte = packed[e / 2];
                const float w = dequantize_one(code, e % 2 == 0 ? byte >> 4 : byte & 15, scales(e >> log2_blocksize));
#pragma unroll
                for (unsigned r = 0; r < GEMV_MAX_ROWS; ++r) {
                    if (r < m) acc[r] += w * to_f32(x[static_cast<u64>(r) * in_f + i]);
                }
            }
        }
#pragma unroll
        for (unsigned r = 0; r < GEMV_MAX_ROWS; ++r) {
            float s = acc[r];
            for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(0xffffffffu, s, d);
            if (lane == 0 && r < m) y[static_cast<u64>(r) * out_f + o] = from_f32<T>(s);
        }
    }
}

// qlora-rt: hot
extern "C" __global__ void nf4_gemv_f32(const unsigned char* packed, const float* absmax, const float* x, float* y, unsigned m, unsigned out_f, unsigned in_f, unsigned log2_blocksize, int vector) {
    nf4_gemv(packed, Absmax{absmax}, x, y, m, out_f, in_f, log2_blocksize, vector);
}
extern "C" __global__ void nf4_gemv_bf16(const unsigned char* packed, const float* absmax, const bf16* x, bf16* y, unsigned m, unsigned out_f, unsigned in_f, unsigned log2_blocksize, int vector) {
    nf4_gemv(packed, Absmax{absmax}, x, y, m, out_f, in_f, log2_blocksize, vector);
}
extern "C" __global__ void nf4_gemv_nested_f32(const unsigned char* packed, const unsigned char* qabsmax, const float* absmax2, const float* code2, float offset,
                                               const float* x, float* y, unsigned m, unsigned out_f, unsigned in_f, unsigned log2_blocksize, int vector) {
    nf4_gemv(packed, NestedAbsmax{qabsmax, absmax2, code2, offset}, x, y, m, out_f, in_f, log2_blocksize, vector);
}
extern "C" __global__ void nf4_gemv_nested_bf16(const unsigned char* packed, const unsigned char* qabsmax, const float* absmax2, const float* code2, float offset,
                                                const bf16* x, bf16* y, unsigned m, unsigned out_f, unsigned in_f, unsigned log2_blocksize, int vector) {
    nf4_gemv(packed, NestedAbsmax{qabsmax, absmax2, code2, offset}, x, y, m, out_f, in_f, log2_blocksize, vector);
}
