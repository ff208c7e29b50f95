// Twin of kernels/src/lora.rs: LoRA's delta weight s·B·A with every product and sum rounded on its own
// (__fmul_rn, __fadd_rn: no fused multiply-add), k = 0 … r − 1 in turn, so the result is the CPU's to the bit.
// One thread per output element: a block covers 256 columns of one row (its b_ik are one broadcast load per k), A's
// r rows stay in L2 across rows. r multiply-adds per element against 4 bytes written: L2-bound, a fraction of a
// millisecond for a 14336 x 4096 weight, so nothing is staged in shared memory.
#include "common.cuh"
#include "flash_common.cuh"

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

// LoRA's adapter gradients from one read of a projection's output gradient: dU = s·dy·B and dB = s·dyᵀ·U, where two
// GEMMs read dy [rows, cols] once each (the largest tensors of a layer's backward: gate and up's are [tokens, 14336]
// on Llama-3-8B). A block stages 64 × 128 tiles of dy in shared memory (cp.async, three stages: two tiles in flight
// while one is read, what a multiprocessor needs to keep its share of the bandwidth busy) and feeds each to
// mma.sync twice: as A for dU (ldmatrix) and as Aᵀ for dB (ldmatrix.trans). It owns a chunk of CT column tiles
// (B's rows for them staged once) and a chunk of row blocks: dB for its columns accumulates in registers over its rows,
// dU for one row block over its columns. Each chunk's f32 sums go to partials that lora_grads_finish adds in chunk
// order and rounds once (s·Σ to bf16), so the bits are the same run to run. R = r (16, 32 or 64); CT = 64 / R keeps
// dB's accumulators at 32 registers (two blocks a multiprocessor at 128), and about balances the partials: a wave of
// blocks is column chunks × row chunks, dU's partials grow with the first and dB's with the second.
#define LORA_GRADS_BM 64
#define LORA_GRADS_BN 128

// pu: [gridDim.x][rows][R] (one chunk of columns each), pb: [gridDim.y][cols][R] (one chunk of rows each); u's rows
// are ldu elements apart (a column block of the layer's U); cols % 8 == 0, ldu % 8 == 0, u 16-byte aligned.
template <int R>
__device__ void lora_grads(const bf16* dy, const bf16* b, const bf16* u, float* pu, float* pb, unsigned rows,
                           unsigned cols, unsigned ldu, unsigned row_blocks) {
    constexpr int BM = LORA_GRADS_BM, BN = LORA_GRADS_BN, SD = BN + 8, SR = R + 8, CT = 64 / R, NT = R / 8;
    unsigned short* sB = reinterpret_cast<unsigned short*>(flash_smem);
    unsigned short* sU = sB + CT * BN * SR;
    unsigned short* sY = sU + 3 * BM * SR;
    float* sX = reinterpret_cast<float*>(sY + 3 * BM * SD);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int lr = lane % 8, lq = (lane / 8) % 2, lh = lane / 16;
    const unsigned c0 = blockIdx.x * CT * BN, r0 = blockIdx.y * row_blocks * BM;
    const int tiles = min(CT, static_cast<int>((cols - c0 + BN - 1) / BN));
    const int blocks = min(static_cast<int>(row_blocks), static_cast<int>((rows - r0 + BM - 1) / BM));
    const unsigned short* gy = reinterpret_cast<const unsigned short*>(dy);
    const unsigned short* gu = reinterpret_cast<const unsigned short*>(u);
    const unsigned short* gb = reinterpret_cast<const unsigned short*>(b);

    for (int c = tid; c < CT * BN * NT; c += 256) {
        const int row = c / NT, ch = c % NT;
        const unsigned n = c0 + row;
        cp_async16(smem_u32(sB + row * SR + ch * 8), n < cols ? gb + static_cast<u64>(n) * R + ch * 8 : gb, n < cols ? 16u : 0u);
    }
    // Tile i (row block i / tiles, column tile i % tiles) of dy into stage i % 3; with a row block's first tile, its
    // rows of U too (three buffers: the tile two ahead may be two row blocks on when a row block is one tile).
    auto load = [&](int i) {
        const int rb = i / tiles, ct = i % tiles;
        const unsigned m0 = r0 + rb * BM, n0 = c0 + ct * BN;
        const unsigned base = smem_u32(sY + (i % 3) * BM * SD);
        for (int c = tid; c < BM * BN / 8; c += 256) {
            const int row = c / (BN / 8), col = (c % (BN / 8)) * 8;
            const bool in = m0 + row < rows && n0 + col < cols;
            cp_async16(base + 2u * (row * SD + col), in ? gy + static_cast<u64>(m0 + row) * cols + n0 + col : gy, in ? 16u : 0u);
        }
        if (ct == 0) {
            const unsigned ubase = smem_u32(sU + (rb % 3) * BM * SR);
            for (int c = tid; c < BM * NT; c += 256) {
                const int row = c / NT, col = (c % NT) * 8;
                const bool in = m0 + row < rows;
                cp_async16(ubase + 2u * (row * SR + col), in ? gu + static_cast<u64>(m0 + row) * ldu + col : gu, in ? 16u : 0u);
            }
        }
    };

    float db[CT][NT][4];
#pragma unroll
    for (int ct = 0; ct < CT; ++ct)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) db[ct][nt][0] = db[ct][nt][1] = db[ct][nt][2] = db[ct][nt][3] = 0.0f;
    // dU: warp w takes rows 16·(w % 4) of a tile over the half of its columns 64·(w / 4); dB: columns 16·w over the
    // tile's 64 rows.
    const int rg = warp % 4, kh = warp / 4;
    const int items = blocks * tiles;
    load(0);
    cp_async_commit();
    if (items > 1) load(1);
    cp_async_commit();
    for (int rb = 0; rb < blocks; ++rb) {
        float du[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) du[nt][0] = du[nt][1] = du[nt][2] = du[nt][3] = 0.0f;
#pragma unroll
        for (int ct = 0; ct < CT; ++ct) {
            if (ct >= tiles) continue;
            const int i = rb * tiles + ct;
            cp_async_wait<1>();  // tile i has landed; tile i + 1 may still be in flight
            // Every warp is past tile i − 1, whose stage the load two ahead refills.
            __syncthreads();
            if (i + 2 < items) load(i + 2);
            cp_async_commit();
            const unsigned y = smem_u32(sY + (i % 3) * BM * SD), us = smem_u32(sU + (rb % 3) * BM * SR);
            const unsigned aY = y + 2u * ((16 * rg + lr + 8 * lq) * SD + 64 * kh + 8 * lh);
            const unsigned bB = smem_u32(sB) + 2u * ((ct * BN + 64 * kh + lr + 8 * lq) * SR + 8 * lh);
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                unsigned a[4];
                ldsm_x4(aY + 2u * (kk * 16), a);
#pragma unroll
                for (int nb = 0; nb < NT / 2; ++nb) {
                    unsigned f[4];
                    ldsm_x4_t(bB + 2u * (kk * 16 * SR + nb * 16), f);
                    mma16816<bf16>(du[2 * nb], a, f[0], f[1]);
                    mma16816<bf16>(du[2 * nb + 1], a, f[2], f[3]);
                }
            }
            // dyᵀ's rows are dy's columns: ldmatrix.trans of 8 consecutive dy rows gives A fragments of dyᵀ.
            const unsigned aT = y + 2u * ((lr + 8 * lh) * SD + 16 * warp + 8 * lq);
            const unsigned bU = us + 2u * ((lr + 8 * lq) * SR + 8 * lh);
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                unsigned a[4];
                ldsm_x4_t(aT + 2u * (kk * 16 * SD), a);
#pragma unroll
                for (int nb = 0; nb < NT / 2; ++nb) {
                    unsigned f[4];
                    ldsm_x4_t(bU + 2u * (kk * 16 * SR + nb * 16), f);
                    mma16816<bf16>(db[ct][2 * nb], a, f[0], f[1]);
                    mma16816<bf16>(db[ct][2 * nb + 1], a, f[2], f[3]);
                }
            }
        }
        // The two column halves' dU meet in shared memory, in a fixed order, then one partial per chunk.
        const int row = 16 * rg + g;
        if (kh == 1) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int col = nt * 8 + 2 * t;
                *reinterpret_cast<float2*>(sX + row * R + col) = make_float2(du[nt][0], du[nt][1]);
                *reinterpret_cast<float2*>(sX + (row + 8) * R + col) = make_float2(du[nt][2], du[nt][3]);
            }
        }
        __syncthreads();
        if (kh == 0) {
            const unsigned m = r0 + rb * BM + row;
            float* out = pu + (static_cast<u64>(blockIdx.x) * rows + m) * R;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int col = nt * 8 + 2 * t;
                if (m < rows)
                    *reinterpret_cast<float2*>(out + col) = make_float2(du[nt][0] + sX[row * R + col], du[nt][1] + sX[row * R + col + 1]);
                if (m + 8 < rows)
                    *reinterpret_cast<float2*>(out + 8 * R + col) =
                        make_float2(du[nt][2] + sX[(row + 8) * R + col], du[nt][3] + sX[(row + 8) * R + col + 1]);
            }
        }
    }
#pragma unroll
    for (int ct = 0; ct < CT; ++ct) {
        const unsigned n = c0 + ct * BN + 16 * warp + g;
        float* out = pb + (static_cast<u64>(blockIdx.y) * cols + n) * R;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int col = nt * 8 + 2 * t;
            if (n < cols) *reinterpret_cast<float2*>(out + col) = make_float2(db[ct][nt][0], db[ct][nt][1]);
            if (n + 8 < cols) *reinterpret_cast<float2*>(out + 8 * R + col) = make_float2(db[ct][nt][2], db[ct][nt][3]);
        }
    }
}

// du (rows of r, ldu apart) = bf16(s·Σ_j pu[j]) over `nc` column chunks, db: [cols, r] = bf16(s·Σ_j pb[j]) over `nr`
// row chunks, j in order; one thread per output element, dU's first.
extern "C" __global__ void lora_grads_finish_bf16(const float* pu, const float* pb, bf16* du, bf16* db, unsigned rows,
                                                  unsigned cols, unsigned r, unsigned ldu, unsigned nc, unsigned nr, float s) {
    const u64 i = thread_index(), nu = static_cast<u64>(rows) * r;
    if (i < nu) {
        float acc = 0.0f;
#pragma unroll 4
        for (unsigned j = 0; j < nc; ++j) acc += pu[j * nu + i];
        du[(i / r) * ldu + i % r] = from_f32<bf16>(s * acc);
    } else if (i < nu + static_cast<u64>(cols) * r) {
        const u64 k = i - nu, nb = static_cast<u64>(cols) * r;
        float acc = 0.0f;
#pragma unroll 4
        for (unsigned j = 0; j < nr; ++j) acc += pb[j * nb + k];
        db[k] = from_f32<bf16>(s * acc);
    }
}

// qlora-rt: hot
extern "C" __global__ void __launch_bounds__(256, 2) lora_grads_r16_bf16(const bf16* dy, const bf16* b, const bf16* u, float* pu, float* pb, unsigned rows, unsigned cols, unsigned ldu, unsigned row_blocks) { lora_grads<16>(dy, b, u, pu, pb, rows, cols, ldu, row_blocks); }
extern "C" __global__ void __launch_bounds__(256, 2) lora_grads_r32_bf16(const bf16* dy, const bf16* b, const bf16* u, float* pu, float* pb, unsigned rows, unsigned cols, unsigned ldu, unsigned row_blocks) { lora_grads<32>(dy, b, u, pu, pb, rows, cols, ldu, row_blocks); }

// r = 64 holds dU's and dB's accumulators for 64 columns (64 registers) and spills a few words at two blocks a
// multiprocessor; the usual ranks are 16 and 32.
extern "C" __global__ void __launch_bounds__(256, 2) lora_grads_r64_bf16(const bf16* dy, const bf16* b, const bf16* u, float* pu, float* pb, unsigned rows, unsigned cols, unsigned ldu, unsigned row_blocks) { lora_grads<64>(dy, b, u, pu, pb, rows, cols, ldu, row_blocks); }
