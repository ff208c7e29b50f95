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
#include "nf4_common.cuh"

// Elements a warp dequantizes per step of the vector path: 32 lanes × 16 packed bytes × 2 nibbles. The launcher
// (kernels/src/cuda/nf4/mod.rs TILE) hands the kernel a multiple of it.
constexpr unsigned TILE = 1024;
constexpr unsigned MAX_THREADS = 256;

// Nibble k of packed bytes read little-endian: byte k / 2, its high nibble for even k (FORMATS.md).
__device__ __forceinline__ unsigned nibble(unsigned bits, unsigned k) {
    return (bits >> (8 * (k / 2) + 4 * (1 - k % 2))) & 15;
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

// A weight whose rows are scaled each by its own factor (DoRA's m/n folded into W, so the scaled weight costs no pass
// of its own): every block's absmax times its row's factor, one f32 rounding, before the codes multiply it. Rows are
// whole blocks (the launcher checks): the row of block b is b / blocks_per_row.
template <typename Scales> struct RowScaled {
    Scales inner;
    const float* row_scale;
    u64 blocks_per_row;
    __device__ void stage() { inner.stage(); }
    __device__ float operator()(u64 block) const { return __fmul_rn(inner(block), row_scale[block / blocks_per_row]); }
};

// The dequantization above of W' = diag(row_scale)·W: row_scale [n / (blocks_per_row << log2_blocksize)] f32.
// qlora-rt: hot
extern "C" __global__ void dequantize_nf4_rows_f32(const unsigned char* packed, const float* absmax, const float* row_scale, u64 blocks_per_row,
                                                   float* out, u64 n, u64 n_vec, unsigned log2_blocksize) {
    dequantize_nf4(packed, RowScaled<Absmax>{Absmax{absmax}, row_scale, blocks_per_row}, out, n, n_vec, log2_blocksize);
}
extern "C" __global__ void dequantize_nf4_rows_bf16(const unsigned char* packed, const float* absmax, const float* row_scale, u64 blocks_per_row,
                                                    bf16* out, u64 n, u64 n_vec, unsigned log2_blocksize) {
    dequantize_nf4(packed, RowScaled<Absmax>{Absmax{absmax}, row_scale, blocks_per_row}, out, n, n_vec, log2_blocksize);
}
extern "C" __global__ void dequantize_nf4_rows_f16(const unsigned char* packed, const float* absmax, const float* row_scale, u64 blocks_per_row,
                                                   f16* out, u64 n, u64 n_vec, unsigned log2_blocksize) {
    dequantize_nf4(packed, RowScaled<Absmax>{Absmax{absmax}, row_scale, blocks_per_row}, out, n, n_vec, log2_blocksize);
}
extern "C" __global__ void dequantize_nf4_nested_rows_f32(const unsigned char* packed, const unsigned char* qabsmax, const float* absmax2, const float* code2,
                                                          float offset, const float* row_scale, u64 blocks_per_row, float* out, u64 n, u64 n_vec,
                                                          unsigned log2_blocksize) {
    const NestedAbsmax scales{qabsmax, absmax2, code2, offset};
    dequantize_nf4(packed, RowScaled<NestedAbsmax>{scales, row_scale, blocks_per_row}, out, n, n_vec, log2_blocksize);
}
extern "C" __global__ void dequantize_nf4_nested_rows_bf16(const unsigned char* packed, const unsigned char* qabsmax, const float* absmax2, const float* code2,
                                                           float offset, const float* row_scale, u64 blocks_per_row, bf16* out, u64 n, u64 n_vec,
                                                           unsigned log2_blocksize) {
    const NestedAbsmax scales{qabsmax, absmax2, code2, offset};
    dequantize_nf4(packed, RowScaled<NestedAbsmax>{scales, row_scale, blocks_per_row}, out, n, n_vec, log2_blocksize);
}
extern "C" __global__ void dequantize_nf4_nested_rows_f16(const unsigned char* packed, const unsigned char* qabsmax, const float* absmax2, const float* code2,
                                                          float offset, const float* row_scale, u64 blocks_per_row, f16* out, u64 n, u64 n_vec,
                                                          unsigned log2_blocksize) {
    const NestedAbsmax scales{qabsmax, absmax2, code2, offset};
    dequantize_nf4(packed, RowScaled<NestedAbsmax>{scales, row_scale, blocks_per_row}, out, n, n_vec, log2_blocksize);
}

// qabsmax: [nb] u8, absmax2: [ceil(nb / 256)] f32, code2: [256] f32 → out: [nb] f32 = ftz(code2[q]·absmax2) + offset
extern "C" __global__ void dequantize_absmax_nested_f32(const unsigned char* qabsmax, const float* absmax2, const float* code2, float offset,
                                                        float* out, u64 nb) {
    for (u64 i = thread_index(); i < nb; i += thread_count())
        out[i] = __fadd_rn(flush_subnormal(__fmul_rn(code2[qabsmax[i]], absmax2[i / 256])), offset);
}
