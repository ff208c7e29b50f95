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

// LoRA's products through a dropout mask (training with lora_dropout > 0), bf16, each one pass over the [rows, cols]
// tensor with the mask drawn in registers: u = dropout(x)·Aᵀ (forward and recompute) and dx += dropout(du·A)
// (backward), where dropout, a GEMM and an add took three to six passes over it. The mask is elementwise.cu's dropout
// mask (element i of the row-major [rows, cols] tensor is dropped when its uniform draw is < p), compared in integers:
// draw < p ⟺ (z >> 11) < ⌈p·2^53⌉ = drop_below, exactly. Sums in f32, one rounding to bf16. A's rows (r ≤ 64) are
// staged in shared memory 256 columns at a time; a lane owns 8 consecutive columns (one 16-byte load when `vec`: rows
// 16-byte aligned, cols % 8 == 0; element loads otherwise).
#define LORA_DROP_COLS 256u
#define LORA_DROP_MAX_R 64u

// Whether elements i … i + 7 are kept, as bits 0 … 7.
__device__ __forceinline__ unsigned dropout_keeps8(u64 seed, u64 i, u64 drop_below) {
    const u64 z = splitmix_state(seed, i);
    unsigned kept = 0;
#pragma unroll
    for (unsigned j = 0; j < 8; ++j) kept |= ((splitmix_mix(z + j * SPLITMIX_STEP) >> 11) >= drop_below) << j;
    return kept;
}

__device__ __forceinline__ void unpack8(uint4 w, float v[8]) {
    const unsigned u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        v[2 * j] = __uint_as_float(u[j] << 16);
        v[2 * j + 1] = __uint_as_float(u[j] & 0xffff0000u);
    }
}

// p[0 .. valid) as f32, zeros past it.
__device__ __forceinline__ void load8(const bf16* p, unsigned valid, bool vec, float v[8]) {
    if (vec && valid == 8) {
        unpack8(*reinterpret_cast<const uint4*>(p), v);
    } else {
#pragma unroll
        for (unsigned j = 0; j < 8; ++j) v[j] = j < valid ? to_f32(p[j]) : 0.0f;
    }
}

__device__ __forceinline__ void store8(bf16* p, unsigned valid, bool vec, const float v[8]) {
    if (vec && valid == 8) {
        unsigned u[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            u[j] = static_cast<unsigned>(from_f32<bf16>(v[2 * j]).bits) |
                   (static_cast<unsigned>(from_f32<bf16>(v[2 * j + 1]).bits) << 16);
        }
        *reinterpret_cast<uint4*>(p) = make_uint4(u[0], u[1], u[2], u[3]);
    } else {
#pragma unroll
        for (unsigned j = 0; j < 8; ++j)
            if (j < valid) p[j] = from_f32<bf16>(v[j]);
    }
}

// a: [r, cols] → as: [RT][LORA_DROP_COLS], columns c0 … c0 + 255 of A's rows, zeros past r and cols.
template <unsigned RT>
__device__ void stage_a(bf16* as, const bf16* a, unsigned r, unsigned cols, unsigned c0, bool vec) {
    constexpr unsigned CHUNKS = LORA_DROP_COLS / 8;
    for (unsigned i = threadIdx.x; i < RT * CHUNKS; i += blockDim.x) {
        const unsigned k = i / CHUNKS, col = c0 + (i % CHUNKS) * 8;
        float v[8];
        load8(a + static_cast<u64>(k) * cols + col, k < r && col < cols ? min(8u, cols - col) : 0u, vec, v);
        store8(as + static_cast<u64>(k) * LORA_DROP_COLS + (i % CHUNKS) * 8, 8, true, v);
    }
}

// x: [rows, cols], a: [r, cols] → u: [rows, r] = dropout(x)·Aᵀ. A warp owns 32 / RT rows, at least one (r ≤ RT sums
// per row and lane: 32 or 64, so that two blocks of 256 threads fit a multiprocessor without spilling); the lanes'
// partial sums meet by shuffles at the end.
template <unsigned RT>
__device__ void lora_dropout_down(const bf16* x, const bf16* a, bf16* u, unsigned rows, unsigned cols, unsigned r,
                                  u64 seed, u64 drop_below, float keep, unsigned vec) {
    constexpr unsigned RPW = RT >= 32 ? 1 : 32 / RT;
    __shared__ __align__(16) bf16 as[RT * LORA_DROP_COLS];
    const unsigned lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const unsigned row0 = (blockIdx.x * warps + threadIdx.x / 32) * RPW;
    float acc[RPW][RT];
#pragma unroll
    for (unsigned i = 0; i < RPW; ++i)
#pragma unroll
        for (unsigned k = 0; k < RT; ++k) acc[i][k] = 0.0f;
    for (unsigned c0 = 0; c0 < cols; c0 += LORA_DROP_COLS) {
        __syncthreads();  // the previous chunk's readers are done with `as`
        stage_a<RT>(as, a, r, cols, c0, vec);
        __syncthreads();
        const unsigned col = c0 + lane * 8;
        if (col >= cols) continue;
        const unsigned valid = min(8u, cols - col);
        float xv[RPW][8];
#pragma unroll
        for (unsigned i = 0; i < RPW; ++i) {
            const unsigned row = row0 + i;
            const u64 at = static_cast<u64>(row) * cols + col;
            load8(x + at, row < rows ? valid : 0u, vec, xv[i]);
            const unsigned kept = dropout_keeps8(seed, at, drop_below);
#pragma unroll
            for (unsigned j = 0; j < 8; ++j) xv[i][j] = kept >> j & 1 ? xv[i][j] * keep : 0.0f;
        }
#pragma unroll
        for (unsigned k = 0; k < RT; ++k) {
            float w[8];
            unpack8(reinterpret_cast<const uint4*>(as)[k * (LORA_DROP_COLS / 8) + lane], w);
#pragma unroll
            for (unsigned i = 0; i < RPW; ++i)
#pragma unroll
                for (unsigned j = 0; j < 8; ++j) acc[i][k] = fmaf(xv[i][j], w[j], acc[i][k]);
        }
    }
#pragma unroll
    for (unsigned i = 0; i < RPW; ++i) {
#pragma unroll
        for (unsigned k = 0; k < RT; ++k) {
            const float v = warp_sum(acc[i][k]);
            const unsigned row = row0 + i;
            if (lane == 0 && row < rows && k < r) u[static_cast<u64>(row) * r + k] = from_f32<bf16>(v);
        }
    }
}

// dx: [rows, cols] += dropout(du·A), du: [rows, r], a: [r, cols]. A block owns 256 columns (A's slice staged once)
// and tiles of LORA_DROP_UP_ROWS rows (grid.y strides over them), a warp every eighth row of a tile; du's row is read
// by lanes k and k + 32 and shuffled out.
#define LORA_DROP_UP_ROWS 32u
__device__ void lora_dropout_up_add(bf16* dx, const bf16* du, const bf16* a, unsigned rows, unsigned cols, unsigned r,
                                    u64 seed, u64 drop_below, float keep, bool vec) {
    __shared__ __align__(16) bf16 as[LORA_DROP_MAX_R * LORA_DROP_COLS];
    const unsigned c0 = blockIdx.x * LORA_DROP_COLS;
    stage_a<LORA_DROP_MAX_R>(as, a, r, cols, c0, vec);
    __syncthreads();
    const unsigned lane = threadIdx.x % 32, col = c0 + lane * 8;
    const unsigned valid = col < cols ? min(8u, cols - col) : 0u;
    for (unsigned first = blockIdx.y * LORA_DROP_UP_ROWS; first < rows; first += gridDim.y * LORA_DROP_UP_ROWS) {
        const unsigned end = min(rows, first + LORA_DROP_UP_ROWS);
        for (unsigned row = first + threadIdx.x / 32; row < end; row += blockDim.x / 32) {
            const bf16* d = du + static_cast<u64>(row) * r;
            const float d_lo = lane < r ? to_f32(d[lane]) : 0.0f, d_hi = lane + 32 < r ? to_f32(d[lane + 32]) : 0.0f;
            float s[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
            for (unsigned k = 0; k < r; ++k) {
                const float dk = __shfl_sync(0xffffffffu, k < 32 ? d_lo : d_hi, k % 32);
                float w[8];
                unpack8(reinterpret_cast<const uint4*>(as)[k * (LORA_DROP_COLS / 8) + lane], w);
#pragma unroll
                for (unsigned j = 0; j < 8; ++j) s[j] = fmaf(dk, w[j], s[j]);
            }
            if (valid == 0) continue;
            const u64 at = static_cast<u64>(row) * cols + col;
            float v[8];
            load8(dx + at, valid, vec, v);
            const unsigned kept = dropout_keeps8(seed, at, drop_below);
#pragma unroll
            for (unsigned j = 0; j < 8; ++j)
                if (kept >> j & 1) v[j] += keep * s[j];
            store8(dx + at, valid, vec, v);
        }
    }
}

// qlora-rt: hot
extern "C" __global__ void __launch_bounds__(256, 2) lora_dropout_down_r16_bf16(const bf16* x, const bf16* a, bf16* u, unsigned rows, unsigned cols, unsigned r, u64 seed, u64 drop_below, float keep, unsigned vec) { lora_dropout_down<16>(x, a, u, rows, cols, r, seed, drop_below, keep, vec); }
extern "C" __global__ void __launch_bounds__(256, 2) lora_dropout_down_r32_bf16(const bf16* x, const bf16* a, bf16* u, unsigned rows, unsigned cols, unsigned r, u64 seed, u64 drop_below, float keep, unsigned vec) { lora_dropout_down<32>(x, a, u, rows, cols, r, seed, drop_below, keep, vec); }
extern "C" __global__ void __launch_bounds__(256, 2) lora_dropout_down_r64_bf16(const bf16* x, const bf16* a, bf16* u, unsigned rows, unsigned cols, unsigned r, u64 seed, u64 drop_below, float keep, unsigned vec) { lora_dropout_down<64>(x, a, u, rows, cols, r, seed, drop_below, keep, vec); }
extern "C" __global__ void lora_dropout_up_add_bf16(bf16* dx, const bf16* du, const bf16* a, unsigned rows, unsigned cols, unsigned r, u64 seed, u64 drop_below, float keep, unsigned vec) { lora_dropout_up_add(dx, du, a, rows, cols, r, seed, drop_below, keep, vec); }
