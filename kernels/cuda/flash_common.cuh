// What the two flash-attention families share: flash_attention.cuh (mma.sync, sm_80 on) and flash_attention_sm90.cuh /
// flash_attention_sm90_backward.cuh (wgmma, sm_90a only) run the same semantics (packed varlen sequences with
// bottom-right alignment, causal masking, GQA without expanding K/V, sliding window, logit softcap, any scale, bf16
// and f16 I/O with f32 accumulation) from the same FlashParams. Here: those parameters, the PTX wrappers both use
// (cp.async for 16-byte global→shared copies that zero-fill past the end of a sequence, the bf16/f16 rounding, the
// fast exp2 and reciprocal), a sequence's geometry and masks, where a block sits in its sequence, and the epilogue
// pieces whose arithmetic the families must agree on (lse, the dK/dV stores). Include after common.cuh and before
// either family's header (the loader splices each `#include` of a .cu, not those of a header).
#pragma once

#define FLASH_LOG2E 1.4426950408889634f
#define FLASH_LN2 0.6931471805599453f

// What both passes read; pointers are device addresses (kernels/src/cuda/attention.rs `FlashParams`, same order).
struct FlashParams {
    const void* q;      // [tq, n_heads, hd]
    const void* k;      // [tk, n_kv_heads, hd]
    const void* v;      // [tk, n_kv_heads, hd]
    void* out;          // [tq, n_heads, hd]: forward's output
    float* lse;         // [tq, n_heads] natural-log log-sum-exp (−∞ for a query that sees no key)
    const void* d_out;  // [tq, n_heads, hd]
    const float* delta; // [tq, n_heads] rowsum(dO ⊙ O) (attention.cu's delta pass)
    float* dq_accum;    // [tq, n_heads, hd] f32, zeroed before the backward and converted after it (attention.cu)
    void* dk;           // [tk, n_kv_heads, hd]
    void* dv;           // [tk, n_kv_heads, hd]
    const int* cu_q;    // [n_seqs + 1]
    const int* cu_k;    // [n_seqs + 1]
    unsigned n_heads, n_kv_heads, head_dim;
    int window;  // 0: none
    float scale, softcap;  // softcap 0: off
    int causal;
    unsigned tq, tk;
    unsigned n_seqs, tiles;  // the launch's sequences and tiles of the longest one (flash_item)
    unsigned pad;
};

// Dynamic shared memory, 16-byte aligned by its element type (every tile row starts on a 16-byte boundary).
struct alignas(16) FlashChunk {
    unsigned w[4];
};
extern __shared__ FlashChunk flash_smem[];

// ---- PTX wrappers --------------------------------------------------------------------------------------------

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

// 16 bytes global → shared; the `16 - bytes` bytes past `bytes` are zero-filled (bytes 0: all zero, nothing read).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, unsigned bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async4(unsigned dst, const void* src, unsigned bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// ldmatrix and mma.sync (sm_80+): the flash kernels' and lora.cu's tensor-core products.
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4): A (16×16, row-major) regs {(g, 2t), (g+8,
// 2t), (g, 2t+8), (g+8, 2t+8)}, each a pair along k; B (16×8) regs {(k 2t, n g), (k 2t+8, n g)}, pairs along k; C
// (16×8 f32) {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.

__device__ __forceinline__ void ldsm_x4(unsigned addr, unsigned (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned addr, unsigned (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
// Two 8×8 matrices; lanes 0–15 give the row addresses.
__device__ __forceinline__ void ldsm_x2(unsigned addr, unsigned& r0, unsigned& r1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2_t(unsigned addr, unsigned& r0, unsigned& r1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(addr));
}

// c += a·b on one m16n8k16 tile, f32 accumulation.
template <typename T> __device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);
template <> __device__ __forceinline__ void mma16816<bf16>(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<f16>(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float ex2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ float rcp(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
    return r;
}
// tanh(x) = 1 − 2/(e^{2x} + 1): absolute error ~1e-7 over the whole line (the cap multiplies it; the CPU twin uses
// libm's tanh), saturating cleanly to ±1.
__device__ __forceinline__ float tanh_fast(float x) { return 1.0f - 2.0f * rcp(ex2(x * (2.0f * FLASH_LOG2E)) + 1.0f); }

__device__ __forceinline__ void red_add(float* p, float v) { asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(p), "f"(v) : "memory"); }

// ---- Geometry ------------------------------------------------------------------------------------------------

// One packed sequence. A sequence whose offsets leave the buffers is skipped (its rows stay unwritten) rather than
// letting a malformed cu_seqlens reach memory past q, k or v.
struct FlashSeq {
    int q0, k0, len_q, len_k;
};

// The flash kernels' grid is (heads, sequences, tiles). Blocks start in about launch order (x fastest) and causal
// tiles differ in work (a query tile's keys grow with its row, a key tile's queries shrink with its column), so the
// tile varies slowest: every head's heaviest tile starts before any head's second heaviest and the grid ends on light
// tiles (longest-processing-time order). With the tiles in x, a head's tiles ran one after another and the last
// heads' heavy tiles ran alone at the end. The head varies fastest, so a KV head's query heads run side by side and
// read its K/V from L2. `tile` 0 is the heaviest: the kernels map it to the last query tile or the first key tile.
// Read from the block index registers, which the compiler re-reads instead of keeping (at 255 registers, computed
// coordinates spilled).
struct FlashBlock {
    int tile, tiles, head, seq;
};
// SEQ_MAJOR: a grid of (heads, tiles, sequences), the sequence slowest. A backward takes it where every sequence
// has the longest lengths (the launcher decides): with the tile slowest its ~132 resident blocks serve every (KV
// head, sequence) at once, whose Q, dO and f32 dQ rows (268 MB at 4 × 2048 tokens, 32 heads) cannot stay in L2; with
// the sequence slowest they share one sequence's, and equal sequences keep the heaviest tiles first within it.
template <bool SEQ_MAJOR = false>
__device__ __forceinline__ FlashBlock flash_block() {
    if constexpr (SEQ_MAJOR)
        return FlashBlock{static_cast<int>(blockIdx.y), static_cast<int>(gridDim.y), static_cast<int>(blockIdx.x),
                          static_cast<int>(blockIdx.z)};
    return FlashBlock{static_cast<int>(blockIdx.z), static_cast<int>(gridDim.z), static_cast<int>(blockIdx.x),
                      static_cast<int>(blockIdx.y)};
}

// A persistent kernel's r-th work item (a 1-D grid of G blocks walks the n_heads × n_seqs × tiles items in
// flash_block's order): block b takes items r·G + b for even r and r·G + G − 1 − b for odd r, so that every block's
// items alternate between heavier and lighter ones (within 3 % of a greedy longest-first schedule on causal grids
// in a simulation, and with no shared counter). False once past the last item.
__device__ __forceinline__ bool flash_item(const FlashParams& p, int r, FlashBlock& out) {
    const unsigned g = gridDim.x, pairs = p.n_heads * p.n_seqs;
    const unsigned long long item = static_cast<unsigned long long>(r) * g + (r % 2 == 0 ? blockIdx.x : g - 1 - blockIdx.x);
    if (item >= static_cast<unsigned long long>(pairs) * p.tiles) return false;
    const unsigned pair = static_cast<unsigned>(item % pairs);
    out = FlashBlock{static_cast<int>(item / pairs), static_cast<int>(p.tiles), static_cast<int>(pair % p.n_heads),
                     static_cast<int>(pair / p.n_heads)};
    return true;
}

__device__ __forceinline__ bool flash_seq(const FlashParams& p, int s, FlashSeq& out) {
    const int q0 = p.cu_q[s], q1 = p.cu_q[s + 1], k0 = p.cu_k[s], k1 = p.cu_k[s + 1];
    if (q0 < 0 || q1 < q0 || static_cast<unsigned>(q1) > p.tq || k0 < 0 || k1 < k0 || static_cast<unsigned>(k1) > p.tk) return false;
    out = FlashSeq{q0, k0, q1 - q0, k1 - k0};
    return true;
}

// Query row r of a sequence sits at position i = r + len_k − len_q (bottom-right) and sees key j when j < len_k,
// (not causal or j ≤ i) and (no window or i − j < window).
__device__ __forceinline__ bool flash_visible(const FlashParams& p, const FlashSeq& s, int r, int j) {
    const int i = r + s.len_k - s.len_q;
    return j < s.len_k && (!p.causal || j <= i) && (p.window == 0 || i - j < p.window);
}

// Scores in log2 units from raw q·k (pre = scale·log2e, or scale/cap with a softcap), and the tanh a softcap kept
// (backward needs 1 − tanh²).
struct ScoreMap {
    float pre, post;  // s2 = post · tanh(pre·x) with a cap, pre·x without
    bool capped;
};
__device__ __forceinline__ ScoreMap score_map(const FlashParams& p) {
    if (p.softcap > 0.0f) return ScoreMap{p.scale / p.softcap, p.softcap * FLASH_LOG2E, true};
    return ScoreMap{p.scale * FLASH_LOG2E, 1.0f, false};
}

// ---- A block's place in its sequence -------------------------------------------------------------------------

// A forward block (grid (n_heads, n_seqs, ⌈max_seqlen_q / BM⌉), tiles taken from the end so that the longest causal
// rows start first) once its sequence s, first query row m0 and heads are known: rows [m0, m1), the strides, and the
// key tiles of BN [n_first, n_last] some of its rows see (tiles entirely outside the causal or window band are never
// visited; none when n_last < n_first). The kernels read the sequence and heads themselves, and return by value keeps
// NVVM's code for them as it was inline.
struct FlashQueryBlock {
    unsigned hd;
    int m1, off;  // off: a query row's key position minus its row (bottom-right alignment)
    u64 q_stride, kv_stride, q_row0;
    const unsigned short *gq, *gk, *gv;  // the block's first Q row; the sequence's first K and V rows of head kvh
    int i_min, i_max, n_first, n_last;   // i: the rows' key positions
};

template <int BM, int BN>
__device__ __forceinline__ FlashQueryBlock flash_query_block(const FlashParams& p, const FlashSeq& s, int m0, int h, int kvh) {
    const unsigned hd = p.head_dim;
    const int m1 = min(m0 + BM, s.len_q), off = s.len_k - s.len_q;
    const u64 q_stride = static_cast<u64>(p.n_heads) * hd, kv_stride = static_cast<u64>(p.n_kv_heads) * hd;
    const u64 q_row0 = (static_cast<u64>(s.q0 + m0) * p.n_heads + h) * hd;
    const unsigned short* gq = static_cast<const unsigned short*>(p.q) + q_row0;
    const unsigned short* gk = static_cast<const unsigned short*>(p.k) + (static_cast<u64>(s.k0) * p.n_kv_heads + kvh) * hd;
    const unsigned short* gv = static_cast<const unsigned short*>(p.v) + (static_cast<u64>(s.k0) * p.n_kv_heads + kvh) * hd;
    const int i_min = m0 + off, i_max = m1 - 1 + off;
    int lo = 0, hi = s.len_k;
    if (p.causal) hi = min(hi, i_max + 1);
    if (p.window) lo = max(lo, i_min - p.window + 1);
    const int n_first = lo / BN, n_last = hi > lo ? (hi - 1) / BN : n_first - 1;
    return FlashQueryBlock{hd, m1, off, q_stride, kv_stride, q_row0, gq, gk, gv, i_min, i_max, n_first, n_last};
}

// A backward block (grid (n_kv_heads, n_seqs, ⌈max_seqlen_k / BN⌉)) once its sequence s, first key n0 and heads are
// known: keys [n0, n1), and the `pairs` (query head of the GQA group, query tile of BM rows) that see some of them,
// pair it being head(it) with rows from row0(it).
template <int BM> struct FlashKeyBlock {
    int kvh, group;
    unsigned hd;
    int n1, off;
    u64 q_stride, kv_stride, kv_row0;
    int m_lo, tiles, pairs;

    __device__ __forceinline__ int head(int it) const { return kvh * group + it / tiles; }
    __device__ __forceinline__ int row0(int it) const { return (m_lo + it % tiles) * BM; }
};

template <int BM, int BN>
__device__ __forceinline__ FlashKeyBlock<BM> flash_key_block(const FlashParams& p, const FlashSeq& s, int n0, int kvh, int group) {
    const unsigned hd = p.head_dim;
    const int n1 = min(n0 + BN, s.len_k), off = s.len_k - s.len_q;
    const u64 q_stride = static_cast<u64>(p.n_heads) * hd, kv_stride = static_cast<u64>(p.n_kv_heads) * hd;
    const u64 kv_row0 = (static_cast<u64>(s.k0 + n0) * p.n_kv_heads + kvh) * hd;
    // Query rows that see some key of this tile.
    int r_lo = 0, r_hi = s.len_q;
    if (p.causal) r_lo = max(0, n0 - off);
    if (p.window) r_hi = min(r_hi, n1 - 1 + p.window - off);
    const int m_lo = r_lo / BM, tiles = r_hi > r_lo ? (r_hi - 1) / BM - m_lo + 1 : 0;
    return FlashKeyBlock<BM>{kvh, group, hd, n1, off, q_stride, kv_stride, kv_row0, m_lo, tiles, group * tiles};
}

// ---- Epilogue pieces -----------------------------------------------------------------------------------------

// A row's sum over the four lanes of a quad, each of which holds a partial one.
__device__ __forceinline__ float flash_quad_sum(float sum) {
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    return sum;
}

// Row r of a forward block's natural-log lse from its running max (log2 units) and total, by the quad's first lane
// (t = lane % 4 = 0): −∞ for a row that saw no key.
__device__ __forceinline__ void flash_store_lse(const FlashParams& p, const FlashSeq& s, int m0, int h, int t, int r, float m, float sum) {
    if (t == 0 && m0 + r < s.len_q) p.lse[static_cast<u64>(s.q0 + m0 + r) * p.n_heads + h] = sum > 0.0f ? (m + __log2f(sum)) * FLASH_LN2 : f32_neg_inf();
}

// dK and dV of columns c, c + 1 of key row r (rows `stride` apart from dk, dv), each pair packed to T: one 4-byte store
// when both columns are inside the row and aligned, else the columns below hd one by one.
__device__ __forceinline__ void flash_store_kv_pair(unsigned short* dk, unsigned short* dv, int r, u64 stride, unsigned c, unsigned hd, unsigned pk,
                                                    unsigned pv) {
    if (hd % 2 == 0 && c + 1 < hd) {
        *reinterpret_cast<unsigned*>(dk + r * stride + c) = pk;
        *reinterpret_cast<unsigned*>(dv + r * stride + c) = pv;
    } else {
        if (c < hd) {
            dk[r * stride + c] = static_cast<unsigned short>(pk & 0xffffu);
            dv[r * stride + c] = static_cast<unsigned short>(pv & 0xffffu);
        }
        if (c + 1 < hd) {
            dk[r * stride + c + 1] = static_cast<unsigned short>(pk >> 16);
            dv[r * stride + c + 1] = static_cast<unsigned short>(pv >> 16);
        }
    }
}
