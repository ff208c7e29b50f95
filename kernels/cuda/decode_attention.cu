// Split-KV decode attention (flash-decoding): the forward of kernels/src/attention.rs for sequences of a few queries
// against a long KV cache, with flash_common.cuh's FlashParams and semantics (packed varlen sequences, bottom-right
// causal alignment, GQA, sliding window, softcap, any scale; bf16 and f16 I/O, f32 scores, softmax and P·V sums).
//
// The flash forward gives a block one query head and 64–128 query rows, so at decode its grid is n_heads × n_seqs
// blocks, each walking the whole cache alone and reading every KV head once per query head of its group. Here a
// block owns (a split of the keys, a KV head and 16 query rows, a sequence): row ρ = token·group + head within the
// group, so the rows of all the group's heads share one m16n8k16 tile and K and V are read once per KV head (a
// sequence with more than 16 rows takes more blocks along y). The host (kernels/src/cuda/attention/decode.rs) picks
// the number of splits so that about one block per multiprocessor streams the cache; each split writes its O,
// normalised by its own sum, and its lse (log2 units) to f32 scratch, and decode_combine merges the splits in split
// order, so the result has the same bits on every run. With one split the block writes out and lse itself.
//
// Inside a block four warps share the query tile (shared memory, read by ldmatrix) and take 16 keys each of every
// 64-key stage; K and V stages are copied with 16-byte cp.async, one stage ahead of the one being used. Scores, the
// online softmax (exp2 with the scale folded in, P rounded to T before P·V as in the flash kernels) and P·V run per
// warp on mma.sync; at the end the warps' (max, sum, O) meet in shared memory in warp order.
#include "common.cuh"
#include "flash_common.cuh"
#include "flash_attention.cuh"

#define DECODE_WARPS 4
#define DECODE_ROWS 16
#define DECODE_BN (16 * DECODE_WARPS)
#define DECODE_STAGES 2

// The splits and the block layout (kernels/src/cuda/attention/decode.rs `DecodeSplits`, same order).
struct DecodeSplits {
    float* o_part;       // [n_splits, tq·n_heads, hd]: each split's O normalised by its own sum (zeros if it saw no key)
    float* lse_part;     // [n_splits, tq·n_heads]: each split's lse in log2 units (−∞ if it saw no key)
    int keys_per_split;  // split x starts x·keys_per_split keys into the block's visible band; the last takes the rest
    int n_splits;        // 1: the blocks write out and lse, and there is no scratch
    int chunks;          // blocks of DECODE_ROWS rows per KV head and sequence: grid y = n_kv_heads·chunks
    int pad;
};

// The [tq, n_heads] row of a block's row ρ (token ρ / group, query head kvh·group + ρ % group).
__device__ __forceinline__ u64 decode_row(const FlashParams& p, const FlashSeq& s, int kvh, int group, int rho) {
    return static_cast<u64>(s.q0 + rho / group) * p.n_heads + kvh * group + rho % group;
}

// Rows ρ0 … ρ0 + n_rows − 1 of q into shared [DECODE_ROWS][D + 8]; other rows and columns ≥ hd become zeros. The rows
// are not evenly spaced (a token's group of heads, then the next token's), so each is addressed on its own;
// asynchronous when rows are 16-byte aligned (hd % 8 == 0), as load_tile.
template <int D, int THREADS>
__device__ __forceinline__ void decode_load_q(unsigned short* dst, const FlashParams& p, const FlashSeq& s, int kvh, int group, int rho0,
                                              int n_rows) {
    constexpr int SD = D + 8, CH = D / 8;
    const unsigned hd = p.head_dim;
    const unsigned short* q = static_cast<const unsigned short*>(p.q);
    if (hd % 8 == 0) {
        const unsigned base = smem_u32(dst);
        for (int c = threadIdx.x; c < DECODE_ROWS * CH; c += THREADS) {
            const int r = c / CH, col = (c % CH) * 8;
            const bool in = r < n_rows && static_cast<unsigned>(col) < hd;
            cp_async16(base + 2u * (r * SD + col), in ? q + decode_row(p, s, kvh, group, rho0 + r) * hd + col : q, in ? 16u : 0u);
        }
    } else {
        for (int e = threadIdx.x; e < DECODE_ROWS * D; e += THREADS) {
            const int r = e / D, col = e % D;
            const bool in = r < n_rows && static_cast<unsigned>(col) < hd;
            dst[r * SD + col] = in ? q[decode_row(p, s, kvh, group, rho0 + r) * hd + col] : 0;
        }
    }
}

// The online softmax of one warp's 16 keys for its 16 rows: raw scores `acc` (two 8-key tiles) become P, rounded to T
// as the A fragment `pf` of P·V, and the running max (log2 units), the lane's partial sums and O are rescaled, as
// flash_attention.cuh's softmax_tile does for the flash forward. That function's mask is flash_visible of a row
// index, which is no key position here (row ρ is token ρ / group), and giving it a mask parameter moved ptxas's
// register allocation of the flash forwards (d256 spilled on sm_90a), so this is its one-tile copy. MASK: some key is
// not visible: key j0 + 8·nt + e % 2 is, for the lane's rows g and g + 8 at key positions pos[0] and pos[1], when it
// is before the split's end b and inside the causal and window bounds.
template <typename T, int DT, bool MASK, bool CAP>
__device__ __forceinline__ void decode_softmax(float (&acc)[2][4], unsigned (&pf)[4], float (&o)[DT][4], float (&row_max)[2], float (&row_sum)[2],
                                               const ScoreMap& sm, const FlashParams& p, const int (&pos)[2], int j0, int b) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float x = acc[nt][e];
            if (CAP) x = sm.post * tanh_fast(sm.pre * x);
            const int i = pos[e / 2], j = j0 + nt * 8 + e % 2;
            if (MASK && !(j < b && (!p.causal || j <= i) && (p.window == 0 || i - j < p.window))) x = f32_neg_inf();
            acc[nt][e] = x;
        }
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float mx = fmaxf(fmaxf(acc[0][2 * hr], acc[0][2 * hr + 1]), fmaxf(acc[1][2 * hr], acc[1][2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(row_max[hr], CAP ? mx : mx * sm.pre);
        // A row that has seen no key keeps max −∞; subtracting 0 then leaves every exp2 at 0, not NaN.
        const float base = m_new == f32_neg_inf() ? 0.0f : m_new;
        const float corr = ex2(row_max[hr] - base);
        row_max[hr] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            const float x0 = acc[nt][2 * hr], x1 = acc[nt][2 * hr + 1];
            const float p0 = CAP ? ex2(x0 - base) : ex2(fmaf(x0, sm.pre, -base));
            const float p1 = CAP ? ex2(x1 - base) : ex2(fmaf(x1, sm.pre, -base));
            sum += p0 + p1;
            pf[2 * nt + hr] = pack2<T>(p0, p1);
        }
        row_sum[hr] = row_sum[hr] * corr + sum;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            o[dt][2 * hr] *= corr;
            o[dt][2 * hr + 1] *= corr;
        }
    }
}

// Grid (n_splits, n_kv_heads·chunks, n_seqs), DECODE_WARPS warps. Dynamic shared memory: the query tile and
// DECODE_STAGES stages of K and V, (DECODE_ROWS + 2·DECODE_STAGES·DECODE_BN)·(D + 8)·2 bytes; the warps' results
// reuse the stages at the end.
template <typename T, int D>
__device__ __forceinline__ void decode_attention(const FlashParams p, const DecodeSplits ds) {
    constexpr int SD = D + 8, BN = DECODE_BN, S = DECODE_STAGES, THREADS = 32 * DECODE_WARPS, DT = D / 8, SO = D + 8;
    static_assert(D % 16 == 0, "head tile");
    grid_dependency_sync();
    static_assert(DECODE_WARPS * DECODE_ROWS * SO * 4 + 2 * DECODE_WARPS * DECODE_ROWS * 4 <= S * 2 * BN * SD * 2, "merge fits the stages");
    unsigned short* sQ = reinterpret_cast<unsigned short*>(flash_smem);
    unsigned short* sKV = sQ + DECODE_ROWS * SD;  // stage i: K [BN][SD] at 2·BN·SD·i, V [BN][SD] after it

    FlashSeq s;
    if (!flash_seq(p, blockIdx.z, s)) return;
    const int group = p.n_heads / p.n_kv_heads, kvh = blockIdx.y / ds.chunks, rho0 = (blockIdx.y % ds.chunks) * DECODE_ROWS;
    if (rho0 / group >= s.len_q) return;
    const long long rows_left = static_cast<long long>(s.len_q) * group - rho0;
    const int n_rows = rows_left < DECODE_ROWS ? static_cast<int>(rows_left) : DECODE_ROWS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int lr = lane % 8, lq = (lane / 8) % 2, lh = lane / 16;
    const unsigned hd = p.head_dim;

    // The keys some row of the block sees (positions i_min … i_max, bottom-right), and this split's part of them.
    const int off = s.len_k - s.len_q, i_min = rho0 / group + off, i_max = (rho0 + n_rows - 1) / group + off;
    int lo = 0, hi = s.len_k;
    if (p.causal) hi = min(hi, i_max + 1);
    if (p.window) lo = max(lo, i_min - p.window + 1);
    const long long start = lo + static_cast<long long>(blockIdx.x) * ds.keys_per_split;
    const int a = start < hi ? static_cast<int>(start) : hi;
    const int b = blockIdx.x + 1 == ds.n_splits ? hi : static_cast<int>(min(static_cast<long long>(hi), start + ds.keys_per_split));
    const int n_tiles = b > a ? (b - a + BN - 1) / BN : 0;

    const u64 kv_stride = static_cast<u64>(p.n_kv_heads) * hd, kv0 = (static_cast<u64>(s.k0) * p.n_kv_heads + kvh) * hd;
    const unsigned short* gk = static_cast<const unsigned short*>(p.k) + kv0;
    const unsigned short* gv = static_cast<const unsigned short*>(p.v) + kv0;
    auto load_stage = [&](int it) {
        const int n0 = a + it * BN;
        unsigned short* st = sKV + (it % S) * 2 * BN * SD;
        load_tile<BN, D, THREADS>(st, gk + static_cast<u64>(n0) * kv_stride, kv_stride, b - n0, hd);
        load_tile<BN, D, THREADS>(st + BN * SD, gv + static_cast<u64>(n0) * kv_stride, kv_stride, b - n0, hd);
    };
    decode_load_q<D, THREADS>(sQ, p, s, kvh, group, rho0, n_rows);
    for (int it = 0; it < S - 1; ++it) {
        if (it < n_tiles) load_stage(it);
        cp_async_commit();
    }

    float o[DT][4];
    float row_max[2] = {f32_neg_inf(), f32_neg_inf()}, row_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    const ScoreMap sm = score_map(p);
    // The lane's rows' key positions; a row past the block's last stays inside [i_min, i_max] and is never stored.
    const int pos[2] = {min(rho0 + g, rho0 + n_rows - 1) / group + off, min(rho0 + g + 8, rho0 + n_rows - 1) / group + off};
    // ldmatrix row addresses as in flash_forward: Q as A, the warp's 16 keys of K as B, of V as B transposed.
    const unsigned aQ = smem_u32(sQ) + 2u * ((lr + 8 * lq) * SD + 8 * lh);
    const unsigned bK = smem_u32(sKV) + 2u * ((warp * 16 + lr + 8 * lh) * SD + 8 * lq);
    const unsigned bV = smem_u32(sKV) + 2u * (BN * SD + (warp * 16 + lr + 8 * lq) * SD + 8 * lh);

    for (int it = 0; it < n_tiles; ++it) {
        if (it + S - 1 < n_tiles) load_stage(it + S - 1);
        cp_async_commit();
        cp_async_wait<S - 1>();
        __syncthreads();
        const unsigned stage = 2u * (it % S) * 2 * BN * SD;

        float acc[2][4] = {};
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned qa[4], kb[4];
            ldsm_x4(aQ + 32u * kk, qa);
            ldsm_x4(stage + bK + 32u * kk, kb);
            mma16816<T>(acc[0], qa, kb[0], kb[1]);
            mma16816<T>(acc[1], qa, kb[2], kb[3]);
        }
        unsigned pf[4];
        const int n0 = a + it * BN, j0 = n0 + warp * 16 + 2 * t;
        const bool full = n0 + BN <= b && (!p.causal || n0 + BN - 1 <= i_min) && (p.window == 0 || i_max - n0 < p.window);
        if (full) {
            if (sm.capped) decode_softmax<T, DT, false, true>(acc, pf, o, row_max, row_sum, sm, p, pos, j0, b);
            else decode_softmax<T, DT, false, false>(acc, pf, o, row_max, row_sum, sm, p, pos, j0, b);
        } else {
            if (sm.capped) decode_softmax<T, DT, true, true>(acc, pf, o, row_max, row_sum, sm, p, pos, j0, b);
            else decode_softmax<T, DT, true, false>(acc, pf, o, row_max, row_sum, sm, p, pos, j0, b);
        }
#pragma unroll
        for (int db = 0; db < DT / 2; ++db) {
            unsigned vb[4];
            ldsm_x4_t(stage + bV + 32u * db, vb);
            mma16816<T>(o[2 * db], pf, vb[0], vb[1]);
            mma16816<T>(o[2 * db + 1], pf, vb[2], vb[3]);
        }
        __syncthreads();  // every warp is done with this stage before it is loaded again
    }
    cp_async_wait<0>();
    __syncthreads();  // with no key at all, other threads' copies of Q may have been in flight until here

    // The warps' running max (log2 units), sums and unnormalised O into shared memory, then merged row by row in warp
    // order: O = Σ_w 2^(m_w − m)·O_w / Σ_w 2^(m_w − m)·l_w.
    float* sO = reinterpret_cast<float*>(sKV);  // [DECODE_WARPS][DECODE_ROWS][SO]
    float* sM = sO + DECODE_WARPS * DECODE_ROWS * SO;
    float* sL = sM + DECODE_WARPS * DECODE_ROWS;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int r = warp * DECODE_ROWS + g + 8 * hr;
        const float sum = flash_quad_sum(row_sum[hr]);
        if (t == 0) {
            sM[r] = row_max[hr];
            sL[r] = sum;
        }
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) *reinterpret_cast<float2*>(sO + r * SO + dt * 8 + 2 * t) = make_float2(o[dt][2 * hr], o[dt][2 * hr + 1]);
    }
    __syncthreads();
    const u64 rows = static_cast<u64>(p.tq) * p.n_heads;
    for (int e = threadIdx.x; e < n_rows * D; e += THREADS) {
        const int r = e / D, c = e % D;
        if (static_cast<unsigned>(c) >= hd) continue;
        float mx = f32_neg_inf();
#pragma unroll
        for (int w = 0; w < DECODE_WARPS; ++w) mx = fmaxf(mx, sM[w * DECODE_ROWS + r]);
        // No warp saw a key: every factor is then 2^−∞ = 0, not NaN.
        const float base = mx == f32_neg_inf() ? 0.0f : mx;
        float sum = 0.0f, acc = 0.0f;
#pragma unroll
        for (int w = 0; w < DECODE_WARPS; ++w) {
            const float f = ex2(sM[w * DECODE_ROWS + r] - base);
            sum += sL[w * DECODE_ROWS + r] * f;
            acc += sO[(w * DECODE_ROWS + r) * SO + c] * f;
        }
        const float val = sum > 0.0f ? acc / sum : 0.0f, lse2 = sum > 0.0f ? mx + __log2f(sum) : f32_neg_inf();
        const u64 row = decode_row(p, s, kvh, group, rho0 + r);
        if (ds.n_splits == 1) {
            static_cast<T*>(p.out)[row * hd + c] = from_f32<T>(val);
            if (c == 0) p.lse[row] = lse2 * FLASH_LN2;
        } else {
            const u64 part = blockIdx.x * rows + row;
            ds.o_part[part * hd + c] = val;
            if (c == 0) ds.lse_part[part] = lse2;
        }
    }
}

// Grid (⌈max_seqlen_q·n_heads / DECODE_WARPS⌉, n_seqs), DECODE_WARPS warps: a warp merges the splits of one row
// (token·n_heads + head) of a sequence, in split order: lse = log Σ_i 2^lse_i, out = Σ_i 2^(lse_i − lse)·O_i. Lane l
// keeps columns l, l + 32, … (MAX_HEAD_DIM = 256: eight).
template <typename T>
__device__ __forceinline__ void decode_combine(const FlashParams p, const DecodeSplits ds) {
    constexpr int CPL = 8;
    grid_dependency_sync();
    FlashSeq s;
    if (!flash_seq(p, blockIdx.y, s)) return;
    const u64 r = static_cast<u64>(blockIdx.x) * DECODE_WARPS + threadIdx.x / 32;
    if (r >= static_cast<u64>(s.len_q) * p.n_heads) return;
    // A row past the row blocks decode_attention ran (a sequence longer than max_seqlen_q) stays unwritten, as there.
    const unsigned group = p.n_heads / p.n_kv_heads;
    if (r / p.n_heads * group + r % p.n_heads % group >= static_cast<u64>(ds.chunks) * DECODE_ROWS) return;
    const int lane = threadIdx.x % 32;
    const unsigned hd = p.head_dim;
    const u64 rows = static_cast<u64>(p.tq) * p.n_heads, row = static_cast<u64>(s.q0) * p.n_heads + r;
    float mx = f32_neg_inf();
    for (int i = lane; i < ds.n_splits; i += 32) mx = fmaxf(mx, ds.lse_part[i * rows + row]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float base = mx == f32_neg_inf() ? 0.0f : mx;
    float sum = 0.0f, acc[CPL] = {};
    for (int i = 0; i < ds.n_splits; ++i) {
        const float w = ex2(ds.lse_part[i * rows + row] - base);
        const float* part = ds.o_part + (i * rows + row) * hd;
        sum += w;
#pragma unroll
        for (int k = 0; k < CPL; ++k)
            if (lane + 32u * k < hd) acc[k] += w * part[lane + 32 * k];
    }
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    T* out = static_cast<T*>(p.out) + row * hd;
#pragma unroll
    for (int k = 0; k < CPL; ++k)
        if (lane + 32u * k < hd) out[lane + 32 * k] = from_f32<T>(acc[k] * inv);
    if (lane == 0) p.lse[row] = sum > 0.0f ? (mx + __log2f(sum)) * FLASH_LN2 : f32_neg_inf();
}

// One decode kernel per padded head_dim (kernels/src/cuda/attention/decode.rs `KERNELS`), bf16 and f16.
// qlora-rt: hot
extern "C" __global__ void __launch_bounds__(128) decode_attention_d32_bf16(const FlashParams p, const DecodeSplits ds) { decode_attention<bf16, 32>(p, ds); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_d32_f16(const FlashParams p, const DecodeSplits ds) { decode_attention<f16, 32>(p, ds); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_d64_bf16(const FlashParams p, const DecodeSplits ds) { decode_attention<bf16, 64>(p, ds); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_d64_f16(const FlashParams p, const DecodeSplits ds) { decode_attention<f16, 64>(p, ds); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_d80_bf16(const FlashParams p, const DecodeSplits ds) { decode_attention<bf16, 80>(p, ds); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_d80_f16(const FlashParams p, const DecodeSplits ds) { decode_attention<f16, 80>(p, ds); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_d96_bf16(const FlashParams p, const DecodeSplits ds) { decode_attention<bf16, 96>(p, ds); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_d96_f16(const FlashParams p, const DecodeSplits ds) { decode_attention<f16, 96>(p, ds); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_d128_bf16(const FlashParams p, const DecodeSplits ds) { decode_attention<bf16, 128>(p, ds); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_d128_f16(const FlashParams p, const DecodeSplits ds) { decode_attention<f16, 128>(p, ds); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_d256_bf16(const FlashParams p, const DecodeSplits ds) { decode_attention<bf16, 256>(p, ds); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_d256_f16(const FlashParams p, const DecodeSplits ds) { decode_attention<f16, 256>(p, ds); }
extern "C" __global__ void __launch_bounds__(128) decode_combine_bf16(const FlashParams p, const DecodeSplits ds) { decode_combine<bf16>(p, ds); }
extern "C" __global__ void __launch_bounds__(128) decode_combine_f16(const FlashParams p, const DecodeSplits ds) { decode_combine<f16>(p, ds); }
