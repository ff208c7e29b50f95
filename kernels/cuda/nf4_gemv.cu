#include "common.cuh"
#include "nf4_common.cuh"

// Twin of kernels/src/nf4/gemv.rs. x: [m, in] (m ≤ GEMV_MAX_ROWS) times W [out, in] NF4 → y: [m, out], for decoding:
// the weight is read packed (0.5 byte per element, the whole cost at batch 1) and never written out. Designed for
// bandwidth (kernels/NOTES.md "NF4 GEMV"). Three paths, the launcher (kernels/src/cuda/nf4/gemv.rs) picks one:
// - the rows kernels (1 or 2 rows of x; in % 32 == 0, packed and x 16-byte aligned): a warp owns 2 rows of W and
//   walks all their steps of 1024 columns with the next step's loads in flight (nf4_gemv_rows, below);
// - the blocks kernels (3 to 8 rows): a block owns 2 rows of W and its warps split the columns (split-K inside the
//   block), one step at a time, partial sums met in shared memory (nf4_gemv_vector);
// - the scalar kernels, any shape and alignment: a warp per row, an element per lane.
// Shared by the first two: lane l takes a step's columns 32l..32l+31, 16 packed bytes of each row in one
// `ld.global.nc.L1::no_allocate.v4`. A lane's 32 columns lie in one scale block (blocksize ≥ 32, in % 32 == 0), so the
// absmax is read (or rebuilt) once per row and step and factored out: y = Σ_blocks absmax·Σ code[q]·x; blocks whose
// absmax could make a product subnormal (|absmax| < 2^-122, or not finite) take the twin's per-element
// ftz(code·absmax) instead, so flushed products stay flushed. Sums in f32 in a fixed order (per lane, a fixed
// xor-shuffle tree, the block's warps in order): the same bits run to run. Rows m..M-1 of a kernel for M rows of x
// re-read row m - 1 and are not written. LoRA's up-projection rides on the write (GemvLora): y = x·Wᵀ + alpha·U·Bᵀ
// with U = x·Aᵀ [m, r] computed before, so a decoding step's adapted projection is this launch and U's, rounded once.
constexpr unsigned GEMV_MAX_ROWS = 8;
constexpr unsigned GEMV_STEP = 1024;     // columns a warp reads per step: 32 lanes × 32
constexpr unsigned GEMV_MAX_WARPS = 8;   // warps per block of the blocks kernels (the launcher's column split)
constexpr float GEMV_SAFE_ABSMAX = 0x1p-122f;  // |code| ≥ 2^-3.66 for every nonzero code: products stay normal

// Weights are read once: no L1 allocation, so x keeps the L1.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

// The 8 NF4 codes of one word of packed bytes, in element order (byte b: its high nibble, then its low one), from the
// 16-entry table at shared address `table` (256-byte aligned): one PRMT per element puts the byte 4·nibble under the
// table's upper address bytes, so the address needs no add.
__device__ __forceinline__ void decode8(unsigned table, unsigned w, float (&c)[8]) {
    const unsigned hi = (w >> 2) & 0x3c3c3c3cu, lo = (w << 2) & 0x3c3c3c3cu;  // byte b: 4 × nibble
#pragma unroll
    for (unsigned b = 0; b < 4; ++b) {
        asm volatile("ld.shared.f32 %0, [%1];" : "=f"(c[2 * b]) : "r"(__byte_perm(hi, table, 0x7650 + b)));
        asm volatile("ld.shared.f32 %0, [%1];" : "=f"(c[2 * b + 1]) : "r"(__byte_perm(lo, table, 0x7650 + b)));
    }
}

// LoRA's up-projection added to a GEMV's f32 sum before its one rounding: s + alpha·Σ_j u[k, j]·b[o, j] for row k of
// x and output o; rank 0 (no adapter) leaves s. u: [m, ldu] (the projection's columns of a group's U), b: [out, rank].
template <typename T> struct GemvLora {
    const T* u;
    unsigned ldu;
    const T* b;
    unsigned rank;
    float alpha;

    __device__ __forceinline__ float add(float s, unsigned k, unsigned o) const {
        if (rank == 0) return s;
        const T* uk = u + static_cast<u64>(k) * ldu;
        const T* bo = b + static_cast<u64>(o) * rank;
        float t = 0.0f;
        for (unsigned j = 0; j < rank; ++j) t = fmaf(to_f32(uk[j]), to_f32(bo[j]), t);
        return fmaf(alpha, t, s);
    }
};

// A warp's loads for one step: R rows' 16 packed bytes and raw scales (loads only, so that nothing waits on them
// until the step runs); `col` the lane's first column, in_f when the lane's columns are past the row (always, for a
// step ≥ the row's steps).
template <unsigned R, typename Scales> struct GemvLoads {
    uint4 w[R];
    typename Scales::Raw absmax[R];
    unsigned col;
};

template <unsigned R, typename Scales>
__device__ __forceinline__ GemvLoads<R, Scales> gemv_load(const unsigned char* __restrict__ packed,
                                                          const Scales& scales, unsigned o0, unsigned out_f,
                                                          unsigned in_f, unsigned log2_blocksize, unsigned step) {
    GemvLoads<R, Scales> l;
    const unsigned c = step * GEMV_STEP + 32 * (threadIdx.x % 32);
    l.col = c < in_f ? c : in_f;
#pragma unroll
    for (unsigned r = 0; r < R; ++r) {
        l.w[r] = make_uint4(0, 0, 0, 0);
        l.absmax[r] = typename Scales::Raw{};
        if (l.col < in_f) {
            // Rows past the weight repeat its last one (read, never written).
            const u64 e = static_cast<u64>(min(o0 + r, out_f - 1)) * in_f + c;
            l.w[r] = ld_stream16(packed + e / 2);
            l.absmax[r] = scales.raw(e >> log2_blocksize);
        }
    }
    return l;
}

// The absmax of each row of a step's loads, and which rows' absmax is not safe to factor out of their sums: it could
// make a product subnormal (|absmax| < 2^-122) or is not finite. Those rows take the twin's per-element
// ftz(code·absmax), so flushed products stay flushed. Returns whether any row does.
template <unsigned R, typename Scales>
__device__ __forceinline__ bool gemv_absmax(const Scales& scales, const typename Scales::Raw (&raw)[R],
                                            float (&absmax)[R], bool (&exact)[R]) {
    bool any = false;
#pragma unroll
    for (unsigned r = 0; r < R; ++r) {
        absmax[r] = scales.value(raw[r]);
        const float a = fabsf(absmax[r]);
        exact[r] = !(a >= GEMV_SAFE_ABSMAX && a <= 3.40282347e38f);
        any |= exact[r];
    }
    return any;
}

// acc[r][k] += Σ over the lane's 32 columns from `col` of W[o0 + r]·x[k]: codes × x summed per row, times the absmax.
// EXACT (some row's absmax is not safe to factor out): those rows sum the twin's flushed weights instead; a template
// so that the common path carries no per-element select.
template <bool EXACT, typename T, unsigned M, unsigned R>
__device__ __forceinline__ void gemv_step(unsigned code, const uint4 (&w)[R], const float (&absmax)[R],
                                          const bool (&exact)[R], const T* __restrict__ x, unsigned m, unsigned in_f,
                                          unsigned col, float (&acc)[R][M]) {
    float sum[R][M];
#pragma unroll
    for (unsigned r = 0; r < R; ++r) {
#pragma unroll
        for (unsigned k = 0; k < M; ++k) sum[r][k] = 0.0f;
    }
    // Word j of each row is words[r].x after j rotations: with M ≥ 4 rows of x the loop stays rolled, so that one
    // word's x (8·M values) is live at a time instead of all four.
    uint4 words[R];
#pragma unroll
    for (unsigned r = 0; r < R; ++r) words[r] = w[r];
#pragma unroll(M <= 2 ? 4 : 1)
    for (unsigned j = 0; j < 4; ++j) {
        float xv[M][8];
#pragma unroll
        for (unsigned k = 0; k < M; ++k) load8_f32(x + static_cast<u64>(min(k, m - 1)) * in_f + col + 8 * j, xv[k]);
#pragma unroll
        for (unsigned r = 0; r < R; ++r) {
            float c[8];
            decode8(code, words[r].x, c);
            words[r] = make_uint4(words[r].y, words[r].z, words[r].w, 0);
            if (EXACT && exact[r]) {
#pragma unroll
                for (unsigned i = 0; i < 8; ++i) c[i] = flush_subnormal(__fmul_rn(c[i], absmax[r]));
            }
#pragma unroll
            for (unsigned k = 0; k < M; ++k) {
#pragma unroll
                for (unsigned i = 0; i < 8; ++i) sum[r][k] = fmaf(c[i], xv[k][i], sum[r][k]);
            }
        }
    }
#pragma unroll
    for (unsigned r = 0; r < R; ++r) {
#pragma unroll
        for (unsigned k = 0; k < M; ++k)
            acc[r][k] = EXACT && exact[r] ? acc[r][k] + sum[r][k] : fmaf(absmax[r], sum[r][k], acc[r][k]);
    }
}

// The vector path: in % 32 == 0, packed and x 16-byte aligned. Blocks of 32·ksplit threads (ksplit ≤
// GEMV_MAX_WARPS) own rows R·block.. of W; warp w takes the steps w, w + ksplit, ….
template <typename T, typename Scales, unsigned M, unsigned R>
__device__ void nf4_gemv_vector(const unsigned char* __restrict__ packed, Scales scales, const T* __restrict__ x,
                                T* __restrict__ y, unsigned m, unsigned out_f, unsigned in_f, unsigned log2_blocksize,
                                GemvLora<T> lora, unsigned block) {
    __shared__ __align__(256) float code[16];
    __shared__ float partial[GEMV_MAX_WARPS][R * M];
    const unsigned table = static_cast<unsigned>(__cvta_generic_to_shared(code));
    if (table % 256 != 0) __trap();  // decode8's addressing
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, ksplit = blockDim.x / 32;
    const unsigned o0 = block * R, steps = (in_f + GEMV_STEP - 1) / GEMV_STEP;
    grid_dependency_sync();
    // The first loads go out before the tables are staged and the block waits for them.
    GemvLoads<R, Scales> loads = gemv_load<R>(packed, scales, o0, out_f, in_f, log2_blocksize, warp);
    if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
    scales.stage();
    __syncthreads();
    float acc[R][M];
#pragma unroll
    for (unsigned r = 0; r < R; ++r) {
#pragma unroll
        for (unsigned k = 0; k < M; ++k) acc[r][k] = 0.0f;
    }
    for (unsigned step = warp; step < steps; step += ksplit) {
        if (step != warp) loads = gemv_load<R>(packed, scales, o0, out_f, in_f, log2_blocksize, step);
        if (loads.col < in_f) {
            float absmax[R];
            bool exact[R];
            if (gemv_absmax(scales, loads.absmax, absmax, exact)) {
                gemv_step<true>(table, loads.w, absmax, exact, x, m, in_f, loads.col, acc);
            } else {
                gemv_step<false>(table, loads.w, absmax, exact, x, m, in_f, loads.col, acc);
            }
        }
    }
#pragma unroll
    for (unsigned r = 0; r < R; ++r) {
#pragma unroll
        for (unsigned k = 0; k < M; ++k) {
            const float s = warp_sum(acc[r][k]);
            if (lane == 0) partial[warp][r * M + k] = s;
        }
    }
    __syncthreads();
    if (threadIdx.x < R * M) {
        const unsigned r = threadIdx.x / M, k = threadIdx.x % M, o = o0 + r;
        float s = partial[0][threadIdx.x];
        for (unsigned w = 1; w < ksplit; ++w) s += partial[w][threadIdx.x];
        if (o < out_f && k < m) y[static_cast<u64>(k) * out_f + o] = from_f32<T>(lora.add(s, k, o));
    }
}

// Any shape and alignment: one warp per output row (rows block·warps..), one element per lane per step, the twin's
// per-element weights.
template <typename T, typename Scales>
__device__ void nf4_gemv_scalar(const unsigned char* __restrict__ packed, Scales scales, const T* __restrict__ x,
                                T* __restrict__ y, unsigned m, unsigned out_f, unsigned in_f, unsigned log2_blocksize,
                                GemvLora<T> lora, unsigned block) {
    __shared__ float code[16];
    grid_dependency_sync();
    if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
    scales.stage();
    __syncthreads();
    const unsigned lane = threadIdx.x % 32, o = block * (blockDim.x / 32) + threadIdx.x / 32;
    if (o >= out_f) return;
    float acc[GEMV_MAX_ROWS];
#pragma unroll
    for (unsigned r = 0; r < GEMV_MAX_ROWS; ++r) acc[r] = 0.0f;
    const u64 row = static_cast<u64>(o) * in_f;
    for (unsigned i = lane; i < in_f; i += 32) {
        const u64 e = row + i;
        const unsigned byte = packed[e / 2];
        const float w = dequantize_one(code, e % 2 == 0 ? byte >> 4 : byte & 15, scales(e >> log2_blocksize));
#pragma unroll
        for (unsigned r = 0; r < GEMV_MAX_ROWS; ++r) {
            if (r < m) acc[r] += w * to_f32(x[static_cast<u64>(r) * in_f + i]);
        }
    }
#pragma unroll
    for (unsigned r = 0; r < GEMV_MAX_ROWS; ++r) {
        float s = acc[r];
        for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(0xffffffffu, s, d);
        if (lane == 0 && r < m) y[static_cast<u64>(r) * out_f + o] = from_f32<T>(lora.add(s, r, o));
    }
}

// The rows kernels (m ≤ 2; kernels/NOTES.md "NF4 GEMV", the rows kernel): a warp owns R rows of W and walks all of
// their 1024-column steps, the next step's weights and scales in flight while it sums the current one, so the fixed
// costs (tables, barrier, reduction, LoRA term) are paid once per R rows instead of once per step, and the loads
// never stop while the warp computes. Per packed byte: one PRMT and one LEA make the address of its two codes in a
// 256-entry table of (code[hi], code[lo]) pairs and one 8-byte LDS reads them (the blocks kernel spends a PRMT and an
// LDS per element); the table has 16 copies, one per lane of a half-warp (which the hardware serves together for
// 8-byte reads), so any bytes hit 32 distinct banks. x is staged once per block in shared memory, laid out so that a
// warp's reads of one word of 8 values are 512 contiguous bytes (conflict-free) instead of global loads 64 bytes
// apart (half of each sector wasted, measured). Sums: two f32 chains per row of W and of x (even and odd elements),
// then a fixed xor-shuffle tree: the same bits run to run.
constexpr unsigned GEMV_ROWS_WARPS = 8;   // warps per block of the rows kernels
constexpr unsigned GEMV_PAIR_COPIES = 16;

// Entry (v, c) = (code[v >> 4], code[v & 15]) for packed byte v, copy c: element order is the high nibble first.
__device__ __forceinline__ void stage_code_pairs(float2 (&pairs)[256 * GEMV_PAIR_COPIES]) {
    for (unsigned i = threadIdx.x; i < 256 * GEMV_PAIR_COPIES / 2; i += blockDim.x) {
        const unsigned v = i / (GEMV_PAIR_COPIES / 2);
        const float hi = NF4_CODE[v >> 4], lo = NF4_CODE[v & 15];
        reinterpret_cast<float4*>(pairs)[i] = make_float4(hi, lo, hi, lo);
    }
}

// 16-byte units of x per 8 values: 1 (bf16), 2 (f32).
template <typename T> __device__ __forceinline__ constexpr unsigned x_units() { return sizeof(T) / 2; }

// Unit u of the 8 values of word j (columns 8j..8j+7 of the lane's 32) of row k of x, for the lane's columns in step
// `step` (steps per row: `steps`): one index per unit, the warp's 32 lanes adjacent.
template <typename T>
__device__ __forceinline__ unsigned x_unit(unsigned k, unsigned steps, unsigned step, unsigned j, unsigned u,
                                           unsigned lane) {
    return (((k * steps + step) * 4 + j) * x_units<T>() + u) * 32 + lane;
}

// Rows 0..M-1 of x (row k past m repeats row m - 1) into `xs` as x_unit lays them out.
template <typename T, unsigned M>
__device__ __forceinline__ void stage_x(uint4* xs, const T* __restrict__ x, unsigned m, unsigned in_f, unsigned steps) {
    const unsigned units = in_f / 8 * x_units<T>();  // per row of x
    for (unsigned i = threadIdx.x; i < M * units; i += blockDim.x) {
        const unsigned k = i / units, unit = i % units;
        const unsigned col = unit / x_units<T>() * 8, u = unit % x_units<T>();
        xs[x_unit<T>(k, steps, col / GEMV_STEP, col % 32 / 8, u, col % GEMV_STEP / 32)] =
            ld_u4(x + static_cast<u64>(min(k, m - 1)) * in_f + col + 4 * u);
    }
}

template <typename T> __device__ __forceinline__ Raw8<T> x_word(const uint4* xs, unsigned unit0);
template <> __device__ __forceinline__ Raw8<bf16> x_word<bf16>(const uint4* xs, unsigned unit0) {
    return Raw8<bf16>{xs[unit0]};
}
template <> __device__ __forceinline__ Raw8<float> x_word<float>(const uint4* xs, unsigned unit0) {
    return Raw8<float>{xs[unit0], xs[unit0 + 32]};
}

// The codes of packed byte b of `word` from the lane's copy of the pair table (`pairs`: its shared address): the byte
// alone (PRMT), times the 128 bytes of an entry plus the copy's address (one IMAD), one 8-byte LDS. Written out in
// PTX because the compiler, given an array index, multiplies twice (entry, then element size).
__device__ __forceinline__ float2 code_pair(unsigned pairs, unsigned word, unsigned b) {
    float2 c;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];"
                 : "=f"(c.x), "=f"(c.y)
                 : "r"(pairs + __byte_perm(word, 0, 0x4440 + b) * (GEMV_PAIR_COPIES * 8)));
    return c;
}

__device__ __forceinline__ unsigned word_of(const uint4& w, unsigned j) {
    return j == 0 ? w.x : j == 1 ? w.y : j == 2 ? w.z : w.w;
}

// sum[r][k][e] += Σ over the lane's 32 columns of step `step` (e: even or odd elements) of code·x, or of the twin's
// flushed code·absmax·x for EXACT rows (a template, so that the common path carries no per-element select).
template <bool EXACT, typename T, unsigned M, unsigned R>
__device__ __forceinline__ void gemv_rows_step(unsigned pairs, const uint4* xs, unsigned steps, unsigned step,
                                               const uint4 (&w)[R], const float (&absmax)[R], const bool (&exact)[R],
                                               float (&acc)[R][M]) {
    const unsigned lane = threadIdx.x % 32;
    float sum[R][M][2];
#pragma unroll
    for (unsigned r = 0; r < R; ++r) {
#pragma unroll
        for (unsigned k = 0; k < M; ++k) sum[r][k][0] = sum[r][k][1] = 0.0f;
    }
#pragma unroll
    for (unsigned j = 0; j < 4; ++j) {
        float xv[M][8];
#pragma unroll
        for (unsigned k = 0; k < M; ++k) unpack8(x_word<T>(xs, x_unit<T>(k, steps, step, j, 0, lane)), xv[k]);
#pragma unroll
        for (unsigned r = 0; r < R; ++r) {
            const unsigned word = word_of(w[r], j);
#pragma unroll
            for (unsigned b = 0; b < 4; ++b) {
                float2 c = code_pair(pairs, word, b);
                if (EXACT && exact[r]) {
                    c.x = flush_subnormal(__fmul_rn(c.x, absmax[r]));
                    c.y = flush_subnormal(__fmul_rn(c.y, absmax[r]));
                }
#pragma unroll
                for (unsigned k = 0; k < M; ++k) {
                    sum[r][k][0] = fmaf(c.x, xv[k][2 * b], sum[r][k][0]);
                    sum[r][k][1] = fmaf(c.y, xv[k][2 * b + 1], sum[r][k][1]);
                }
            }
        }
    }
#pragma unroll
    for (unsigned r = 0; r < R; ++r) {
#pragma unroll
        for (unsigned k = 0; k < M; ++k) {
            const float s = sum[r][k][0] + sum[r][k][1];
            acc[r][k] = EXACT && exact[r] ? acc[r][k] + s : fmaf(absmax[r], s, acc[r][k]);
        }
    }
}

// The rows path: in % 32 == 0, packed and x 16-byte aligned, blocks of 32·GEMV_ROWS_WARPS threads; warp w of block
// `block` owns rows R·(GEMV_ROWS_WARPS·block + w)... of W. Dynamic shared memory: M·steps·1024 values of x.
template <typename T, typename Scales, unsigned M, unsigned R>
__device__ void nf4_gemv_rows(const unsigned char* __restrict__ packed, Scales scales, const T* __restrict__ x,
                              T* __restrict__ y, unsigned m, unsigned out_f, unsigned in_f, unsigned log2_blocksize,
                              GemvLora<T> lora, unsigned block) {
    __shared__ float2 pairs[256 * GEMV_PAIR_COPIES];
    extern __shared__ uint4 xs[];
    const unsigned lane = threadIdx.x % 32, steps = (in_f + GEMV_STEP - 1) / GEMV_STEP;
    const unsigned o0 = (block * GEMV_ROWS_WARPS + threadIdx.x / 32) * R;
    // The code table reads nothing of the previous kernel's: staged while it finishes (an overlapping launch).
    stage_code_pairs(pairs);
    grid_dependency_sync();
    // The first step's loads go out before the block stages x and waits for it.
    GemvLoads<R, Scales> cur = gemv_load<R>(packed, scales, o0, out_f, in_f, log2_blocksize, 0);
    stage_x<T, M>(xs, x, m, in_f, steps);
    scales.stage();
    __syncthreads();
    if (o0 >= out_f) return;  // the member's last block: warps past its rows
    // The lane's copy of the pair table, as a shared-window address.
    const unsigned lane_pairs =
        static_cast<unsigned>(__cvta_generic_to_shared(pairs)) + 8 * (lane % GEMV_PAIR_COPIES);
    float acc[R][M];
#pragma unroll
    for (unsigned r = 0; r < R; ++r) {
#pragma unroll
        for (unsigned k = 0; k < M; ++k) acc[r][k] = 0.0f;
    }
    for (unsigned step = 0; step < steps; ++step) {
        GemvLoads<R, Scales> next;
        if (step + 1 < steps) next = gemv_load<R>(packed, scales, o0, out_f, in_f, log2_blocksize, step + 1);
        if (cur.col < in_f) {
            float absmax[R];
            bool exact[R];
            if (gemv_absmax(scales, cur.absmax, absmax, exact)) {
                gemv_rows_step<true, T, M, R>(lane_pairs, xs, steps, step, cur.w, absmax, exact, acc);
            } else {
                gemv_rows_step<false, T, M, R>(lane_pairs, xs, steps, step, cur.w, absmax, exact, acc);
            }
        }
        cur = next;
    }
    // LoRA's up-projection spread over the lanes (lane j takes rank index j, j + 32, …), then one tree for both.
    float out = 0.0f;
#pragma unroll
    for (unsigned r = 0; r < R; ++r) {
        const unsigned o = min(o0 + r, out_f - 1);
#pragma unroll
        for (unsigned k = 0; k < M; ++k) {
            float s = acc[r][k];
            if (lora.rank != 0) {
                const T* uk = lora.u + static_cast<u64>(min(k, m - 1)) * lora.ldu;
                const T* bo = lora.b + static_cast<u64>(o) * lora.rank;
                for (unsigned j = lane; j < lora.rank; j += 32) s = fmaf(lora.alpha * to_f32(uk[j]), to_f32(bo[j]), s);
            }
            for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(0xffffffffu, s, d);
            if (lane == r * M + k) out = s;
        }
    }
    const unsigned r = lane / M, k = lane % M;
    if (lane < R * M && o0 + r < out_f && k < m) y[static_cast<u64>(k) * out_f + o0 + r] = from_f32<T>(out);
}

// One weight of a GEMV launch (kernels/src/cuda/nf4/gemv.rs `GemvMember`, the same layout). A launch takes up to
// GEMV_MEMBERS weights that read the same x, a projection group (q/k/v, gate/up), the blocks of weight i after those
// of weight i - 1: one launch's latency and ramp instead of one per weight, and the small weights (k/v_proj) fill the
// wave the large one leaves.
struct GemvMember {
    u64 packed;        // const unsigned char*
    u64 absmax;        // plain: const float*; nested: const unsigned char* qabsmax
    u64 absmax2;       // nested: const float*
    u64 code2;         // nested: const float*
    u64 y;             // T*
    u64 lora_u;        // const T* (GemvLora; rank 0: not read)
    u64 lora_b;        // const T*
    float offset;      // nested
    unsigned out_f;
    unsigned lora_ldu;
    unsigned lora_rank;
    float lora_alpha;
    unsigned blocks_end;  // the launch's blocks up to the end of this weight's
};
constexpr unsigned GEMV_MEMBERS = 3;
struct GemvMembers {
    GemvMember w[GEMV_MEMBERS];
    unsigned count;
};

template <typename Scales> __device__ __forceinline__ Scales member_scales(const GemvMember& w);
template <> __device__ __forceinline__ Absmax member_scales<Absmax>(const GemvMember& w) {
    return Absmax{reinterpret_cast<const float*>(w.absmax)};
}
template <> __device__ __forceinline__ NestedAbsmax member_scales<NestedAbsmax>(const GemvMember& w) {
    return NestedAbsmax{reinterpret_cast<const unsigned char*>(w.absmax), reinterpret_cast<const float*>(w.absmax2),
                        reinterpret_cast<const float*>(w.code2), w.offset};
}

// The weight this block computes (selected, not indexed: a dynamic index would copy the parameters to local memory),
// the block's index among that weight's blocks, and its scales and LoRA term; then PATH (nf4_gemv_vector or
// nf4_gemv_scalar) for it.
#define NF4_GEMV_MEMBER(PATH, T, SCALES)                                                                             \
    GemvMember w = g.w[0];                                                                                           \
    unsigned start = 0;                                                                                              \
    _Pragma("unroll") for (unsigned i = 1; i < GEMV_MEMBERS; ++i) {                                                  \
        if (i < g.count && blockIdx.x >= g.w[i - 1].blocks_end) start = g.w[i - 1].blocks_end, w = g.w[i];           \
    }                                                                                                                \
    const GemvLora<T> lora{reinterpret_cast<const T*>(w.lora_u), w.lora_ldu, reinterpret_cast<const T*>(w.lora_b),   \
                           w.lora_rank, w.lora_alpha};                                                               \
    PATH(reinterpret_cast<const unsigned char*>(w.packed), member_scales<SCALES>(w), x, reinterpret_cast<T*>(w.y), m, \
         w.out_f, in_f, log2_blocksize, lora, blockIdx.x - start)

#define NF4_GEMV_ARGS(T) GemvMembers g, const T *x, unsigned m, unsigned in_f, unsigned log2_blocksize
// The blocks kernels (3 to 8 rows of x): 2 rows of W per block (kernels/src/cuda/nf4/gemv.rs GEMV_BLOCK_ROWS).
#define NF4_GEMV_VECTOR(M) nf4_gemv_vector<T, S, M, 2>

extern "C" __global__ void __launch_bounds__(256) nf4_gemv_m4_f32(NF4_GEMV_ARGS(float)) { using T = float; using S = Absmax; NF4_GEMV_MEMBER(NF4_GEMV_VECTOR(4), T, S); }
extern "C" __global__ void __launch_bounds__(256) nf4_gemv_m4_bf16(NF4_GEMV_ARGS(bf16)) { using T = bf16; using S = Absmax; NF4_GEMV_MEMBER(NF4_GEMV_VECTOR(4), T, S); }
extern "C" __global__ void __launch_bounds__(256) nf4_gemv_m8_f32(NF4_GEMV_ARGS(float)) { using T = float; using S = Absmax; NF4_GEMV_MEMBER(NF4_GEMV_VECTOR(8), T, S); }
extern "C" __global__ void __launch_bounds__(256) nf4_gemv_m8_bf16(NF4_GEMV_ARGS(bf16)) { using T = bf16; using S = Absmax; NF4_GEMV_MEMBER(NF4_GEMV_VECTOR(8), T, S); }
extern "C" __global__ void __launch_bounds__(256) nf4_gemv_nested_m4_f32(NF4_GEMV_ARGS(float)) { using T = float; using S = NestedAbsmax; NF4_GEMV_MEMBER(NF4_GEMV_VECTOR(4), T, S); }
extern "C" __global__ void __launch_bounds__(256) nf4_gemv_nested_m4_bf16(NF4_GEMV_ARGS(bf16)) { using T = bf16; using S = NestedAbsmax; NF4_GEMV_MEMBER(NF4_GEMV_VECTOR(4), T, S); }
extern "C" __global__ void __launch_bounds__(256) nf4_gemv_nested_m8_f32(NF4_GEMV_ARGS(float)) { using T = float; using S = NestedAbsmax; NF4_GEMV_MEMBER(NF4_GEMV_VECTOR(8), T, S); }
extern "C" __global__ void __launch_bounds__(256) nf4_gemv_nested_m8_bf16(NF4_GEMV_ARGS(bf16)) { using T = bf16; using S = NestedAbsmax; NF4_GEMV_MEMBER(NF4_GEMV_VECTOR(8), T, S); }

// The rows kernels (1 or 2 rows of x): 2 rows of W per warp (kernels/src/cuda/nf4/gemv.rs GEMV_WARP_ROWS; 4 measured no
// faster on any 8B shape), at most 80 registers: 3 blocks of 256 threads per multiprocessor.
#define NF4_GEMV_ROWS_PATH(M) nf4_gemv_rows<T, S, M, 2>
extern "C" __global__ void __launch_bounds__(256, 3) nf4_gemv_rows_m1_f32(NF4_GEMV_ARGS(float)) { using T = float; using S = Absmax; NF4_GEMV_MEMBER(NF4_GEMV_ROWS_PATH(1), T, S); }
extern "C" __global__ void __launch_bounds__(256, 3) nf4_gemv_rows_m1_bf16(NF4_GEMV_ARGS(bf16)) { using T = bf16; using S = Absmax; NF4_GEMV_MEMBER(NF4_GEMV_ROWS_PATH(1), T, S); }
extern "C" __global__ void __launch_bounds__(256, 3) nf4_gemv_rows_m2_f32(NF4_GEMV_ARGS(float)) { using T = float; using S = Absmax; NF4_GEMV_MEMBER(NF4_GEMV_ROWS_PATH(2), T, S); }
extern "C" __global__ void __launch_bounds__(256, 3) nf4_gemv_rows_m2_bf16(NF4_GEMV_ARGS(bf16)) { using T = bf16; using S = Absmax; NF4_GEMV_MEMBER(NF4_GEMV_ROWS_PATH(2), T, S); }
extern "C" __global__ void __launch_bounds__(256, 3) nf4_gemv_rows_nested_m1_f32(NF4_GEMV_ARGS(float)) { using T = float; using S = NestedAbsmax; NF4_GEMV_MEMBER(NF4_GEMV_ROWS_PATH(1), T, S); }
extern "C" __global__ void __launch_bounds__(256, 3) nf4_gemv_rows_nested_m1_bf16(NF4_GEMV_ARGS(bf16)) { using T = bf16; using S = NestedAbsmax; NF4_GEMV_MEMBER(NF4_GEMV_ROWS_PATH(1), T, S); }
extern "C" __global__ void __launch_bounds__(256, 3) nf4_gemv_rows_nested_m2_f32(NF4_GEMV_ARGS(float)) { using T = float; using S = NestedAbsmax; NF4_GEMV_MEMBER(NF4_GEMV_ROWS_PATH(2), T, S); }
extern "C" __global__ void __launch_bounds__(256, 3) nf4_gemv_rows_nested_m2_bf16(NF4_GEMV_ARGS(bf16)) { using T = bf16; using S = NestedAbsmax; NF4_GEMV_MEMBER(NF4_GEMV_ROWS_PATH(2), T, S); }

extern "C" __global__ void nf4_gemv_scalar_f32(NF4_GEMV_ARGS(float)) { using T = float; NF4_GEMV_MEMBER(nf4_gemv_scalar, T, Absmax); }
extern "C" __global__ void nf4_gemv_scalar_bf16(NF4_GEMV_ARGS(bf16)) { using T = bf16; NF4_GEMV_MEMBER(nf4_gemv_scalar, T, Absmax); }
extern "C" __global__ void nf4_gemv_scalar_nested_f32(NF4_GEMV_ARGS(float)) { using T = float; NF4_GEMV_MEMBER(nf4_gemv_scalar, T, NestedAbsmax); }
extern "C" __global__ void nf4_gemv_scalar_nested_bf16(NF4_GEMV_ARGS(bf16)) { using T = bf16; NF4_GEMV_MEMBER(nf4_gemv_scalar, T, NestedAbsmax); }
