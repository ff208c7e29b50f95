// Flash attention forward on Hopper wgmma (sm_90a): flash_forward_sm90 (every thread loads, optional
// intra-warpgroup overlap) and flash_forward_sm90_ws (a producer warpgroup feeding consumer warpgroups through
// mbarriers, optional ping-pong), the twins of flash_attention.cuh's flash_forward. Include after flash_wgmma.cuh.
#pragma once

// ---- Online softmax on a 64 × BN score accumulator -------------------------------------------------------------

// s: this thread's NS = BN/2 raw scores q·k (d[4j + e]: row r0 + 8·(e/2), key c0 + 8j + e%2, c0 = first key of the
// tile + 2t) → P in place (exp2 of the log2-scaled score minus the new row max; masked entries 0). Updates the
// running max (log2 units) and sum of the thread's two rows and returns in corr the factor the old accumulator must
// be scaled by. As flash_attention.cuh's softmax_tile: MASK (some entry of the tile is not visible) and CAP (softcap)
// are template switches, and without a cap the scale folds into one FMA per score, p = 2^(x·pre − max). LAZY
// (FlashAttention-4's conditional rescaling) keeps the running max unless the tile's exceeds it by more than 8 (log2
// units): P then stays ≤ 2^8, harmless in f32 sums and in bf16/f16 P, and corr is exactly 1 for most tiles, so the
// caller can skip rescaling O (sm90_rescale_lazy). The result is the same up to rounding: lse and O's normalisation
// use whatever max the sums were taken against.
template <int NS, bool MASK, bool CAP, bool LAZY>
__device__ __forceinline__ void sm90_softmax_tile(float (&s)[NS], float (&row_max)[2], float (&row_sum)[2], float (&corr)[2], const FlashParams& p,
                                                  const FlashSeq& sq, const ScoreMap& sm, int r0, int c0) {
    if (CAP) {
#pragma unroll
        for (int i = 0; i < NS; ++i) s[i] = sm.post * tanh_fast(sm.pre * s[i]);
    }
    if (MASK) {
        // flash_visible per row: key c0 + c is visible iff lo ≤ c < hi. Bounds are relative to c0, so each test
        // compares with an immediate (absolute key numbers invite the compiler to hoist 2·NS per-key bounds out of
        // the tile loop).
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int i = r0 + 8 * hr + sq.len_k - sq.len_q;
            const int hi = (p.causal ? min(sq.len_k, i + 1) : sq.len_k) - c0;
            const int lo = p.window ? i - p.window + 1 - c0 : -(1 << 30);
#pragma unroll
            for (int j = 0; j < NS / 4; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    if (8 * j + e < lo || 8 * j + e >= hi) s[4 * j + 2 * hr + e] = f32_neg_inf();
        }
    }
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float mx = f32_neg_inf();
#pragma unroll
        for (int j = 0; j < NS / 4; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * hr], s[4 * j + 2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // Capped scores are in log2 units already; raw ones scale by pre > 0, which keeps the max.
        float m_new = fmaxf(row_max[hr], CAP ? mx : mx * sm.pre);
        // From −∞ the difference is +∞ (taken); −∞ − −∞ is NaN (compares false: taken, still −∞).
        if (LAZY && m_new - row_max[hr] <= 8.0f) m_new = row_max[hr];
        // A row that has seen no key yet keeps max −∞; subtracting 0 then leaves every exp2 at 0, not NaN.
        const float base = m_new == f32_neg_inf() ? 0.0f : m_new;
        corr[hr] = ex2(row_max[hr] - base);
        row_max[hr] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < NS / 4; ++j) {
            const float x0 = s[4 * j + 2 * hr], x1 = s[4 * j + 2 * hr + 1];
            const float p0 = CAP ? ex2(x0 - base) : ex2(fmaf(x0, sm.pre, -base));
            const float p1 = CAP ? ex2(x1 - base) : ex2(fmaf(x1, sm.pre, -base));
            s[4 * j + 2 * hr] = p0;
            s[4 * j + 2 * hr + 1] = p1;
            sum += p0 + p1;
        }
        row_sum[hr] = row_sum[hr] * corr[hr] + sum;
    }
}

// The four (mask, cap) instantiations behind one call. `full`: every entry of the tile is visible.
template <int NS, bool LAZY = false>
__device__ __forceinline__ void sm90_softmax(float (&s)[NS], float (&row_max)[2], float (&row_sum)[2], float (&corr)[2], const FlashParams& p,
                                             const FlashSeq& sq, const ScoreMap& sm, bool full, int r0, int j0, int t) {
    const int c0 = j0 + 2 * t;
    if (sm.capped) {
        if (full) sm90_softmax_tile<NS, false, true, LAZY>(s, row_max, row_sum, corr, p, sq, sm, r0, c0);
        else sm90_softmax_tile<NS, true, true, LAZY>(s, row_max, row_sum, corr, p, sq, sm, r0, c0);
    } else {
        if (full) sm90_softmax_tile<NS, false, false, LAZY>(s, row_max, row_sum, corr, p, sq, sm, r0, c0);
        else sm90_softmax_tile<NS, true, false, LAZY>(s, row_max, row_sum, corr, p, sq, sm, r0, c0);
    }
}

// P (f32, accumulator layout) → A fragments of P·V, rounded to T: k-step kk takes the score columns 16kk … 16kk + 15.
template <typename T, int NS>
__device__ __forceinline__ void sm90_pack_p(const float (&s)[NS], unsigned (&pf)[NS / 8][4]) {
#pragma unroll
    for (int kk = 0; kk < NS / 8; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) pf[kk][r] = pack2<T>(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
}

template <int NO> __device__ __forceinline__ void sm90_rescale(float (&o)[NO], const float (&corr)[2]) {
#pragma unroll
    for (int i = 0; i < NO; ++i) o[i] *= corr[(i % 4) / 2];
}

// sm90_rescale, skipped by a warp none of whose rows moved its max (LAZY softmax: most tiles).
template <int NO, bool LAZY> __device__ __forceinline__ void sm90_rescale_lazy(float (&o)[NO], const float (&corr)[2]) {
    if (!LAZY || __any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) sm90_rescale<NO>(o, corr);
}

// ---- One consumer warpgroup's rows --------------------------------------------------------------------------

// What a warpgroup computing 64 query rows keeps across the key tiles in both forwards: O and the scores S in wgmma
// accumulators, P as A fragments of P·V, and the running max and sum of this thread's two rows r0, r0 + 8
// (sequence-relative); and the steps it takes on them. Products read K/V stage st at sK, sV + st·BN·D·2: S = Q·Kᵀ
// (wgmma SS, K-major both), O += P·V (wgmma RS: P from registers, V MN-major). The softmax of tile n masks unless every
// row of the warpgroup (key positions wi_min … wi_max) sees every key of the tile. The warp-specialized forward signals
// its barriers through the steps' hooks: `issued` once the step's products are issued, `s_done` once S has landed,
// `pv_done` once P·V has.
template <typename T, int D, int BN, int BM, bool LAZY>
struct Sm90Rows {
    const FlashParams& p;
    const FlashSeq& s;
    const unsigned sQ, sK, sV;
    const int wg, t, wi_min, wi_max;
    float (&o)[D / 2];
    float (&sacc)[BN / 2];
    unsigned (&pf)[BN / 16][4];
    float (&row_max)[2];
    float (&row_sum)[2];
    ScoreMap sm;
    int r0;

    __device__ __forceinline__ Sm90Rows(const FlashParams& p, const FlashSeq& s, unsigned sQ, unsigned sK, unsigned sV, int wg, int t, int wi_min,
                                        int wi_max, float (&o)[D / 2], float (&sacc)[BN / 2], unsigned (&pf)[BN / 16][4], float (&row_max)[2],
                                        float (&row_sum)[2], int m0, int warp, int g)
        : p(p), s(s), sQ(sQ), sK(sK), sV(sV), wg(wg), t(t), wi_min(wi_min), wi_max(wi_max), o(o), sacc(sacc), pf(pf), row_max(row_max),
          row_sum(row_sum) {
#pragma unroll
        for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
#pragma unroll
        for (int i = 0; i < BN / 16; ++i) pf[i][0] = pf[i][1] = pf[i][2] = pf[i][3] = 0u;
        row_max[0] = row_max[1] = f32_neg_inf();
        row_sum[0] = row_sum[1] = 0.0f;
        sm = score_map(p);
        r0 = m0 + 16 * warp + g;
    }

    __device__ __forceinline__ void issue_s(int st) {
        constexpr unsigned KV_BYTES = BN * D * 2;
        const unsigned k_tile = sK + st * KV_BYTES;
        Wgmma<BN>::template ss0<T, 0>(sacc, desc_k<BM>(sQ, 64 * wg, 0), desc_k<BN>(k_tile, 0, 0));
#pragma unroll
        for (int kk = 1; kk < D / 16; ++kk) Wgmma<BN>::template ss<T, 0>(sacc, desc_k<BM>(sQ, 64 * wg, kk), desc_k<BN>(k_tile, 0, kk), 1);
        wg_commit();
    }

    __device__ __forceinline__ void issue_pv(int st) {
        constexpr unsigned KV_BYTES = BN * D * 2;
        const unsigned v_tile = sV + st * KV_BYTES;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) Wgmma<D>::template rs<T, 1>(o, pf[kk], desc_mn<BN>(v_tile, kk), 1);
        wg_commit();
    }

    __device__ __forceinline__ void softmax(int n, float (&corr)[2]) {
        const int n0 = n * BN;
        const bool full = n0 + BN <= s.len_k && (!p.causal || n0 + BN - 1 <= wi_min) && (p.window == 0 || wi_max - n0 < p.window);
        sm90_softmax<BN / 2, LAZY>(sacc, row_max, row_sum, corr, p, s, sm, full, r0, n0, t);
    }

    // S(n) on stage st, then its softmax: P(n) waits in pf for its P·V.
    template <typename Issued, typename SDone>
    __device__ __forceinline__ void step_s(int n, int st, Issued issued, SDone s_done) {
        wg_fence();
        issue_s(st);
        issued();
        wg_wait<0>();
        reg_fence(sacc);
        s_done();
        float corr[2];
        softmax(n, corr);
        sm90_rescale_lazy<D / 2, LAZY>(o, corr);
        sm90_pack_p<T, BN / 2>(sacc, pf);
    }

    // FlashAttention-3's intra-warpgroup overlap: S(n) on stage st and P·V of the previous tile (stage pst) issued
    // together, the softmax of S(n) while P·V is still on the tensor cores, O rescaled once it has landed.
    template <typename Issued, typename SDone, typename PvDone>
    __device__ __forceinline__ void step_overlapped(int n, int st, int pst, Issued issued, SDone s_done, PvDone pv_done) {
        reg_fence(o);
        reg_fence(pf);
        wg_fence();
        issue_s(st);
        issue_pv(pst);
        issued();
        wg_wait<1>();
        reg_fence(sacc);
        s_done();
        float corr[2];
        softmax(n, corr);
        wg_wait<0>();
        reg_fence(o);
        reg_fence(pf);
        pv_done();
        sm90_rescale_lazy<D / 2, LAZY>(o, corr);
        sm90_pack_p<T, BN / 2>(sacc, pf);
    }

    // O += P·V on stage st alone.
    __device__ __forceinline__ void step_pv(int st) {
        reg_fence(o);
        reg_fence(pf);
        wg_fence();
        issue_pv(st);
        wg_wait<0>();
        reg_fence(o);
        reg_fence(pf);
    }

    // Normalise, write lse, and stage O rounded to T in this warp's rows of the Q tile (whose last read has completed)
    // for 16-byte coalesced stores.
    __device__ __forceinline__ void stage_output(int m0, int h, int warp, int g) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const float sum = flash_quad_sum(row_sum[hr]);
            const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
            const int r = 16 * warp + g + 8 * hr;
#pragma unroll
            for (int j = 0; j < D / 8; ++j)
                st_shared_u32(sQ + sw128<BM>(r, j) + 4 * t, pack2<T>(o[4 * j + 2 * hr] * inv, o[4 * j + 2 * hr + 1] * inv));
            flash_store_lse(p, s, m0, h, t, r, row_max[hr], sum);
        }
    }
};

// ---- Forward, all warps load (cp.async) ------------------------------------------------------------------------

// Grid (n_heads, n_seqs, ⌈max_seqlen_q / BM⌉) with BM = 64·NWG, 128·NWG threads (NWG warpgroups, each owning 64 query
// rows, Sm90Rows). K/V tiles of BN keys stream through two stages each, loaded by every thread with cp.async one tile
// ahead; one __syncthreads per tile (after the wait for the current tile, which also frees the stage the next prefetch
// overwrites). Per tile and warpgroup: S = Q·Kᵀ, online softmax in registers, O += P·V; with OVERLAP, S(n) and
// P(n+1)·V(n+1) issued together (Sm90Rows::step_overlapped). Tiles are visited from the last (diagonal) to the first,
// and a warpgroup skips the products of tiles none of its rows sees (it still takes part in the loads and barriers).
// Dynamic shared memory: Sm90ForwardSmem<D, BN, NWG>::bytes (Q, 2 K stages, 2 V stages, 1 KB of alignment slack).
// LAZY: see sm90_softmax_tile.
template <int D, int BN, int NWG> struct Sm90ForwardSmem {
    static constexpr int bytes = (64 * NWG + 4 * BN) * D * 2 + 1024;
};

template <typename T, int D, int BN, int NWG, bool OVERLAP, bool LAZY = false>
__device__ __forceinline__ void flash_forward_sm90(const FlashParams p) {
    constexpr int BM = 64 * NWG, THREADS = 128 * NWG;
    static_assert(D % 64 == 0 && D <= 256 && BN % 16 == 0 && BN <= 256, "tile shape");
    constexpr unsigned KV_BYTES = BN * D * 2;
    const unsigned sQ = (smem_u32(flash_smem) + 1023u) & ~1023u;
    const unsigned sK = sQ + BM * D * 2, sV = sK + 2 * KV_BYTES;

    const FlashBlock b = flash_block();
    FlashSeq s;
    if (!flash_seq(p, b.seq, s)) return;
    const int m0 = (b.tiles - 1 - b.tile) * BM;
    if (m0 >= s.len_q) return;
    const Sm90QueryBlock blk = sm90_query_block<BM, BN>(p, s, m0, b.head);
    // This warpgroup's key tiles [wf, wl] (empty when wf > wl).
    const int wr0 = m0 + 64 * blk.wg, wr1 = min(wr0 + 64, s.len_q);
    const int wi_min = wr0 + blk.off, wi_max = wr1 - 1 + blk.off;
    int wf = blk.n_last + 1, wl = blk.n_last;
    if (wr0 < s.len_q) {
        int wlo = 0, whi = s.len_k;
        if (p.causal) whi = min(whi, wi_max + 1);
        if (p.window) wlo = max(wlo, wi_min - p.window + 1);
        if (whi > wlo) wf = wlo / BN, wl = (whi - 1) / BN;
    }

    auto load_k = [&](int n) {
        sm90_load_tile<BN, D, THREADS>(sK + (n & 1) * KV_BYTES, blk.gk + static_cast<u64>(n) * BN * blk.kv_stride, blk.kv_stride, s.len_k - n * BN, blk.hd, blk.tid);
    };
    auto load_v = [&](int n) {
        sm90_load_tile<BN, D, THREADS>(sV + (n & 1) * KV_BYTES, blk.gv + static_cast<u64>(n) * BN * blk.kv_stride, blk.kv_stride, s.len_k - n * BN, blk.hd, blk.tid);
    };
    sm90_load_tile<BM, D, THREADS>(sQ, blk.gq, blk.q_stride, blk.m1 - m0, blk.hd, blk.tid);
    if (blk.n_last >= blk.n_first) {
        load_k(blk.n_last);
        if (!OVERLAP) load_v(blk.n_last);
    }
    cp_async_commit();

    // The arrays are the kernel's, not Sm90Rows members: as members NVVM orders their registers differently and ptxas
    // allocates them differently.
    float o[D / 2], sacc[BN / 2];
    unsigned pf[BN / 16][4];
    float row_max[2], row_sum[2];
    Sm90Rows<T, D, BN, BM, LAZY> rows(p, s, sQ, sK, sV, blk.wg, blk.t, wi_min, wi_max, o, sacc, pf, row_max, row_sum, m0, blk.warp, blk.g);
    const auto none = [] {};
    for (int n = blk.n_last; n >= blk.n_first; --n) {
        cp_async_wait<0>();  // this tile's group (committed one iteration ago)
        fence_proxy_async();
        __syncthreads();  // its data is visible to every warpgroup, and every warpgroup is done with tile n + 1
        if (n > blk.n_first) load_k(n - 1);
        if (OVERLAP) load_v(n);  // P(n)·V(n) runs in the next iteration
        else if (n > blk.n_first) load_v(n - 1);
        cp_async_commit();

        const bool do_s = n >= wf && n <= wl;
        if (!OVERLAP) {
            if (do_s) {
                rows.step_s(n, n & 1, none, none);
                rows.step_pv(n & 1);
            }
        } else {
            const bool do_pv = n + 1 >= wf && n + 1 <= wl;
            // Three straight-line cases (ptxas serializes wgmma issued under divergent-looking conditions).
            if (do_s && do_pv) rows.step_overlapped(n, n & 1, (n + 1) & 1, none, none, none);
            else if (do_s) rows.step_s(n, n & 1, none, none);
            else if (do_pv) rows.step_pv((n + 1) & 1);
        }
    }
    if (OVERLAP && blk.n_last >= blk.n_first) {
        cp_async_wait<0>();  // V(n_first)
        fence_proxy_async();
        __syncthreads();
        if (blk.n_first >= wf && blk.n_first <= wl) rows.step_pv(blk.n_first & 1);
    }
    cp_async_wait<0>();
    __syncthreads();  // every warpgroup is done with sQ (and, with no key tile at all, every Q copy has landed)

    rows.stage_output(m0, blk.h, blk.warp, blk.g);
    __syncthreads();
    sm90_store_rows<BM, BM, D, THREADS>(static_cast<unsigned short*>(p.out) + blk.q_row0, blk.q_stride, sQ, 0, blk.m1 - m0, blk.hd, blk.tid);
}

// ---- Forward, warp-specialized (producer warpgroup + consumer warpgroups) ---------------------------------------

// Grid as flash_forward_sm90 or, with PERSIST, one block per multiprocessor walking the work items (flash_item); the
// next item's Q and first tiles then load while the consumers finish the current one, whose epilogue (the output store)
// a one-item block leaves the tensor cores idle for (+3 % at d64, +1.5 % at d128, H100). 128·(NWG + 1) threads:
// warpgroups 0 … NWG−1 compute (64 query rows each), warpgroup NWG loads. The producer drops to PR registers
// (setmaxnreg) and streams per item Q into one of two buffers (reused once the consumers have stored that item's output
// from it: `empty_q`), then K(n), V(n) for every tile into two stages each with cp.async; after each group it waits for
// the previous group with cp.async.wait_group 1, fences (fence.proxy.async: the tensor cores read what the generic
// proxy wrote) and release-arrives on that stage's `full` mbarrier (128 arrivals). With TMA (the product's; `maps` a
// __grid_constant__ parameter) one thread issues the loads instead and each `full` barrier completes when its bytes
// land (sm90_produce_tma); the cp.async producer stays for scripts/flash/variants.cu's comparisons. Before overwriting
// a stage it waits on the stage's `empty` mbarrier, which every consumer warp arrives on once its wgmma reading the
// stage has completed (4·NWG arrivals). Consumers raise their limit to CR registers and never take a block-wide
// barrier: per tile they issue S(n) = Q·K(n)ᵀ and O += P(n+1)·V(n+1) together, release K as soon as S has landed, run
// the softmax of S(n) while P·V is on the tensor cores, then release V, rescale O and keep P(n) in registers
// (FlashAttention-3's intra-warpgroup overlap). PP (ping-pong, NWG ≥ 2): named barriers make the consumer warpgroups
// issue their products in turn, so one warpgroup's softmax runs under the other's products. No warpgroup skips tiles
// here (a tile none of its rows sees is masked to P = 0). Dynamic shared memory: Sm90ForwardWsSmem<D, BN, NWG,
// PERSIST>::bytes (a one-item block has one Q buffer: d256's two would not fit).
template <int D, int BN, int NWG, bool PERSIST> struct Sm90ForwardWsSmem {
    static constexpr int bytes = ((PERSIST ? 2 : 1) * 64 * NWG + 4 * BN) * D * 2 + 1024 + 128;
};

// Register split for THREADS threads, one block per multiprocessor: the block holds THREADS × ENTRY registers (ENTRY
// = 65536 / THREADS rounded down to a multiple of 8, at most 248); the producer keeps PR, the consumers share the rest
// (at most 240 each).
template <int NWG, int PR> struct Sm90WsRegs {
    static constexpr int THREADS = 128 * (NWG + 1);
    static constexpr int ENTRY0 = (65536 / THREADS) & ~7, ENTRY = ENTRY0 > 248 ? 248 : ENTRY0;
    static constexpr int CR0 = ((ENTRY * THREADS - 128 * PR) / (128 * NWG)) & ~7, CR = CR0 > 240 ? 240 : CR0;
};

// The r-th work item of a forward block: flash_item's (PERSIST: a grid of one block per multiprocessor walks the
// items) or, once, the block's own (flash_block).
template <bool PERSIST> __device__ __forceinline__ bool sm90_item(const FlashParams& p, int r, FlashBlock& b) {
    if (PERSIST) return flash_item(p, r, b);
    b = flash_block();
    return r == 0;
}

// A work item's sequence and first query row, false for an item past its sequence's rows (a pack's shorter ones).
template <int BM> __device__ __forceinline__ bool sm90_item_rows(const FlashParams& p, const FlashBlock& b, FlashSeq& s, int& m0) {
    m0 = (b.tiles - 1 - b.tile) * BM;
    return flash_seq(p, b.seq, s) && m0 < s.len_q;
}

// The warp-specialized forward's mbarriers (8 bytes each, stage or Q buffer i at + 8·i): full_q[2], full_k[2],
// full_v[2] (the producer's 128 arrivals), empty_q[2], empty_k[2], empty_v[2] (one arrival per consumer warp).
struct Sm90WsBars {
    unsigned full_q, full_k, full_v, empty_q, empty_k, empty_v;
    __device__ __forceinline__ explicit Sm90WsBars(unsigned bars)
        : full_q(bars), full_k(bars + 16), full_v(bars + 32), empty_q(bars + 48), empty_k(bars + 64), empty_v(bars + 80) {}
};

// A producer's walk over its block's work items that have rows: item(b, s, m0, blk, kq) for each, kq counting the
// items before it (its Q goes to buffer kq % 2).
template <int BM, int BN, bool PERSIST, typename Item>
__device__ __forceinline__ void sm90_produce_items(const FlashParams& p, Item&& item) {
    FlashBlock b;
    for (int r = 0, kq = 0; sm90_item<PERSIST>(p, r, b); ++r) {
        FlashSeq s;
        int m0;
        if (!sm90_item_rows<BM>(p, b, s, m0)) continue;
        item(b, s, m0, flash_query_block<BM, BN>(p, s, m0, b.head, b.head / (p.n_heads / p.n_kv_heads)), kq++);
    }
}

// The producer warpgroup's loop over its block's items (AL: sm90_load_tile's ALIGNED). Groups: per item Q into
// buffer kq % 2 (kq: the items loaded so far; buffer reuse waits for empty_q), then K(n), V(n) per tile in visiting
// order into stage it % 2 (it: tiles loaded so far, over all items); group i is signalled (full barrier, 128
// arrivals) once group i + 1 has been issued and cp.async.wait_group 1 has seen group i land, so the next item's Q and
// first tiles load while the consumers finish the current one.
template <int AL, int D, int BN, int BM, bool PERSIST>
__device__ __forceinline__ void sm90_produce(const FlashParams& p, unsigned sQ, unsigned sK, unsigned sV, const Sm90WsBars& bar, int ptid) {
    constexpr unsigned KV_BYTES = BN * D * 2, Q_BYTES = BM * D * 2;
    const unsigned hd = p.head_dim;
    unsigned prev = 0;  // the barrier of the last group committed and not yet signalled (0: none)
    const auto commit = [&](unsigned full) {
        cp_async_commit();
        cp_async_wait<1>();
        fence_proxy_async();
        if (prev) mbar_arrive(prev);
        prev = full;
    };
    int it = 0;
    sm90_produce_items<BM, BN, PERSIST>(p, [&](const FlashBlock&, const FlashSeq& s, int m0, const FlashQueryBlock& blk, int kq) {
        const int qb = kq & 1;
        if (kq >= 2) mbar_wait(bar.empty_q + 8 * qb, ((kq >> 1) & 1) ^ 1);
        sm90_load_tile<BM, D, 128, AL>(sQ + qb * Q_BYTES, blk.gq, blk.q_stride, blk.m1 - m0, hd, ptid);
        commit(bar.full_q + 8 * qb);
        for (int n = blk.n_last; n >= blk.n_first; --n, ++it) {
            const int st = it & 1;
            const unsigned ph = (it >> 1) & 1;
            const u64 row = static_cast<u64>(n) * BN * blk.kv_stride;
            if (it >= 2) mbar_wait(bar.empty_k + 8 * st, ph ^ 1);
            sm90_load_tile<BN, D, 128, AL>(sK + st * KV_BYTES, blk.gk + row, blk.kv_stride, s.len_k - n * BN, hd, ptid);
            commit(bar.full_k + 8 * st);
            if (it >= 2) mbar_wait(bar.empty_v + 8 * st, ph ^ 1);
            sm90_load_tile<BN, D, 128, AL>(sV + st * KV_BYTES, blk.gv + row, blk.kv_stride, s.len_k - n * BN, hd, ptid);
            commit(bar.full_v + 8 * st);
        }
    });
    cp_async_wait<0>();
    fence_proxy_async();
    if (prev) mbar_arrive(prev);
}

// The TMA producer: one thread issues every load, each signalled by the hardware when its bytes land (full
// barriers of one arrival, the expected bytes set by that arrival), so no load waits on the issue of another, as
// sm90_produce's cp.async groups do. Per item Q into buffer kq % 2, then the tiles' K and V into stage it % 2, K one
// tile ahead: K(0), K(1), V(0), K(2), V(1), …, V(last). Issuing V(j) waits for both consumer warpgroups to release
// V(j − 2), which the one behind in the ping-pong does late in its iteration j − 1; K(j + 1) issued before it is not
// held up by that. Rows past a sequence's end come from the next sequence (or are zeros past the tensor): such keys
// are masked (P = 0) and such query rows never stored.
template <int D, int BN, int BM, bool PERSIST>
__device__ __forceinline__ void sm90_produce_tma(const FlashParams& p, const FlashMaps& maps, unsigned sQ, unsigned sK, unsigned sV, const Sm90WsBars& bar) {
    constexpr unsigned KV_BYTES = BN * D * 2, Q_BYTES = BM * D * 2;
    tma_prefetch(&maps.q);
    tma_prefetch(&maps.k);
    tma_prefetch(&maps.v);
    int it = 0;
    sm90_produce_items<BM, BN, PERSIST>(p, [&](const FlashBlock& b, const FlashSeq& s, int m0, const FlashQueryBlock& blk, int kq) {
        const int kvh = b.head / (p.n_heads / p.n_kv_heads);
        const int qb = kq & 1;
        if (kq >= 2) mbar_wait(bar.empty_q + 8 * qb, ((kq >> 1) & 1) ^ 1);
        sm90_tma_tile<BM, D>(sQ + qb * Q_BYTES, &maps.q, b.head, s.q0 + m0, bar.full_q + 8 * qb);
        // Tile j of the item (key tile n_last − j) into stage (it + j) % 2, once that stage's last reader released it.
        const auto load = [&](const TmaMap* map, unsigned dst, unsigned empty, unsigned full, int j) {
            const int t = it + j, st = t & 1;
            if (t >= 2) mbar_wait(empty + 8 * st, ((t >> 1) & 1) ^ 1);
            sm90_tma_tile<BN, D>(dst + st * KV_BYTES, map, kvh, s.k0 + (blk.n_last - j) * BN, full + 8 * st);
        };
        const int tiles = max(blk.n_last - blk.n_first + 1, 0);
        if (tiles > 0) load(&maps.k, sK, bar.empty_k, bar.full_k, 0);
        for (int j = 0; j < tiles; ++j) {
            if (j + 1 < tiles) load(&maps.k, sK, bar.empty_k, bar.full_k, j + 1);
            load(&maps.v, sV, bar.empty_v, bar.full_v, j);
        }
        it += tiles;
    });
}

template <typename T, int D, int BN, int NWG, bool PP, int PR, bool LAZY = false, bool PERSIST = false, bool TMA = false>
__device__ __forceinline__ void flash_forward_sm90_ws(const FlashParams p, const FlashMaps* maps = nullptr) {
    constexpr int BM = 64 * NWG, CT = 128 * NWG;
    constexpr int CR = Sm90WsRegs<NWG, PR>::CR;
    static_assert(D % 64 == 0 && D <= 256 && BN % 16 == 0 && BN <= 256, "tile shape");
    static_assert(PR >= 24 && PR % 8 == 0 && CR >= PR, "register split");
    constexpr unsigned KV_BYTES = BN * D * 2, Q_BYTES = BM * D * 2;
    const unsigned sQ = (smem_u32(flash_smem) + 1023u) & ~1023u;
    const unsigned sK = sQ + (PERSIST ? 2 : 1) * Q_BYTES, sV = sK + 2 * KV_BYTES;
    const Sm90WsBars bar(sV + 2 * KV_BYTES);
    const int tid = threadIdx.x, wg = tid / 128;

    if (tid == 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            // TMA: the one issuing thread's arrival (with the bytes); cp.async: every producer thread's.
            mbar_init(bar.full_q + 8 * i, TMA ? 1 : 128);
            mbar_init(bar.full_k + 8 * i, TMA ? 1 : 128);
            mbar_init(bar.full_v + 8 * i, TMA ? 1 : 128);
            mbar_init(bar.empty_q + 8 * i, 4 * NWG);
            mbar_init(bar.empty_k + 8 * i, 4 * NWG);
            mbar_init(bar.empty_v + 8 * i, 4 * NWG);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == NWG) {
        // ---- producer ----
        setmaxnreg_dec<PR>();
        if (TMA) {
            if (tid == CT) sm90_produce_tma<D, BN, BM, PERSIST>(p, *maps, sQ, sK, sV, bar);
            return;
        }
        // One loop per row alignment, so only one load path's values are live in it.
        if (p.head_dim % 8 == 0) sm90_produce<1, D, BN, BM, PERSIST>(p, sQ, sK, sV, bar, tid - CT);
        else sm90_produce<-1, D, BN, BM, PERSIST>(p, sQ, sK, sV, bar, tid - CT);
        return;
    }

    // ---- consumers ----
    setmaxnreg_inc<CR>();
    // Ping-pong: this warpgroup's turn to issue, then the next one's. The turns run on across items (both warpgroups
    // take the same tiles), so warpgroup 0 is given the first one once.
    const auto my_turn = [&] {
        if (PP && NWG > 1) named_sync(1 + wg, 256);
    };
    const auto pass_turn = [&] {
        if (PP && NWG > 1) named_arrive(1 + (wg + 1) % NWG, 256);
    };
    if (PP && NWG > 1 && wg == NWG - 1) named_arrive(1, 256);
    int kq = 0, it = 0;
    FlashBlock b;
    for (int r = 0; sm90_item<PERSIST>(p, r, b); ++r) {
        FlashSeq s;
        int m0;
        if (!sm90_item_rows<BM>(p, b, s, m0)) continue;
        const Sm90QueryBlock blk = sm90_query_block<BM, BN>(p, s, m0, b.head);
        const int qb = kq & 1, lane = blk.lane;
        const unsigned sQb = sQ + qb * Q_BYTES;
        const int wr0 = m0 + 64 * wg, wr1 = min(wr0 + 64, s.len_q);
        const int wi_min = wr0 + blk.off, wi_max = wr1 - 1 + blk.off;
        float o[D / 2], sacc[BN / 2];
        unsigned pf[BN / 16][4];
        float row_max[2], row_sum[2];
        Sm90Rows<T, D, BN, BM, LAZY> rows(p, s, sQb, sK, sV, wg, blk.t, wi_min, wi_max, o, sacc, pf, row_max, row_sum, m0, blk.warp, blk.g);
        mbar_wait(bar.full_q + 8 * qb, (kq >> 1) & 1);
        const int it0 = it;
        for (int n = blk.n_last; n >= blk.n_first; --n, ++it) {
            const int st = it & 1, pst = st ^ 1;  // pst: the stage of tile n + 1 (iteration it − 1)
            const auto release_k = [&] {
                if (lane == 0) mbar_arrive(bar.empty_k + 8 * st);
            };
            mbar_wait(bar.full_k + 8 * st, (it >> 1) & 1);
            if (it > it0) {
                mbar_wait(bar.full_v + 8 * pst, ((it - 1) >> 1) & 1);
                my_turn();
                rows.step_overlapped(n, st, pst, pass_turn, release_k, [&] {
                    if (lane == 0) mbar_arrive(bar.empty_v + 8 * pst);
                });
            } else {
                my_turn();
                rows.step_s(n, st, pass_turn, release_k);
            }
        }
        if (it > it0) {
            const int st = (it - 1) & 1;  // P(n_first)·V(n_first)
            mbar_wait(bar.full_v + 8 * st, ((it - 1) >> 1) & 1);
            rows.step_pv(st);
            if (lane == 0) mbar_arrive(bar.empty_v + 8 * st);
        }

        rows.stage_output(m0, blk.h, blk.warp, blk.g);
        named_sync(1 + NWG + wg, 128);
        sm90_store_rows<BM, 64, D, 128>(static_cast<unsigned short*>(p.out) + blk.q_row0, blk.q_stride, sQb, 64 * wg, blk.m1 - m0, blk.hd, tid - 128 * wg);
        // The producer may load a later item's Q into this buffer once every consumer warp has read its rows out
        // (by TMA, the async proxy: the generic reads and writes of the output come before it).
        if (TMA) fence_proxy_async();
        __syncwarp();
        if (lane == 0) mbar_arrive(bar.empty_q + 8 * qb);
        ++kq;
    }
}

