// Flash attention on tensor cores (FlashAttention-2's algorithm), forward and backward, for bf16 and f16 I/O with
// f32 accumulation: the training path's twin of kernels/src/attention.rs, with flash_common.cuh's parameters and
// semantics. The f32 reference kernels stay in attention.cu. Include after common.cuh and flash_common.cuh.
//
// Each flash_attention_d<D>.cu instantiates the templates below for one padded head_dim D (a multiple of 16; a head
// of hd < D elements is zero-padded in shared memory, so one instantiation serves every hd in (previous D, D]).
// ldmatrix loads the operand fragments, mma.sync.m16n8k16 (sm_80+) computes the products.
//
// Shared-memory tiles are row-major with rows of D + 8 elements: the 16 pad bytes shift consecutive rows by four
// banks, so the eight 16-byte rows one ldmatrix phase reads hit 32 distinct banks for every D used here.
//
// Fragment layouts: flash_common.cuh, beside the mma wrappers. Two C tiles side by side are exactly one A tile,
// which is how P goes from the score accumulators into the P·V product without touching shared memory.
#pragma once

// ---- Tile copies ---------------------------------------------------------------------------------------------

// Rows [0, ROWS) of a head's [tokens, heads, hd] slice starting at `g` (rows `stride` elements apart) into shared
// memory [ROWS][D + 8] at `dst`; rows ≥ nrows and columns ≥ hd become zeros. Asynchronous (cp.async) when rows are
// 16-byte aligned (hd % 8 == 0); otherwise element by element (tiny test heads only).
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_tile(unsigned short* dst, const unsigned short* g, u64 stride, int nrows, unsigned hd) {
    constexpr int SD = D + 8, CH = D / 8;
    if (hd % 8 == 0) {
        const unsigned base = smem_u32(dst);
        for (int c = threadIdx.x; c < ROWS * CH; c += THREADS) {
            const int r = c / CH, col = (c % CH) * 8;
            const bool in = r < nrows && static_cast<unsigned>(col) < hd;
            cp_async16(base + 2u * (r * SD + col), in ? g + r * stride + col : g, in ? 16u : 0u);
        }
    } else {
        for (int e = threadIdx.x; e < ROWS * D; e += THREADS) {
            const int r = e / D, col = e % D;
            dst[r * SD + col] = (r < nrows && static_cast<unsigned>(col) < hd) ? g[r * stride + col] : 0;
        }
    }
}

// One f32 per row, rows `stride` apart, into shared memory; rows ≥ nrows become 0.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_row_values(float* dst, const float* g, u64 stride, int nrows) {
    const unsigned base = smem_u32(dst);
    for (int r = threadIdx.x; r < ROWS; r += THREADS) cp_async4(base + 4u * r, r < nrows ? g + r * stride : g, r < nrows ? 4u : 0u);
}

// Shared [ROWS][D + 8] (rows < nrows, columns < hd) → a head's [tokens, heads, hd] slice at `g`.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void store_tile(unsigned short* g, u64 stride, const unsigned short* src, int nrows, unsigned hd) {
    constexpr int SD = D + 8, CH = D / 8;
    if (hd % 8 == 0) {
        for (int c = threadIdx.x; c < ROWS * CH; c += THREADS) {
            const int r = c / CH, col = (c % CH) * 8;
            if (r < nrows && static_cast<unsigned>(col) < hd)
                *reinterpret_cast<FlashChunk*>(g + r * stride + col) = *reinterpret_cast<const FlashChunk*>(src + r * SD + col);
        }
    } else {
        for (int e = threadIdx.x; e < ROWS * D; e += THREADS) {
            const int r = e / D, col = e % D;
            if (r < nrows && static_cast<unsigned>(col) < hd) g[r * stride + col] = src[r * SD + col];
        }
    }
}

// One key tile of the forward's online softmax: raw scores `acc` (this warp's MT row tiles × BN keys) become P,
// rounded to T as A fragments `pf` of P·V; the running max (log2 units), the per-lane partial row sums and O are
// rescaled. MASK: some (row, key) pair of the tile is not visible; CAP: a softcap bends the scores first. Without a
// cap the scale folds into one fused multiply-add per score: p = 2^(x·pre − max). r0 is the lane's first row (row g
// of the warp's first tile) and j0 its first key column (2t of the tile).
template <typename T, int MT, int NT, int DT, bool MASK, bool CAP>
__device__ __forceinline__ void softmax_tile(float (&acc)[MT][NT][4], unsigned (&pf)[MT][NT / 2][4], float (&o)[MT][DT][4],
                                             float (&row_max)[MT][2], float (&row_sum)[MT][2], const ScoreMap& sm,
                                             const FlashParams& p, const FlashSeq& s, int r0, int j0) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        if (CAP || MASK) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float x = acc[mt][nt][e];
                    if (CAP) x = sm.post * tanh_fast(sm.pre * x);
                    if (MASK && !flash_visible(p, s, r0 + mt * 16 + 8 * (e / 2), j0 + nt * 8 + (e % 2))) x = f32_neg_inf();
                    acc[mt][nt][e] = x;
                }
        }
        // Rows g and g + 8 of the tile; the four lanes of a quad share a row.
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            float mx = f32_neg_inf();
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(acc[mt][nt][2 * hr], acc[mt][nt][2 * hr + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // Capped scores are in log2 units already; raw ones scale by pre > 0, which keeps the max.
            const float m_new = fmaxf(row_max[mt][hr], CAP ? mx : mx * sm.pre);
            // A row that has seen no key yet keeps max −∞; subtracting 0 then leaves every exp2 at 0, not NaN.
            const float base = m_new == f32_neg_inf() ? 0.0f : m_new;
            const float corr = ex2(row_max[mt][hr] - base);
            row_max[mt][hr] = m_new;
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const float x0 = acc[mt][nt][2 * hr], x1 = acc[mt][nt][2 * hr + 1];
                const float p0 = CAP ? ex2(x0 - base) : ex2(fmaf(x0, sm.pre, -base));
                const float p1 = CAP ? ex2(x1 - base) : ex2(fmaf(x1, sm.pre, -base));
                sum += p0 + p1;
                // Rounded to T at once: P lives on as A fragments of P·V (tile nt/2, half nt%2, row half hr).
                pf[mt][nt / 2][2 * (nt % 2) + hr] = pack2<T>(p0, p1);
            }
            row_sum[mt][hr] = row_sum[mt][hr] * corr + sum;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                o[mt][dt][2 * hr] *= corr;
                o[mt][dt][2 * hr + 1] *= corr;
            }
        }
    }
}

// ---- Forward -------------------------------------------------------------------------------------------------

// Grid (n_heads, n_seqs, ⌈max_seqlen_q / BM⌉), W warps; each warp owns BM / W query rows (MT tiles of 16). Key tiles
// of BN stream through one K and one V buffer: V(n) loads while S = Q·K(n)ᵀ runs, K(n − 1) while the softmax and
// P·V(n) run. Tiles are visited from the last (the diagonal, masked) to the first, and block x is taken from the
// end so that the longest causal rows start first. Dynamic shared memory: (BM + 2·BN)·(D + 8)·2 bytes.
template <typename T, int D, int BM, int BN, int W>
__device__ __forceinline__ void flash_forward(const FlashParams p) {
    constexpr int SD = D + 8, THREADS = 32 * W, MT = BM / (16 * W), NT = BN / 8, DT = D / 8;
    static_assert(BM % (16 * W) == 0 && BN % 16 == 0 && D % 16 == 0, "tile shape");
    unsigned short* smem = reinterpret_cast<unsigned short*>(flash_smem);
    unsigned short* sQ = smem;
    unsigned short* sK = sQ + BM * SD;
    unsigned short* sV = sK + BN * SD;

    const FlashBlock b = flash_block();
    FlashSeq s;
    if (!flash_seq(p, b.seq, s)) return;
    const int m0 = (b.tiles - 1 - b.tile) * BM;
    if (m0 >= s.len_q) return;
    const int h = b.head, kvh = h / (p.n_heads / p.n_kv_heads);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const FlashQueryBlock blk = flash_query_block<BM, BN>(p, s, m0, h, kvh);

    load_tile<BM, D, THREADS>(sQ, blk.gq, blk.q_stride, blk.m1 - m0, blk.hd);
    if (blk.n_last >= blk.n_first) load_tile<BN, D, THREADS>(sK, blk.gk + static_cast<u64>(blk.n_last) * BN * blk.kv_stride, blk.kv_stride, s.len_k - blk.n_last * BN, blk.hd);
    cp_async_commit();

    float o[MT][DT][4];
    float row_max[MT][2], row_sum[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.0f;
        row_max[mt][0] = row_max[mt][1] = f32_neg_inf();
        row_sum[mt][0] = row_sum[mt][1] = 0.0f;
    }
    const ScoreMap sm = score_map(p);
    // Per-lane ldmatrix row offsets: A tiles (Q) take rows lane%8 + 8·((lane/8)%2), columns 8·(lane/16); B tiles
    // from K (non-transposed) rows lane%8 + 8·(lane/16), columns 8·((lane/8)%2); B tiles from V (transposed) rows
    // lane%8 + 8·((lane/8)%2), columns 8·(lane/16).
    const int lr = lane % 8, lq = (lane / 8) % 2, lh = lane / 16;
    const unsigned aQ = smem_u32(sQ) + 2u * ((warp * MT * 16 + lr + 8 * lq) * SD + 8 * lh);
    const unsigned bK = smem_u32(sK) + 2u * ((lr + 8 * lh) * SD + 8 * lq);
    const unsigned bV = smem_u32(sV) + 2u * ((lr + 8 * lq) * SD + 8 * lh);

    for (int n = blk.n_last; n >= blk.n_first; --n) {
        load_tile<BN, D, THREADS>(sV, blk.gv + static_cast<u64>(n) * BN * blk.kv_stride, blk.kv_stride, s.len_k - n * BN, blk.hd);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        float acc[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.0f;
        // Partly unrolled: fully unrolled, the compiler hoists every k-slice's fragment loads and runs out of registers
        // at D = 256.
#pragma unroll 4
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) ldsm_x4(aQ + 2u * (mt * 16 * SD + kk * 16), a[mt]);
#pragma unroll
            for (int nb = 0; nb < NT / 2; ++nb) {
                unsigned b[4];
                ldsm_x4(bK + 2u * (nb * 16 * SD + kk * 16), b);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<T>(acc[mt][2 * nb], a[mt], b[0], b[1]);
                    mma16816<T>(acc[mt][2 * nb + 1], a[mt], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with K(n)
        if (n > blk.n_first) load_tile<BN, D, THREADS>(sK, blk.gk + static_cast<u64>(n - 1) * BN * blk.kv_stride, blk.kv_stride, s.len_k - (n - 1) * BN, blk.hd);
        cp_async_commit();

        // P as A fragments: {(g, 2t), (g+8, 2t), (g, 2t+8), (g+8, 2t+8)} of each 16-key slice.
        unsigned pf[MT][BN / 16][4];
        // A tile every row of which sees every key needs no mask.
        const int n0 = n * BN, r0 = m0 + warp * MT * 16 + g;
        const bool full = n0 + BN <= s.len_k && (!p.causal || n0 + BN - 1 <= blk.i_min) && (p.window == 0 || blk.i_max - n0 < p.window);
        if (full) {
            if (sm.capped) softmax_tile<T, MT, NT, DT, false, true>(acc, pf, o, row_max, row_sum, sm, p, s, r0, n0 + 2 * t);
            else softmax_tile<T, MT, NT, DT, false, false>(acc, pf, o, row_max, row_sum, sm, p, s, r0, n0 + 2 * t);
        } else {
            if (sm.capped) softmax_tile<T, MT, NT, DT, true, true>(acc, pf, o, row_max, row_sum, sm, p, s, r0, n0 + 2 * t);
            else softmax_tile<T, MT, NT, DT, true, false>(acc, pf, o, row_max, row_sum, sm, p, s, r0, n0 + 2 * t);
        }

        cp_async_wait<1>();  // V(n) has landed; K(n − 1) may still be in flight
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
            for (int db = 0; db < DT / 2; ++db) {
                unsigned b[4];
                ldsm_x4_t(bV + 2u * (kk * 16 * SD + db * 16), b);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<T>(o[mt][2 * db], pf[mt][kk], b[0], b[1]);
                    mma16816<T>(o[mt][2 * db + 1], pf[mt][kk], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with V(n)
    }
    cp_async_wait<0>();
    __syncthreads();  // with no key tile at all, the Q copies of other threads may have been in flight until here

    // Normalise, stage O through the (now free) Q tile for coalesced 16-byte stores, write lse.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const float sum = flash_quad_sum(row_sum[mt][hr]);
            const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
            const int r = warp * MT * 16 + mt * 16 + g + 8 * hr;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt)
                *reinterpret_cast<unsigned*>(sQ + r * SD + dt * 8 + 2 * t) = pack2<T>(o[mt][dt][2 * hr] * inv, o[mt][dt][2 * hr + 1] * inv);
            flash_store_lse(p, s, m0, h, t, r, row_max[mt][hr], sum);
        }
    __syncthreads();
    store_tile<BM, D, THREADS>(static_cast<unsigned short*>(p.out) + blk.q_row0, blk.q_stride, sQ, blk.m1 - m0, blk.hd);
}

// Phase 1 of the backward for one warp's keys × queries: P = 2^(s·log2e − lse·log2e) from the raw scores `sacc`
// and dS = P ⊙ (dP − delta) (⊙ 1 − tanh² under a cap) × scale, both rounded to T into shared memory as [key][query]
// (rows SP elements apart). kl0, ql0: the lane's first key and query in the tile (key row g, query column 2t); m0, n0:
// the tile's first query and key in the sequence. MASK and CAP as in softmax_tile.
template <typename T, int KT, int QB, int SP, bool MASK, bool CAP>
__device__ __forceinline__ void backward_scores(const float (&sacc)[KT][QB][4], const float (&dpacc)[KT][QB][4], const float* cL,
                                                const float* cD, unsigned short* sP, unsigned short* sdS, int kl0, int ql0, int m0,
                                                int n0, const ScoreMap& sm, const FlashParams& p, const FlashSeq& s) {
#pragma unroll
    for (int b = 0; b < QB; ++b) {
        // The lane's two queries of this block: their lse in log2 units (+∞ for a query that saw no key, so that every
        // P of it is 0, not NaN) and delta.
        float l2[2], dl[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const float l = cL[ql0 + b * 8 + c];
            l2[c] = l == f32_neg_inf() ? f32_pos_inf() : l * FLASH_LOG2E;
            dl[c] = cD[ql0 + b * 8 + c];
        }
#pragma unroll
        for (int a = 0; a < KT; ++a) {
            float pv[4], ds[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float x = sacc[a][b][e];
                float th = 0.0f, pr;
                if (CAP) {
                    th = tanh_fast(sm.pre * x);
                    pr = ex2(sm.post * th - l2[e % 2]);
                } else {
                    pr = ex2(fmaf(x, sm.pre, -l2[e % 2]));
                }
                if (MASK && !flash_visible(p, s, m0 + ql0 + b * 8 + (e % 2), n0 + kl0 + a * 16 + 8 * (e / 2))) pr = 0.0f;
                float d = pr * (dpacc[a][b][e] - dl[e % 2]);
                if (CAP) d *= 1.0f - th * th;
                pv[e] = pr;
                ds[e] = d * p.scale;
            }
            const int kl = kl0 + a * 16, ql = ql0 + b * 8;
            *reinterpret_cast<unsigned*>(sP + kl * SP + ql) = pack2<T>(pv[0], pv[1]);
            *reinterpret_cast<unsigned*>(sP + (kl + 8) * SP + ql) = pack2<T>(pv[2], pv[3]);
            *reinterpret_cast<unsigned*>(sdS + kl * SP + ql) = pack2<T>(ds[0], ds[1]);
            *reinterpret_cast<unsigned*>(sdS + (kl + 8) * SP + ql) = pack2<T>(ds[2], ds[3]);
        }
    }
}

// ---- Backward ------------------------------------------------------------------------------------------------

// Grid (n_kv_heads, n_seqs, ⌈max_seqlen_k / BN⌉), W warps. A block keeps one K/V tile of BN keys in shared memory
// and its dK, dV in registers, and walks every (query head of its GQA group, query tile of BM rows) pair that sees
// the tile, double-buffering Q and dO. Per pair, three phases with their own warp layouts:
//   1. Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ, warps P1K (keys) × W/P1K (queries): P = exp2(S − lse), dS = P ⊙ (dP − delta)
//      (⊙ 1 − tanh² under a softcap, × scale), both rounded to T into shared memory as [key][query];
//   2. dV += Pᵀ·dO and dK += dSᵀ·Q, warps P2K (keys) × W/P2K (head dims), accumulated in registers;
//   3. dQ += dS·K, warps P3Q (queries) × W/P3Q (head dims), added to the f32 dq_accum with red.global.add.
// GQA sums over the group's heads in registers, so dK and dV need no atomics. Dynamic shared memory:
// (2·BN + 4·BM)·(D + 8)·2 + 2·BN·(BM + 8)·2 + 4·BM·4 bytes.
template <typename T, int D, int BM, int BN, int W, int P1K, int P2K, int P3Q>
__device__ __forceinline__ void flash_backward(const FlashParams p) {
    constexpr int SD = D + 8, SP = BM + 8, THREADS = 32 * W;
    constexpr int K1 = BN / P1K, Q1 = BM / (W / P1K);  // phase 1 per warp: K1 keys × Q1 queries
    constexpr int QC = Q1 < 32 ? Q1 : 32;
    constexpr int K2 = BN / P2K, D2 = D / (W / P2K);   // phase 2: K2 keys × D2 head dims
    constexpr int Q3 = BM / P3Q, D3 = D / (W / P3Q);   // phase 3: Q3 queries × D3 head dims
    static_assert(K1 % 16 == 0 && Q1 % 16 == 0 && K2 % 16 == 0 && D2 % 8 == 0 && Q3 % 16 == 0 && D3 % 8 == 0, "warp tiles");
    unsigned short* smem = reinterpret_cast<unsigned short*>(flash_smem);
    unsigned short* sK = smem;
    unsigned short* sV = sK + BN * SD;
    unsigned short* sQ = sV + BN * SD;     // [2][BM][SD]
    unsigned short* sdO = sQ + 2 * BM * SD;  // [2][BM][SD]
    unsigned short* sP = sdO + 2 * BM * SD;  // [BN][SP]
    unsigned short* sdS = sP + BN * SP;      // [BN][SP]
    float* sL = reinterpret_cast<float*>(sdS + BN * SP);  // [2][BM] lse
    float* sD = sL + 2 * BM;                              // [2][BM] delta

    const FlashBlock b = flash_block();
    FlashSeq s;
    if (!flash_seq(p, b.seq, s)) return;
    const int n0 = b.tile * BN;
    if (n0 >= s.len_k) return;
    const int kvh = b.head, group = p.n_heads / p.n_kv_heads;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int lr = lane % 8, lq = (lane / 8) % 2, lh = lane / 16;
    const FlashKeyBlock<BM> blk = flash_key_block<BM, BN>(p, s, n0, kvh, group);

    load_tile<BN, D, THREADS>(sK, static_cast<const unsigned short*>(p.k) + blk.kv_row0, blk.kv_stride, blk.n1 - n0, blk.hd);
    load_tile<BN, D, THREADS>(sV, static_cast<const unsigned short*>(p.v) + blk.kv_row0, blk.kv_stride, blk.n1 - n0, blk.hd);
    // Pair `it` → (head, first query row); its Q, dO, lse and delta go to buffer `stage`.
    auto prefetch = [&](int it, int stage) {
        const int h = blk.head(it), m0 = blk.row0(it);
        const u64 row0 = static_cast<u64>(s.q0 + m0) * p.n_heads + h;
        const int rows = min(BM, s.len_q - m0);
        load_tile<BM, D, THREADS>(sQ + stage * BM * SD, static_cast<const unsigned short*>(p.q) + row0 * blk.hd, blk.q_stride, rows, blk.hd);
        load_tile<BM, D, THREADS>(sdO + stage * BM * SD, static_cast<const unsigned short*>(p.d_out) + row0 * blk.hd, blk.q_stride, rows, blk.hd);
        load_row_values<BM, THREADS>(sL + stage * BM, p.lse + row0, p.n_heads, rows);
        load_row_values<BM, THREADS>(sD + stage * BM, p.delta + row0, p.n_heads, rows);
    };
    if (blk.pairs > 0) prefetch(0, 0);
    cp_async_commit();

    constexpr int KT2 = K2 / 16, DB2 = D2 / 8;
    float dk[KT2][DB2][4], dv[KT2][DB2][4];
#pragma unroll
    for (int a = 0; a < KT2; ++a)
#pragma unroll
        for (int b = 0; b < DB2; ++b)
#pragma unroll
            for (int e = 0; e < 4; ++e) dk[a][b][e] = dv[a][b][e] = 0.0f;
    const ScoreMap sm = score_map(p);

    // Warp positions in each phase's layout.
    const int w1k = (warp % P1K) * K1, w1q = (warp / P1K) * Q1;
    const int w2k = (warp % P2K) * K2, w2d = (warp / P2K) * D2;
    const int w3q = (warp % P3Q) * Q3, w3d = (warp / P3Q) * D3;

    for (int it = 0; it < blk.pairs; ++it) {
        const int stage = it % 2;
        const int h = blk.head(it), m0 = blk.row0(it);
        if (it + 1 < blk.pairs) prefetch(it + 1, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const unsigned short* cQ = sQ + stage * BM * SD;
        const unsigned short* cdO = sdO + stage * BM * SD;
        const float* cL = sL + stage * BM;
        const float* cD = sD + stage * BM;

        // Phase 1: Sᵀ and dPᵀ for this warp's K1 keys × Q1 queries, in chunks of QC queries (the two accumulators
        // live beside dK and dV: chunking bounds the registers they take).
        const bool full = m0 + BM <= s.len_q && n0 + BN <= s.len_k && (!p.causal || n0 + BN - 1 <= m0 + blk.off) &&
                          (p.window == 0 || m0 + BM - 1 + blk.off - n0 < p.window);
#pragma unroll
        for (int qc = 0; qc < Q1 / QC; ++qc) {
            constexpr int KT = K1 / 16, QB = QC / 8;
            float sacc[KT][QB][4], dpacc[KT][QB][4];
#pragma unroll
            for (int a = 0; a < KT; ++a)
#pragma unroll
                for (int b = 0; b < QB; ++b)
#pragma unroll
                    for (int e = 0; e < 4; ++e) sacc[a][b][e] = dpacc[a][b][e] = 0.0f;
            const unsigned aK = smem_u32(sK) + 2u * ((w1k + lr + 8 * lq) * SD + 8 * lh);
            const unsigned aV = smem_u32(sV) + 2u * ((w1k + lr + 8 * lq) * SD + 8 * lh);
            const int wq = w1q + qc * QC;
            const unsigned bQ = smem_u32(cQ) + 2u * ((wq + lr + 8 * lh) * SD + 8 * lq);
            const unsigned bO = smem_u32(cdO) + 2u * ((wq + lr + 8 * lh) * SD + 8 * lq);
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                unsigned ak[KT][4], av[KT][4];
#pragma unroll
                for (int a = 0; a < KT; ++a) {
                    ldsm_x4(aK + 2u * (a * 16 * SD + kk * 16), ak[a]);
                    ldsm_x4(aV + 2u * (a * 16 * SD + kk * 16), av[a]);
                }
#pragma unroll
                for (int qb = 0; qb < QB / 2; ++qb) {
                    unsigned bq[4], bo[4];
                    ldsm_x4(bQ + 2u * (qb * 16 * SD + kk * 16), bq);
                    ldsm_x4(bO + 2u * (qb * 16 * SD + kk * 16), bo);
#pragma unroll
                    for (int a = 0; a < KT; ++a) {
                        mma16816<T>(sacc[a][2 * qb], ak[a], bq[0], bq[1]);
                        mma16816<T>(sacc[a][2 * qb + 1], ak[a], bq[2], bq[3]);
                        mma16816<T>(dpacc[a][2 * qb], av[a], bo[0], bo[1]);
                        mma16816<T>(dpacc[a][2 * qb + 1], av[a], bo[2], bo[3]);
                    }
                }
            }
            const int kl0 = w1k + g, ql0 = wq + 2 * t;
            if (full) {
                if (sm.capped) backward_scores<T, KT, QB, SP, false, true>(sacc, dpacc, cL, cD, sP, sdS, kl0, ql0, m0, n0, sm, p, s);
                else backward_scores<T, KT, QB, SP, false, false>(sacc, dpacc, cL, cD, sP, sdS, kl0, ql0, m0, n0, sm, p, s);
            } else {
                if (sm.capped) backward_scores<T, KT, QB, SP, true, true>(sacc, dpacc, cL, cD, sP, sdS, kl0, ql0, m0, n0, sm, p, s);
                else backward_scores<T, KT, QB, SP, true, false>(sacc, dpacc, cL, cD, sP, sdS, kl0, ql0, m0, n0, sm, p, s);
            }
        }
        __syncthreads();

        // Phase 2: dV += Pᵀ·dO, dK += dSᵀ·Q over this pair's BM queries.
        {
            const unsigned aP = smem_u32(sP) + 2u * ((w2k + lr + 8 * lq) * SP + 8 * lh);
            const unsigned aS = smem_u32(sdS) + 2u * ((w2k + lr + 8 * lq) * SP + 8 * lh);
            const unsigned bO = smem_u32(cdO) + 2u * ((lr + 8 * lq) * SD + w2d + 8 * lh);
            const unsigned bQ = smem_u32(cQ) + 2u * ((lr + 8 * lq) * SD + w2d + 8 * lh);
#pragma unroll
            for (int qq = 0; qq < BM / 16; ++qq) {
                unsigned ap[KT2][4], as[KT2][4];
#pragma unroll
                for (int a = 0; a < KT2; ++a) {
                    ldsm_x4(aP + 2u * (a * 16 * SP + qq * 16), ap[a]);
                    ldsm_x4(aS + 2u * (a * 16 * SP + qq * 16), as[a]);
                }
#pragma unroll
                for (int db = 0; db < DB2 / 2; ++db) {
                    unsigned bo[4], bq[4];
                    ldsm_x4_t(bO + 2u * (qq * 16 * SD + db * 16), bo);
                    ldsm_x4_t(bQ + 2u * (qq * 16 * SD + db * 16), bq);
#pragma unroll
                    for (int a = 0; a < KT2; ++a) {
                        mma16816<T>(dv[a][2 * db], ap[a], bo[0], bo[1]);
                        mma16816<T>(dv[a][2 * db + 1], ap[a], bo[2], bo[3]);
                        mma16816<T>(dk[a][2 * db], as[a], bq[0], bq[1]);
                        mma16816<T>(dk[a][2 * db + 1], as[a], bq[2], bq[3]);
                    }
                }
                if (DB2 % 2) {
                    unsigned bo0, bo1, bq0, bq1;
                    ldsm_x2_t(bO + 2u * (qq * 16 * SD + (DB2 - 1) * 8), bo0, bo1);
                    ldsm_x2_t(bQ + 2u * (qq * 16 * SD + (DB2 - 1) * 8), bq0, bq1);
#pragma unroll
                    for (int a = 0; a < KT2; ++a) {
                        mma16816<T>(dv[a][DB2 - 1], ap[a], bo0, bo1);
                        mma16816<T>(dk[a][DB2 - 1], as[a], bq0, bq1);
                    }
                }
            }
        }

        // Phase 3: dQ += dS·K for this warp's Q3 queries × D3 head dims, straight into dq_accum.
        {
            constexpr int QT = Q3 / 16, DB = D3 / 8;
            float dq[QT][DB][4];
#pragma unroll
            for (int a = 0; a < QT; ++a)
#pragma unroll
                for (int b = 0; b < DB; ++b)
#pragma unroll
                    for (int e = 0; e < 4; ++e) dq[a][b][e] = 0.0f;
            // dS stored [key][query]: its transposed 8×8 blocks are A's; rows lane%8 + 8·(lane/16), columns 8·((lane/8)%2).
            const unsigned aS = smem_u32(sdS) + 2u * ((lr + 8 * lh) * SP + w3q + 8 * lq);
            const unsigned bK = smem_u32(sK) + 2u * ((lr + 8 * lq) * SD + w3d + 8 * lh);
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                unsigned as[QT][4];
#pragma unroll
                for (int a = 0; a < QT; ++a) ldsm_x4_t(aS + 2u * (kk * 16 * SP + a * 16), as[a]);
#pragma unroll
                for (int db = 0; db < DB / 2; ++db) {
                    unsigned bk[4];
                    ldsm_x4_t(bK + 2u * (kk * 16 * SD + db * 16), bk);
#pragma unroll
                    for (int a = 0; a < QT; ++a) {
                        mma16816<T>(dq[a][2 * db], as[a], bk[0], bk[1]);
                        mma16816<T>(dq[a][2 * db + 1], as[a], bk[2], bk[3]);
                    }
                }
                if (DB % 2) {
                    unsigned bk0, bk1;
                    ldsm_x2_t(bK + 2u * (kk * 16 * SD + (DB - 1) * 8), bk0, bk1);
#pragma unroll
                    for (int a = 0; a < QT; ++a) mma16816<T>(dq[a][DB - 1], as[a], bk0, bk1);
                }
            }
#pragma unroll
            for (int a = 0; a < QT; ++a)
#pragma unroll
                for (int e2 = 0; e2 < 2; ++e2) {
                    const int r = m0 + w3q + a * 16 + g + 8 * e2;
                    if (r >= s.len_q) continue;
                    float* dst = p.dq_accum + (static_cast<u64>(s.q0 + r) * p.n_heads + h) * blk.hd;
#pragma unroll
                    for (int b = 0; b < DB; ++b) {
                        const unsigned c = w3d + b * 8 + 2 * t;
                        if (c < blk.hd) red_add(dst + c, dq[a][b][2 * e2]);
                        if (c + 1 < blk.hd) red_add(dst + c + 1, dq[a][b][2 * e2 + 1]);
                    }
                }
        }
        __syncthreads();  // sP, sdS and this stage's buffers are free again
    }
    cp_async_wait<0>();

    // dK, dV: rows < len_k, columns < hd, straight from the fragments.
    unsigned short* gdk = static_cast<unsigned short*>(p.dk) + blk.kv_row0;
    unsigned short* gdv = static_cast<unsigned short*>(p.dv) + blk.kv_row0;
#pragma unroll
    for (int a = 0; a < KT2; ++a)
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
            const int r = w2k + a * 16 + g + 8 * e2;
            if (n0 + r >= s.len_k) continue;
#pragma unroll
            for (int b = 0; b < DB2; ++b) {
                const unsigned c = w2d + b * 8 + 2 * t;
                const unsigned pk = pack2<T>(dk[a][b][2 * e2], dk[a][b][2 * e2 + 1]);
                const unsigned pvv = pack2<T>(dv[a][b][2 * e2], dv[a][b][2 * e2 + 1]);
                flash_store_kv_pair(gdk, gdv, r, blk.kv_stride, c, blk.hd, pk, pvv);
            }
        }
}
