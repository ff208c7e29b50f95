// Flash attention backward on Hopper wgmma (sm_90a): flash_backward_sm90 (D = 64, 128; the product's) and
// flash_backward_sm90_split (two warpgroups sharing a key tile, for D = 256; a variant for scripts/flash/), the twins
// of flash_attention.cuh's flash_backward. Include after flash_wgmma.cuh.
#pragma once

// ---- Pieces ------------------------------------------------------------------------------------------------

__device__ __forceinline__ void red_add_v2(float* p, float a, float b) {
    asm volatile("red.global.v2.f32.add [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
}

// Backward step 2a for one 64-key × NQ-query accumulator pair (Sᵀ in s; entry i: key kj + 8·((i%4)/2), query
// m0 + 8·(i/4) + 2t + i%2): P = exp2(S·pre − lse·log2e) (capped: post·tanh(pre·S)), masked to 0, rounded to T as A
// fragments pf (k-step kk = queries 16kk …); s keeps in place what dS is formed from, P in f32 (capped: P·(1 − tanh²)),
// so step 2b needs neither the scores nor the mask. cL: shared address of the lse of this thread's first query
// m0 + 2t. MASK / CAP as in sm90_softmax_tile.
template <typename T, int NQ, bool MASK, bool CAP>
__device__ __forceinline__ void sm90_bwd_p(float (&s)[NQ / 2], unsigned (&pf)[NQ / 16][4], unsigned cL, const FlashParams& p, const FlashSeq& sq,
                                           const ScoreMap& sm, int kj, int m0, int off, int t) {
    // Key j is visible to query r iff j < len_k, r < len_q, (!causal || r ≥ j − off) and (!window || r < j − off +
    // window): a query range [lo, hi) per key row, relative to this thread's first query m0 + 2t. Queries past len_q
    // are masked, not left to zero-filled rows: a TMA load fills them with the next sequence's.
    int lo[2], hi[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int j = kj + 8 * hr;
        lo[hr] = (p.causal ? j - off : -(1 << 29)) - (m0 + 2 * t);
        hi[hr] = j < sq.len_k ? min(p.window ? j - off + p.window : (1 << 29), sq.len_q) - (m0 + 2 * t) : -(1 << 29);
    }
#pragma unroll
    for (int kk = 0; kk < NQ / 16; ++kk) {
        float pv[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) {
            const int i = 8 * kk + x, hr = (i % 4) / 2, c = 8 * (i / 4) + (i % 2);  // c: query − (m0 + 2t)
            const float l = ld_shared_f32(cL + 4 * c);
            const float l2 = l == f32_neg_inf() ? f32_pos_inf() : l * FLASH_LOG2E;
            float th = 0.0f, pr;
            if (CAP) {
                th = tanh_fast(sm.pre * s[i]);
                pr = ex2(sm.post * th - l2);
            } else {
                pr = ex2(fmaf(s[i], sm.pre, -l2));
            }
            if (MASK && (c < lo[hr] || c >= hi[hr])) pr = 0.0f;
            pv[x] = pr;
            s[i] = CAP ? pr * (1.0f - th * th) : pr;
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) pf[kk][r] = pack2<T>(pv[2 * r], pv[2 * r + 1]);
    }
}

// Backward step 2b: dS = P·(dP − delta)·scale from step 2a's s and the dPᵀ accumulator dp (same entries), rounded to
// T as A fragments dsf. cD: shared address of the delta of this thread's first query.
template <typename T, int NQ>
__device__ __forceinline__ void sm90_bwd_ds(const float (&s)[NQ / 2], const float (&dp)[NQ / 2], unsigned (&dsf)[NQ / 16][4], unsigned cD, float scale) {
#pragma unroll
    for (int kk = 0; kk < NQ / 16; ++kk) {
        float dv[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) {
            const int i = 8 * kk + x, c = 8 * (i / 4) + (i % 2);
            dv[x] = s[i] * (dp[i] - ld_shared_f32(cD + 4 * c)) * scale;
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) dsf[kk][r] = pack2<T>(dv[2 * r], dv[2 * r + 1]);
    }
}

// Step 2a's four (mask, cap) instantiations behind one call. `full`: every (key, query) pair of the tile is visible.
template <typename T, int NQ>
__device__ __forceinline__ void sm90_bwd_p_any(float (&s)[NQ / 2], unsigned (&pf)[NQ / 16][4], unsigned cL, const FlashParams& p, const FlashSeq& sq,
                                               const ScoreMap& sm, bool full, int kj, int m0, int off, int t) {
    if (sm.capped) {
        if (full) sm90_bwd_p<T, NQ, false, true>(s, pf, cL, p, sq, sm, kj, m0, off, t);
        else sm90_bwd_p<T, NQ, true, true>(s, pf, cL, p, sq, sm, kj, m0, off, t);
    } else {
        if (full) sm90_bwd_p<T, NQ, false, false>(s, pf, cL, p, sq, sm, kj, m0, off, t);
        else sm90_bwd_p<T, NQ, true, false>(s, pf, cL, p, sq, sm, kj, m0, off, t);
    }
}

// flash_common.cuh's backward geometry with this thread's coordinates (warpgroup wg), which the wgmma kernels read as
// signed ints.
template <int BM> struct Sm90KeyBlock : FlashKeyBlock<BM> {
    int tid, warp, lane, g, t, wg;
};

template <int BM, int BN>
__device__ __forceinline__ Sm90KeyBlock<BM> sm90_key_block(const FlashParams& p, const FlashSeq& s, int n0, int kvh) {
    const int group = p.n_heads / p.n_kv_heads;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4, wg = warp / 4;
    return Sm90KeyBlock<BM>{flash_key_block<BM, BN>(p, s, n0, kvh, group), tid, warp, lane, g, t, wg};
}

// Pair it's lse and delta into stage st of sL, sD (f32 [2][64]) by threads tid < BM with cp.async (rows past the
// sequence zero-filled).
template <int BM>
__device__ __forceinline__ void sm90_bwd_stats(const FlashParams& p, const FlashSeq& s, const FlashKeyBlock<BM>& blk, int it, int st, unsigned sL, unsigned sD, int tid) {
    const int m0 = blk.row0(it);
    const u64 row0 = static_cast<u64>(s.q0 + m0) * p.n_heads + blk.head(it);
    const bool in = tid < s.len_q - m0;
    cp_async4(sL + st * BM * 4 + 4 * tid, in ? p.lse + (row0 + static_cast<u64>(tid) * p.n_heads) : p.lse, in ? 4u : 0u);
    cp_async4(sD + st * BM * 4 + 4 * tid, in ? p.delta + (row0 + static_cast<u64>(tid) * p.n_heads) : p.delta, in ? 4u : 0u);
}

// Pair it's Q, dO, lse and delta into stage st of the double-buffered tiles at sQ, sdO ([2][64][D], swizzled) and sL,
// sD (f32 [2][64]), by all THREADS threads with cp.async (committed by the caller).
template <int D, int BM, int THREADS>
__device__ __forceinline__ void sm90_bwd_prefetch(const FlashParams& p, const FlashSeq& s, const FlashKeyBlock<BM>& blk, int it, int st, unsigned sQ,
                                                  unsigned sdO, unsigned sL, unsigned sD) {
    constexpr unsigned QO_BYTES = BM * D * 2;
    const int tid = threadIdx.x;
    const int h = blk.head(it), m0 = blk.row0(it);
    const u64 row0 = static_cast<u64>(s.q0 + m0) * p.n_heads + h;
    const int rows = min(BM, s.len_q - m0);
    sm90_load_tile<BM, D, THREADS>(sQ + st * QO_BYTES, static_cast<const unsigned short*>(p.q) + row0 * blk.hd, blk.q_stride, rows, blk.hd, tid);
    sm90_load_tile<BM, D, THREADS>(sdO + st * QO_BYTES, static_cast<const unsigned short*>(p.d_out) + row0 * blk.hd, blk.q_stride, rows, blk.hd, tid);
    if (tid < BM) sm90_bwd_stats<BM>(p, s, blk, it, st, sL, sD, tid);
}

// The TMA backward's loads of pair it into stage st by lane `tid` of the producer warp: row tid's lse and delta by
// cp.async, the landing of every cp.async this thread issued counted on `full` (cp.async.mbarrier.arrive.noinc), and
// lane 0's Q and dO by TMA (two arrivals with their bytes).
template <int D, int BM>
__device__ __forceinline__ void sm90_bwd_load_tma(const FlashParams& p, const FlashMaps& maps, const FlashSeq& s, const FlashKeyBlock<BM>& blk, int it, int st,
                                                  unsigned sQ, unsigned sdO, unsigned sL, unsigned sD, unsigned full, int tid) {
    constexpr unsigned QO_BYTES = BM * D * 2;
    sm90_bwd_stats<BM>(p, s, blk, it, st, sL, sD, tid);
    cp_async_mbar_arrive_noinc(full);
    if (tid == 0) {
        const int h = blk.head(it), row = s.q0 + blk.row0(it);
        sm90_tma_tile<BM, D>(sQ + st * QO_BYTES, &maps.q, h, row, full);
        sm90_tma_tile<BM, D>(sdO + st * QO_BYTES, &maps.d_out, h, row, full);
    }
}

// The block's K and V tile into sK, sV, and pair 0 (if any) through `prefetch`: one cp.async group.
template <int D, int BN, int THREADS, int BM, typename Prefetch>
__device__ __forceinline__ void sm90_bwd_start(const FlashParams& p, const Sm90KeyBlock<BM>& blk, int n0, unsigned sK, unsigned sV, Prefetch& prefetch) {
    sm90_load_tile<BN, D, THREADS>(sK, static_cast<const unsigned short*>(p.k) + blk.kv_row0, blk.kv_stride, blk.n1 - n0, blk.hd, blk.tid);
    sm90_load_tile<BN, D, THREADS>(sV, static_cast<const unsigned short*>(p.v) + blk.kv_row0, blk.kv_stride, blk.n1 - n0, blk.hd, blk.tid);
    if (blk.pairs > 0) prefetch(0, 0);
    cp_async_commit();
}

// The pair in flight has landed and every thread is done with the one before it (its stage and the dSᵀ tile).
__device__ __forceinline__ void sm90_bwd_pair_landed() {
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
}

// Pair it + 1, if any, starts loading into stage st ^ 1.
template <typename Prefetch>
__device__ __forceinline__ void sm90_bwd_load_next(int it, int st, int pairs, Prefetch& prefetch) {
    if (it + 1 < pairs) prefetch(it + 1, st ^ 1);
    cp_async_commit();
}

// Pair it (stage st) has landed; pair it + 1 starts loading.
template <typename Prefetch>
__device__ __forceinline__ void sm90_bwd_next_pair(int it, int st, int pairs, Prefetch& prefetch) {
    sm90_bwd_pair_landed();
    sm90_bwd_load_next(it, st, pairs, prefetch);
}

// dQ of query rows r0, r0 + 8 (sequence-relative; entry i of dq: row r0 + 8·((i%4)/2), column c0 + 8·(i/4) + 2t + i%2)
// added to the f32 dq_accum, two columns per red.global.add.v2 where both are inside the row and aligned.
template <int NC>
__device__ __forceinline__ void sm90_add_dq(const FlashParams& p, const FlashSeq& s, int h, unsigned hd, int r0, int c0, int t, const float (&dq)[NC / 2]) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int r = r0 + 8 * hr;
        if (r >= s.len_q) continue;
        float* dst = p.dq_accum + (static_cast<u64>(s.q0 + r) * p.n_heads + h) * hd;
#pragma unroll
        for (int j = 0; j < NC / 8; ++j) {
            const unsigned c = c0 + 8 * j + 2 * t;
            const float a = dq[4 * j + 2 * hr], b = dq[4 * j + 2 * hr + 1];
            if (hd % 2 == 0 && c + 1 < hd) {
                red_add_v2(dst + c, a, b);
            } else {
                if (c < hd) red_add(dst + c, a);
                if (c + 1 < hd) red_add(dst + c + 1, b);
            }
        }
    }
}

// Staged dQ (STAGED_DQ without TMA: scripts/flash/'s cp.async variants): the block's dQ of a pair as an f32 tile
// [64 queries][D] in shared memory, rows DQ_ROW bytes apart (32 bytes of padding: a half-warp's 8-byte stores of 4
// rows × 4 column pairs then cover all 32 banks), added to dq_accum by the TMA unit one row per bulk reduce-add, so
// the threads issue no atomics.
template <int D> struct Sm90StagedDq {
    static constexpr unsigned ROW = D * 4 + 32, BYTES = 64 * ROW;
};

// This thread's dQ (entry i: query row rq + 8·((i%4)/2), column c0 + 8·(i/4) + 2t + i%2) into the staging tile.
template <int D, int NC>
__device__ __forceinline__ void sm90_stage_dq(unsigned sdq, int rq, int c0, int t, const float (&dq)[NC / 2]) {
    constexpr unsigned ROW = Sm90StagedDq<D>::ROW;
    const unsigned base = sdq + rq * ROW + 4 * (c0 + 2 * t);
#pragma unroll
    for (int hr = 0; hr < 2; ++hr)
#pragma unroll
        for (int j = 0; j < NC / 8; ++j) st_shared_v2_f32(base + hr * 8 * ROW + 32 * j, dq[4 * j + 2 * hr], dq[4 * j + 2 * hr + 1]);
}

// Pair it's staged dQ (every thread's stores fenced and past a block barrier) added to dq_accum: thread r < 64 (or the
// caller's row r) issues row r's bulk reduce-add of hd floats (hd % 4 == 0).
template <int D, int BM>
__device__ __forceinline__ void sm90_flush_dq(const FlashParams& p, const FlashSeq& s, const FlashKeyBlock<BM>& blk, int it, unsigned sdq,
                                              int r = threadIdx.x) {
    const int m = blk.row0(it) + r;
    if (r >= BM || m >= s.len_q) return;
    float* dst = p.dq_accum + (static_cast<u64>(s.q0 + m) * p.n_heads + blk.head(it)) * blk.hd;
    bulk_add_f32(dst, sdq + r * Sm90StagedDq<D>::ROW, 4 * blk.hd);
}

// The warp-specialized backward's staged dQ: the f32 tile [64 queries][D] as D/32 column blocks of [64][32] (8 KB
// each, 1024-aligned), 16-byte chunk k4 of row r at chunk k4 ^ (r % 8): the layout of dq_accum's TMA box (32 columns,
// 128-byte swizzle), so that one tensor reduce-add per column block adds a pair's dQ. A half-warp's 8-byte stores (4
// rows × 4 column pairs) then cover all 32 banks, as the padded rows do.
template <int D> struct Sm90SwizzledDq {
    static constexpr unsigned BLOCK = 64 * 128, BYTES = (D / 32) * BLOCK;
};

// Columns [c_first, c_end) of a staged dQ tile (its 32-column blocks of Sm90SwizzledDq's layout from `src`, c_first %
// 32 = 0) added to dq_accum's 64 rows from `row` of head h by one tensor reduce-add per block; blocks from column hd
// on hold no head dims and are not added. One thread issues them.
template <int D>
__device__ __forceinline__ void sm90_reduce_add_dq(const FlashMaps& maps, unsigned src, int c_first, int c_end, int hd, int h, int row) {
    for (int c = c_first; c < c_end && c < hd; c += 32) tma_reduce_add_3d(&maps.dq_accum, src + (c - c_first) / 32 * Sm90SwizzledDq<D>::BLOCK, c, h, row);
}

// This thread's dQ (entry i: query row rq + 8·((i%4)/2), column c0 + 8·(i/4) + 2t + i%2; c0 % 32 = 0) into the
// swizzled staging tile: column c is chunk (c % 32)/4 of block c/32, and the chunk bits of the row base
// ((t/2) ^ (rq % 8)) take the column's 8·(j % 4) as an XOR.
template <int NC>
__device__ __forceinline__ void sm90_stage_dq_sw128(unsigned sdq, int rq, int c0, int t, const float (&dq)[NC / 2]) {
    constexpr unsigned BLOCK = 64 * 128;
    const unsigned base = sdq + (c0 / 32) * BLOCK + rq * 128 + (((t >> 1) ^ (rq & 7)) << 4) + (t & 1) * 8;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr)
#pragma unroll
        for (int j = 0; j < NC / 8; ++j)
            st_shared_v2_f32(((base + hr * 8 * 128) ^ ((2 * (j % 4)) << 4)) + (j / 4) * BLOCK, dq[4 * j + 2 * hr], dq[4 * j + 2 * hr + 1]);
}

// dK and dV of key rows kr0, kr0 + 8 of the block (entry i: row kr0 + 8·((i%4)/2), column c0 + 8·(i/4) + 2t + i%2),
// rounded to T: rows < len_k, columns < hd.
template <typename T, int NC, int BM>
__device__ __forceinline__ void sm90_store_dkdv(const FlashParams& p, const FlashSeq& s, const FlashKeyBlock<BM>& blk, int n0, int kr0, int c0, int t,
                                                const float (&dk)[NC / 2], const float (&dv)[NC / 2]) {
    unsigned short* gdk = static_cast<unsigned short*>(p.dk) + blk.kv_row0;
    unsigned short* gdv = static_cast<unsigned short*>(p.dv) + blk.kv_row0;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int r = kr0 + 8 * hr;
        if (n0 + r >= s.len_k) continue;
#pragma unroll
        for (int j = 0; j < NC / 8; ++j) {
            const unsigned c = c0 + 8 * j + 2 * t;
            const unsigned pk = pack2<T>(dk[4 * j + 2 * hr], dk[4 * j + 2 * hr + 1]);
            const unsigned pvv = pack2<T>(dv[4 * j + 2 * hr], dv[4 * j + 2 * hr + 1]);
            flash_store_kv_pair(gdk, gdv, r, blk.kv_stride, c, blk.hd, pk, pvv);
        }
    }
}

// ---- Backward, one warpgroup per 64 keys ---------------------------------------------------------------------

// The TMA backward's K and V tiles of the block's BN keys from key n0, by the calling thread, counted on `kv`.
template <int D, int BM, int BN>
__device__ __forceinline__ void sm90_bwd_load_kv(const FlashMaps& maps, const FlashSeq& s, const FlashKeyBlock<BM>& blk, int n0, unsigned sK,
                                                 unsigned sV, unsigned kv_bar) {
    const int row = s.k0 + n0;
    sm90_tma_tile<BN, D>(sK, &maps.k, blk.kvh, row, kv_bar);
    sm90_tma_tile<BN, D>(sV, &maps.v, blk.kvh, row, kv_bar);
}

// The warp-specialized backward's loads, by one producer warp: K and V once (`kv`), then each pair's Q and dO by TMA
// (lane 0) and its lse and delta by cp.async (rows lane and lane + 32), all counted on the stage's `full` mbarrier (32
// .noinc arrivals and two with their bytes); a stage is refilled once the consumers' warps have released it (`empty`).
template <int D, int BM, int BN>
__device__ __forceinline__ void sm90_bwd_produce(const FlashParams& p, const FlashMaps& maps, const FlashSeq& s, const FlashKeyBlock<BM>& blk, int n0,
                                                 unsigned sK, unsigned sV, unsigned sQ, unsigned sdO, unsigned sL, unsigned sD, unsigned full_bar,
                                                 unsigned empty_bar, unsigned kv_bar, int lane) {
    if (lane == 0) sm90_bwd_load_kv<D, BM, BN>(maps, s, blk, n0, sK, sV, kv_bar);
    for (int it = 0; it < blk.pairs; ++it) {
        const int st = it & 1;
        if (it >= 2) mbar_wait(empty_bar + 8 * st, ((it >> 1) - 1) & 1);  // pair it − 2's use of the stage is over
        sm90_bwd_stats<BM>(p, s, blk, it, st, sL, sD, lane + 32);
        sm90_bwd_load_tma<D, BM>(p, maps, s, blk, it, st, sQ, sdO, sL, sD, full_bar + 8 * st, lane);
    }
}

// The warp-specialized backward's dQ writer, one thread: each pair's staged dQ (Sm90SwizzledDq), once the consumers'
// warps have stored it (`dq_full`), added to dq_accum by one tensor reduce-add per column block (at most 4, where a
// bulk reduce-add per row took 64), the tile released (`dq_empty`) once read; the block exits only when the adds are.
// A box spans 64 rows whatever the sequence's length: its rows past len_q hold zeros (their P and dS are masked to 0
// and K is finite), which land on the next sequence's rows or past the tensor.
template <int D, int BM>
__device__ __forceinline__ void sm90_bwd_write_dq(const FlashMaps& maps, const FlashSeq& s, const FlashKeyBlock<BM>& blk, unsigned sdq,
                                                  unsigned dq_full, unsigned dq_empty) {
    for (int it = 0; it < blk.pairs; ++it) {
        mbar_wait(dq_full, it & 1);
        sm90_reduce_add_dq<D>(maps, sdq, 0, static_cast<int>(blk.hd), static_cast<int>(blk.hd), blk.head(it), s.q0 + blk.row0(it));
        bulk_wait_read<0>();
        mbar_arrive(dq_empty);
    }
    bulk_wait();
}

template <int D, int NWG, bool STAGED_DQ = false, bool DEFER_DQ = false, bool TMA = false> struct Sm90BackwardSmem {
    // K, V [BN][D]; Q, dO [2][64][D]; dSᵀ [BN][64]; lse, delta [2][64] f32; the staged dQ tiles (two when deferred;
    // with TMA, warp-specialized, the swizzled one); with TMA a second dSᵀ tile and the mbarriers (64 bytes);
    // 1 KB alignment slack.
    static constexpr int BN = 64 * NWG;
    static constexpr int DQ_TILES = STAGED_DQ ? (DEFER_DQ ? 2 : 1) : 0;
    static constexpr unsigned DQ_TILE = TMA ? Sm90SwizzledDq<D>::BYTES : Sm90StagedDq<D>::BYTES;
    static constexpr int bytes = 2 * BN * D * 2 + 4 * 64 * D * 2 + BN * 64 * 2 + 4 * 64 * 4 + DQ_TILES * DQ_TILE + (TMA ? BN * 64 * 2 + 64 : 0) + 1024;
};

// Grid (n_kv_heads, n_seqs, ⌈max_seqlen_k / BN⌉) with BN = 64·NWG keys per block, 128·NWG threads; NWG warpgroups,
// warpgroup w owning keys 64w … 64w + 63 of the tile. As flash_backward, a block keeps its K/V tile in shared memory
// and dK, dV in registers, and walks every (query head of its GQA group, query tile of 64 rows) pair that sees the
// tile, double-buffering Q, dO, lse and delta with cp.async (all threads load). Per pair and warpgroup:
//   1. Sᵀ = K_w·Qᵀ and dPᵀ = V_w·dOᵀ (wgmma SS, M = the warpgroup's 64 keys, N = 64 queries, both K-major);
//   2. P = exp2(S·log2e·scale − lse), dS = P ⊙ (dP − delta) (⊙ 1 − tanh² under a softcap) · scale, in registers
//      (masked entries 0); Pᵀ and dSᵀ become A fragments straight from the accumulators (as P in the forward), and dSᵀ
//      is also stored (bf16/f16, swizzled [key][query]) for step 4;
//   3. dV += Pᵀ·dO and dK += dSᵀ·Q (wgmma RS, B = dO / Q N-major);
//   4. after a block barrier, dQ[:, D/NWG columns of warpgroup w] = dS·K (wgmma SS, A = dS M-major from the stored
//      dSᵀ, B = K N-major), added to the f32 dq_accum with red.global.add.v2.f32 (zeroed before, converted after).
// GQA sums over the group's heads in registers, so dK and dV need no atomics. D is 64 or 128 (dK and dV take D
// registers per thread). OVERLAP splits steps 1–3 so that the tensor cores work under the exponentials: Sᵀ and dPᵀ
// are committed apart, P is formed once Sᵀ has landed (dPᵀ still running), dV's product is issued, and dS is formed
// under it. STAGED_DQ replaces step 4's atomics (where hd % 4 == 0) by the staged dQ: a pair's dQ is stored to shared
// memory and added by bulk reduce-adds issued after the next block barrier. DEFER_DQ leaves a pair's dQ product
// running into the next pair: its result is stored (staged in two alternating tiles, or added by atomics) once the
// next pair's Sᵀ and dPᵀ are issued, so the tensor cores never drain between pairs. TMA (`maps` a __grid_constant__
// parameter; STAGED_DQ; 128·(NWG + 1) threads) is warp-specialized as FlashAttention-3's backward: the stage's
// `full` mbarrier replaces a pair's first block barrier, and warpgroup NWG is a producer of 24 registers (setmaxnreg;
// the consumers take 240) whose first warp loads K and V by TMA, then each pair's Q and dO by TMA and lse and delta by
// cp.async (sm90_bwd_produce), counted on the stage's `full` mbarrier, and whose second warp adds each pair's staged
// dQ (sm90_bwd_write_dq). No
// consumer issues a load or waits for one's issue: a consumer warp releases its stage (`empty`) once the pair's
// products are done, stages dQ once the writer has read the previous pair's (`dq_empty`) and hands it over
// (`dq_full`), and the consumer warpgroups meet before dQ on a named barrier instead of the block barrier. dSᵀ is
// double-buffered, so a warpgroup ahead stores the next pair's while the other still reads this one's (the barrier
// before dQ orders every later reuse). Dynamic shared memory: Sm90BackwardSmem<D, NWG, STAGED_DQ, DEFER_DQ,
// TMA>::bytes. SEQ_MAJOR: the grid is (n_kv_heads, tiles, n_seqs) (flash_block).
template <typename T, int D, int NWG, bool OVERLAP = false, bool STAGED_DQ = false, bool DEFER_DQ = false, bool TMA = false,
          bool SEQ_MAJOR = false>
__device__ __forceinline__ void flash_backward_sm90(const FlashParams p, const FlashMaps* maps = nullptr) {
    static_assert(!TMA || (STAGED_DQ && !DEFER_DQ), "the TMA backward stages dQ and does not defer it");
    constexpr int BM = 64, BN = 64 * NWG, THREADS = 128 * NWG, NO = D / 2, DQN = D / NWG;
    static_assert((D == 64 || D == 128) && DQN % 16 == 0, "shape");
    constexpr unsigned KV_BYTES = BN * D * 2, QO_BYTES = BM * D * 2;
    const unsigned sK = (smem_u32(flash_smem) + 1023u) & ~1023u;
    const unsigned sV = sK + KV_BYTES, sQ = sV + KV_BYTES, sdO = sQ + 2 * QO_BYTES, sdS = sdO + 2 * QO_BYTES;
    const unsigned sL = sdS + BN * BM * 2, sD = sL + 2 * BM * 4;  // f32 [2][BM] each
    // STAGED_DQ: the staging tile(s) at sdS + DQ_OFF (1024-aligned), Sm90SwizzledDq<D> when warp-specialized.
    constexpr unsigned DQ_OFF = BN * BM * 2 + 4 * BM * 4;
    using Smem = Sm90BackwardSmem<D, NWG, STAGED_DQ, DEFER_DQ, TMA>;
    // TMA: the second dSᵀ tile, then the mbarriers full[2], empty[2], kv (8 bytes each).
    const unsigned sdS1 = sdS + DQ_OFF + Smem::DQ_TILES * Smem::DQ_TILE, full_bar = sdS1 + BN * BM * 2, empty_bar = full_bar + 16, kv_bar = empty_bar + 16;
    const unsigned dq_full = kv_bar + 8, dq_empty = kv_bar + 16;

    const FlashBlock b = flash_block<SEQ_MAJOR>();
    FlashSeq s;
    if (!flash_seq(p, b.seq, s)) return;
    const int n0 = b.tile * BN;
    if (n0 >= s.len_k) return;
    const Sm90KeyBlock<BM> blk = sm90_key_block<BM, BN>(p, s, n0, b.head);
    auto prefetch = [&](int it, int st) { sm90_bwd_prefetch<D, BM, THREADS>(p, s, blk, it, st, sQ, sdO, sL, sD); };
    if constexpr (TMA) {
        if (blk.tid == 0) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                // A stage's arrivals: the producer warp's lanes' cp.async, then Q's and dO's bytes.
                mbar_init(full_bar + 8 * i, 32 + 2);
                mbar_init(empty_bar + 8 * i, 4 * NWG);
            }
            mbar_init(kv_bar, 2);
            mbar_init(dq_full, 4 * NWG);
            mbar_init(dq_empty, 1);
            mbar_init_fence();
        }
        __syncthreads();
        if (blk.wg == NWG) {
            // The producer warpgroup: its first warp loads, its second's first lane adds the staged dQ, the rest are done.
            setmaxnreg_dec<24>();
            const int lane = blk.lane;
            if (blk.warp == 4 * NWG)
                sm90_bwd_produce<D, BM, BN>(p, *maps, s, blk, n0, sK, sV, sQ, sdO, sL, sD, full_bar, empty_bar, kv_bar, lane);
            else if (blk.warp == 4 * NWG + 1 && lane == 0)
                sm90_bwd_write_dq<D, BM>(*maps, s, blk, sdS + DQ_OFF, dq_full, dq_empty);
            return;
        }
        setmaxnreg_inc<240>();
        mbar_wait(kv_bar, 0);
    } else {
        sm90_bwd_start<D, BN, THREADS>(p, blk, n0, sK, sV, prefetch);
    }
    const int warp = blk.warp, g = blk.g, t = blk.t, wg = blk.wg, off = blk.off;
    const unsigned hd = blk.hd;
    const bool staged = STAGED_DQ && hd % 4 == 0;  // bulk copies move 16-byte multiples

    float dk[NO], dv[NO];
#pragma unroll
    for (int i = 0; i < NO; ++i) dk[i] = dv[i] = 0.0f;
    const int kr0 = 16 * warp + g;  // this thread's key rows in the tile: kr0, kr0 + 8

    constexpr unsigned DQ_TILE = Smem::DQ_TILE;
    // This thread's dQ of pair j (head h, first row m0), entry i: query 16·(warp%4) + g + 8·((i%4)/2), column
    // c0 + 8·(i/4) + 2t + i%2, staged (in tile j % 2 when deferred) or added by atomics. The row offset comes from an
    // opaque thread index: kept across the pair loop, it was the one value D = 128 spilled.
    auto put_dq = [&](int j, int h, int m0, const float (&q)[DQN / 2]) {
        const int c0 = wg * DQN;
        const int tid_q = static_cast<int>(opaque(threadIdx.x)), rq = 16 * ((tid_q / 32) % 4) + (tid_q % 32) / 4;
        if (TMA) sm90_stage_dq_sw128<DQN>(opaque(sdS) + DQ_OFF, rq, c0, t, q);
        else if (staged) sm90_stage_dq<D, DQN>(opaque(sdS) + DQ_OFF + (DEFER_DQ ? (j & 1) * DQ_TILE : 0), rq, c0, t, q);
        else sm90_add_dq<DQN>(p, s, h, hd, m0 + rq, c0, t, q);
    };
    // 4. dQ[64 queries][DQN columns c0 …] = dS·K of the pair whose dSᵀ is in place at cdS (K at cK): A = dS M-major
    // (the stored dSᵀ), B = K N-major; one commit group.
    float dq[DQN / 2];
    auto issue_dq = [&](unsigned cK, unsigned cdS) {
        const int c0 = wg * DQN;
        const unsigned k_cols = cK + (c0 / 64) * (BN * 128) + (c0 % 64) * 2;
        wg_fence();
        Wgmma<DQN>::template ss0<T, 1, 1>(dq, desc_mn<BN>(cdS, 0), desc_sw128(k_cols, BN * 128));
#pragma unroll
        for (int kk = 1; kk < BN / 16; ++kk)
            Wgmma<DQN>::template ss<T, 1, 1>(dq, desc_mn<BN>(cdS, kk), desc_sw128(k_cols + kk * 2048, BN * 128), 1);
        wg_commit();
    };

    // The pair walk. DEFER_DQ rotates it: pair it opens by issuing pair it − 1's dQ, which then runs under this pair's
    // barrier, loads and first products, and nothing is in flight across the loop's back edge (ptxas cannot count
    // wgmma groups across it and would serialize every wgmma). Pair 0 is peeled (`first`, a constant at each call once
    // inlined) so that each copy issues a fixed sequence of groups.
    auto pair = [&](const int it, const bool first) {
        const int st = it & 1;
        const int h = blk.head(it), m0 = blk.row0(it);
        if (DEFER_DQ && !first) issue_dq(opaque(sK), opaque(sdS));
        // Deferred: the tile pair it − 1 stages into was last flushed two pairs ago.
        if (DEFER_DQ && staged) bulk_wait_read<1>();
        if constexpr (TMA) {
            mbar_wait(full_bar + 8 * st, (it >> 1) & 1);
        } else {
            sm90_bwd_next_pair(it, st, blk.pairs, prefetch);
        }
        const unsigned cQ = sQ + st * QO_BYTES, cdO = sdO + st * QO_BYTES;
        const unsigned cL = sL + st * BM * 4 + 8 * t, cD = sD + st * BM * 4 + 8 * t;  // this thread's first query
        // Loop-invariant tile addresses made opaque per pair: otherwise every descriptor built from them is hoisted
        // out of the loop into two registers of its own (64 registers of descriptors at D = 128).
        const unsigned cK = opaque(sK), cV = opaque(sV), cdS = opaque(TMA && st ? sdS1 : sdS);
        if (!TMA && !DEFER_DQ && staged && it > 0) sm90_flush_dq<D>(p, s, blk, it - 1, cdS + DQ_OFF);

        // 1. Sᵀ and dPᵀ for this warpgroup's 64 keys × 64 queries.
        float sacc[32], dpacc[32];
        wg_fence();
        Wgmma<BM>::template ss0<T, 0>(sacc, desc_k<BN>(cK, 64 * wg, 0), desc_k<BM>(cQ, 0, 0));
#pragma unroll
        for (int kk = 1; kk < D / 16; ++kk) Wgmma<BM>::template ss<T, 0>(sacc, desc_k<BN>(cK, 64 * wg, kk), desc_k<BM>(cQ, 0, kk), 1);
        if constexpr (OVERLAP) wg_commit();  // Sᵀ lands first: P is computed while dPᵀ is on the tensor cores
        Wgmma<BM>::template ss0<T, 0>(dpacc, desc_k<BN>(cV, 64 * wg, 0), desc_k<BM>(cdO, 0, 0));
#pragma unroll
        for (int kk = 1; kk < D / 16; ++kk) Wgmma<BM>::template ss<T, 0>(dpacc, desc_k<BN>(cV, 64 * wg, kk), desc_k<BM>(cdO, 0, kk), 1);
        wg_commit();
        if (DEFER_DQ && !first) {
            wg_wait<OVERLAP ? 2 : 1>();  // the previous pair's dQ, with Sᵀ and dPᵀ still running
            reg_fence(dq);
            put_dq(it - 1, blk.head(it - 1), blk.row0(it - 1), dq);
        }

        const ScoreMap sm = score_map(p);  // from the kernel parameters each pair, rather than kept in registers
        // 2. P and dS (accumulator entry i: key kr0 + 8·((i%4)/2), query 8·(i/4) + 2t + i%2), packed to A fragments
        // k-step by k-step (16 queries) so that few raw scores stay live.
        const int wk0 = n0 + 64 * wg;  // this warpgroup's first key
        const bool full = m0 + BM <= s.len_q && wk0 + 64 <= s.len_k && (!p.causal || wk0 + 63 <= m0 + off) &&
                          (p.window == 0 || m0 + BM - 1 + off - wk0 < p.window);
        unsigned pf[4][4], dsf[4][4];
        // 3. dV += Pᵀ·dO, dK += dSᵀ·Q (k = the 64 queries).
        if constexpr (OVERLAP) {
            // P, then dV's product under dS; dK's after it.
            wg_wait<1>();
            reg_fence(sacc);
            sm90_bwd_p_any<T, BM>(sacc, pf, cL, p, s, sm, full, n0 + kr0, m0, off, t);
            reg_fence(dv);
            reg_fence(pf);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk) Wgmma<D>::template rs<T, 1>(dv, pf[kk], desc_mn<BM>(cdO, kk), 1);
            wg_commit();
            wg_wait<1>();  // dPᵀ (dV's product may still run)
            reg_fence(dpacc);
            sm90_bwd_ds<T, BM>(sacc, dpacc, dsf, cD, p.scale);
            reg_fence(dk);
            reg_fence(dsf);
            wg_fence();
        } else {
            wg_wait<0>();
            reg_fence(sacc);
            reg_fence(dpacc);
            sm90_bwd_p_any<T, BM>(sacc, pf, cL, p, s, sm, full, n0 + kr0, m0, off, t);
            sm90_bwd_ds<T, BM>(sacc, dpacc, dsf, cD, p.scale);
            reg_fence(dv);
            reg_fence(dk);
            reg_fence(pf);
            reg_fence(dsf);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk) Wgmma<D>::template rs<T, 1>(dv, pf[kk], desc_mn<BM>(cdO, kk), 1);
        }
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) Wgmma<D>::template rs<T, 1>(dk, dsf[kk], desc_mn<BM>(cQ, kk), 1);
        wg_commit();

        // dSᵀ → shared memory, [key][query] swizzled (rows of 64 queries = 128 bytes): the pair (queries 8j + 2t, +1)
        // of key row kr0 + 8·hr is dsf[j / 2][2·(j % 2) + hr].
        // sw128<BN>(kr0 + 8·hr, j) + 4t = row base (chunk bits = g) XOR (j << 4): one opaque base, immediates after.
        const unsigned ds_base = cdS + sw128<BN>(kr0, 0) + 4 * t;
#pragma unroll
        for (int hr = 0; hr < 2; ++hr)
#pragma unroll
            for (int j = 0; j < 8; ++j) st_shared_u32((ds_base + hr * 8 * 128) ^ (j << 4), dsf[j / 2][2 * (j % 2) + hr]);
        fence_proxy_async();
        // Not deferred: the previous pair's dQ rows have left the staging tile this pair rewrites.
        if (!TMA && !DEFER_DQ && staged) bulk_wait_read<0>();
        // Every warpgroup's dSᵀ is in place (and, deferred, the previous pair's dQ staged).
        if constexpr (TMA) named_sync(1, THREADS);
        else __syncthreads();
        if (DEFER_DQ && !first) {
            if (staged) sm90_flush_dq<D>(p, s, blk, it - 1, cdS + DQ_OFF + ((it - 1) & 1) * DQ_TILE);
        }
        if constexpr (!DEFER_DQ) issue_dq(cK, cdS);
        wg_wait<0>();  // dV and dK (the next pair's loads overwrite their Q and dO), and dQ unless deferred
        if constexpr (!DEFER_DQ) reg_fence(dq);
        reg_fence(dv);
        reg_fence(dk);
        reg_fence(pf);
        reg_fence(dsf);
        if constexpr (TMA) {
            // Stage st is read: the producer may refill it. Then this pair's dQ into the staging tile once the writer
            // has read the previous pair's out of it, handed to the writer (fenced: it reads by the async proxy).
            __syncwarp();
            if ((threadIdx.x & 31) == 0) mbar_arrive(empty_bar + 8 * st);
            if (it > 0) mbar_wait(dq_empty, (it - 1) & 1);
            put_dq(it, h, m0, dq);
            fence_proxy_async();
            __syncwarp();
            if ((threadIdx.x & 31) == 0) mbar_arrive(dq_full);
            return;
        }
        if constexpr (!DEFER_DQ) put_dq(it, h, m0, dq);  // staged: fenced and flushed after the next block barrier
    };
    if (DEFER_DQ && blk.pairs > 0) {
        pair(0, true);
        for (int it = 1; it < blk.pairs; ++it) pair(it, false);
    } else {
        for (int it = 0; it < blk.pairs; ++it) pair(it, false);
    }
    cp_async_wait<0>();
    if (!TMA && blk.pairs > 0 && (DEFER_DQ || staged)) {
        const int last = blk.pairs - 1;
        if constexpr (DEFER_DQ) {
            issue_dq(opaque(sK), opaque(sdS));
            wg_wait<0>();
            reg_fence(dq);
            if (staged) {
                bulk_wait_read<1>();  // the tile of pair `last` was flushed two pairs ago
                __syncthreads();
            }
            put_dq(last, blk.head(last), blk.row0(last), dq);
        }
        if (staged) {
            fence_proxy_async();
            __syncthreads();
            sm90_flush_dq<D>(p, s, blk, last, sdS + DQ_OFF + (DEFER_DQ ? (last & 1) * DQ_TILE : 0));
            bulk_wait();
        }
    }

    // dK, dV: rows < len_k, columns < hd, straight from the fragments (entry i: key kr0 + 8·((i%4)/2), column
    // 8·(i/4) + 2t + i%2).
    const int tid_e = static_cast<int>(opaque(threadIdx.x));  // recomputed here rather than kept across the loop
    const int kr0_e = 16 * (tid_e / 32) + (tid_e % 32) / 4, t_e = tid_e % 4;
    sm90_store_dkdv<T, D>(p, s, blk, n0, kr0_e, 0, t_e, dk, dv);
}

// ---- Backward, two warpgroups per 64 keys --------------------------------------------------------------------

template <int D> struct Sm90BackwardSplitSmem {
    // K, V [64][D]; Q, dO [2][64][D]; Pᵀ, dSᵀ [64][64]; lse, delta [2][64] f32; 1 KB alignment slack.
    static constexpr int bytes = 2 * 64 * D * 2 + 4 * 64 * D * 2 + 2 * 64 * 64 * 2 + 4 * 64 * 4 + 1024;
};

// The backward for head dims whose dK and dV do not fit one warpgroup's registers (D = 256: 256 per thread with 64
// keys per warpgroup): two warpgroups share one tile of 64 keys and split the work by queries where the products are
// per query and by head dims where they are per head dim. Grid (n_kv_heads, n_seqs, ⌈max_seqlen_k / 64⌉), 256
// threads; the pair walk, the double-buffered Q/dO/lse/delta loads and the masks are flash_backward_sm90's. Per
// pair, warpgroup w:
//   1. Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for all 64 keys × queries 32w … 32w + 31 (wgmma SS, N = 32; P is formed while
//      dPᵀ's product runs);
//   2. P and dS in registers (sm90_bwd_p, sm90_bwd_ds), stored as Pᵀ and dSᵀ (bf16/f16, swizzled [key][query]); block barrier;
//   3. dV[:, DH·w …] += Pᵀ·dO and dQ[:, DH·w …] = dS·K in one commit group, dK[:, DH·w …] += dSᵀ·Q in the next, DH =
//      D/2 head dims each (wgmma SS: Pᵀ and dSᵀ K-major, dS M-major from the same store; dO, Q and K N-major column
//      slices);
//   4. dQ staged as f32 over the warpgroup's own column blocks of the pair's Q and dO tiles (16 KB each: only its dK
//      and dV products read them; the next load into the stage waits for a later block barrier), in dq_accum's TMA
//      boxes' layout (Sm90SwizzledDq), and added by one tensor reduce-add per 32 columns (`maps`: dq_accum's map): the
//      half over dO while dK's product runs, the half over Q once it has landed. Without TMA_DQ
//      (scripts/flash/variants.cu, which passes no maps) dQ is added by red.global.add.v2.f32 atomics (32 per thread
//      and pair).
// Registers per thread: dK and dV D/4 each, dQ D/4, Sᵀ and dPᵀ 16 each. Dynamic shared memory:
// Sm90BackwardSplitSmem<D>::bytes (210 KB at D = 256). SEQ_MAJOR as flash_backward_sm90's.
template <typename T, int D, bool SEQ_MAJOR = false, bool TMA_DQ = true>
__device__ __forceinline__ void flash_backward_sm90_split(const FlashParams p, const FlashMaps* maps = nullptr) {
    constexpr int BM = 64, BN = 64, THREADS = 256, DH = D / 2, NQ = BM / 2;
    static_assert(D % 128 == 0 && D <= 256, "shape");
    constexpr unsigned KV_BYTES = BN * D * 2, QO_BYTES = BM * D * 2, PS_BYTES = BN * BM * 2;
    const unsigned sK = (smem_u32(flash_smem) + 1023u) & ~1023u;
    const unsigned sV = sK + KV_BYTES, sQ = sV + KV_BYTES, sdO = sQ + 2 * QO_BYTES, sP = sdO + 2 * QO_BYTES;
    const unsigned sdS = sP + PS_BYTES, sL = sdS + PS_BYTES, sD = sL + 2 * BM * 4;  // f32 [2][BM] each

    const FlashBlock b = flash_block<SEQ_MAJOR>();
    FlashSeq s;
    if (!flash_seq(p, b.seq, s)) return;
    const int n0 = b.tile * BN;
    if (n0 >= s.len_k) return;
    const Sm90KeyBlock<BM> blk = sm90_key_block<BM, BN>(p, s, n0, b.head);
    auto prefetch = [&](int it, int st) { sm90_bwd_prefetch<D, BM, THREADS>(p, s, blk, it, st, sQ, sdO, sL, sD); };
    sm90_bwd_start<D, BN, THREADS>(p, blk, n0, sK, sV, prefetch);
    const int warp = blk.warp, g = blk.g, t = blk.t, wg = blk.wg, off = blk.off;
    const unsigned hd = blk.hd;

    float dk[DH / 2], dv[DH / 2];
#pragma unroll
    for (int i = 0; i < DH / 2; ++i) dk[i] = dv[i] = 0.0f;
    const int kr0 = 16 * (warp % 4) + g;  // this thread's key rows in the tile: kr0, kr0 + 8

    for (int it = 0; it < blk.pairs; ++it) {
        const int st = it & 1;
        const int h = blk.head(it), m0 = blk.row0(it);
        // Pair it + 1 starts loading into stage st ^ 1 only after step 2, once the tensor reduce-adds of pair it − 1's
        // dQ have read it (step 4).
        sm90_bwd_pair_landed();
        const unsigned cQ = sQ + st * QO_BYTES, cdO = sdO + st * QO_BYTES;
        const int q0 = NQ * wg;  // this warpgroup's first query of the tile in steps 1–2
        const unsigned cL = sL + st * BM * 4 + 4 * (q0 + 2 * t), cD = sD + st * BM * 4 + 4 * (q0 + 2 * t);
        const unsigned cK = opaque(sK), cV = opaque(sV), cP = opaque(sP), cdS = opaque(sdS);

        // 1. Sᵀ and dPᵀ: 64 keys × this warpgroup's 32 queries, committed apart (P is formed under dPᵀ's product).
        float sacc[NQ / 2], dpacc[NQ / 2];
        wg_fence();
        Wgmma<NQ>::template ss0<T, 0>(sacc, desc_k<BN>(cK, 0, 0), desc_k<BM>(cQ, q0, 0));
#pragma unroll
        for (int kk = 1; kk < D / 16; ++kk) Wgmma<NQ>::template ss<T, 0>(sacc, desc_k<BN>(cK, 0, kk), desc_k<BM>(cQ, q0, kk), 1);
        wg_commit();
        Wgmma<NQ>::template ss0<T, 0>(dpacc, desc_k<BN>(cV, 0, 0), desc_k<BM>(cdO, q0, 0));
#pragma unroll
        for (int kk = 1; kk < D / 16; ++kk) Wgmma<NQ>::template ss<T, 0>(dpacc, desc_k<BN>(cV, 0, kk), desc_k<BM>(cdO, q0, kk), 1);
        wg_commit();

        // 2. P and dS, stored as Pᵀ and dSᵀ [key][query]: the pair (queries q0 + 8j + 2t, +1) of key row kr0 + 8·hr is
        // fragment [j / 2][2·(j % 2) + hr], at chunk (q0 + 8j)/8 of the row, swizzled by the row's g.
        const ScoreMap sm = score_map(p);
        const bool full = m0 + BM <= s.len_q && n0 + BN <= s.len_k && (!p.causal || n0 + BN - 1 <= m0 + off) &&
                          (p.window == 0 || m0 + BM - 1 + off - n0 < p.window);
        unsigned pf[NQ / 16][4], dsf[NQ / 16][4];
        wg_wait<1>();
        reg_fence(sacc);
        sm90_bwd_p_any<T, NQ>(sacc, pf, cL, p, s, sm, full, n0 + kr0, m0 + q0, off, t);
        wg_wait<0>();
        reg_fence(dpacc);
        sm90_bwd_ds<T, NQ>(sacc, dpacc, dsf, cD, p.scale);
        const unsigned row = static_cast<unsigned>(kr0) * 128 + (static_cast<unsigned>(g) << 4) + 4 * t;
#pragma unroll
        for (int hr = 0; hr < 2; ++hr)
#pragma unroll
            for (int j = 0; j < NQ / 8; ++j) {
                const unsigned a = (row + hr * 8 * 128) ^ (static_cast<unsigned>(q0 / 8 + j) << 4);
                st_shared_u32(cP + a, pf[j / 2][2 * (j % 2) + hr]);
                st_shared_u32(cdS + a, dsf[j / 2][2 * (j % 2) + hr]);
            }
        fence_proxy_async();
        if (TMA_DQ && threadIdx.x % 128 == 0) bulk_wait_read<0>();
        __syncthreads();  // both warpgroups' halves of Pᵀ and dSᵀ are in place, stage st ^ 1 is free
        sm90_bwd_load_next(it, st, blk.pairs, prefetch);

        // 3. This warpgroup's DH head dims c0 … of dV, dK and dQ (k = the 64 queries for dV and dK, the 64 keys for dQ):
        // dV and dQ in one commit group, dK in the next, so dQ's staging over dO's blocks runs under dK's product.
        const int c0 = DH * wg;
        const unsigned o_cols = cdO + (c0 / 64) * (BM * 128), q_cols = cQ + (c0 / 64) * (BM * 128);
        const unsigned k_cols = cK + (c0 / 64) * (BN * 128);
        float dq[DH / 2];
        reg_fence(dv);
        reg_fence(dk);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) Wgmma<DH>::template ss<T, 1>(dv, desc_k<BN>(cP, 0, kk), desc_sw128(o_cols + kk * 2048, BM * 128), 1);
        Wgmma<DH>::template ss0<T, 1, 1>(dq, desc_mn<BN>(cdS, 0), desc_sw128(k_cols, BN * 128));
#pragma unroll
        for (int kk = 1; kk < BN / 16; ++kk)
            Wgmma<DH>::template ss<T, 1, 1>(dq, desc_mn<BN>(cdS, kk), desc_sw128(k_cols + kk * 2048, BN * 128), 1);
        wg_commit();
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) Wgmma<DH>::template ss<T, 1>(dk, desc_k<BN>(cdS, 0, kk), desc_sw128(q_cols + kk * 2048, BM * 128), 1);
        wg_commit();
        wg_wait<1>();
        reg_fence(dq);
        reg_fence(dv);

        // 4. dq entry i: query 16·(warp%4) + g + 8·((i%4)/2), column c0 + 8·(i/4) + 2t + i%2: its last 64 columns
        // over the warpgroup's blocks of dO (read by dV's product alone, landed), then, once dK's product has landed,
        // its first 64 over those of Q.
        if constexpr (!TMA_DQ) {
            sm90_add_dq<DH>(p, s, h, hd, m0 + kr0, c0, t, dq);
            wg_wait<0>();
            reg_fence(dk);
            continue;
        }
        static_assert(DH == 128, "two 64-column halves of dQ per warpgroup");
        // Half `half` of dQ staged at `dst` and added by two tensor reduce-adds (one per 32 columns).
        const auto put_half = [&](int half, unsigned dst) {
            sm90_stage_dq_sw128<64>(dst, kr0, 0, t, *reinterpret_cast<const float (*)[32]>(dq + 32 * half));
            fence_proxy_async();
            named_sync(1 + wg, 128);
            const int c = c0 + 64 * half;
            if (threadIdx.x % 128 == 0) sm90_reduce_add_dq<D>(*maps, dst, c, c + 64, static_cast<int>(hd), h, s.q0 + m0);
        };
        put_half(1, o_cols);
        wg_wait<0>();
        reg_fence(dk);
        put_half(0, q_cols);
    }
    cp_async_wait<0>();
    if (TMA_DQ && threadIdx.x % 128 == 0) bulk_wait();

    // dK, dV: entry i: key kr0 + 8·((i%4)/2), column c0 + 8·(i/4) + 2t + i%2; rows < len_k, columns < hd.
    sm90_store_dkdv<T, DH>(p, s, blk, n0, kr0, DH * wg, t, dk, dv);
}
