// Tile variants of the flash-attention kernels for scripts/flash/variants.py, which builds this file with nvcc on the
// GPU machine into a shared library and drives it from PyTorch: each variant is checked against a float32 reference
// and timed next to torch's SDPA in the same process. The product launch table is kernels/src/cuda/attention.rs
// `FLASH`; a variant that wins here moves there (kernels/NOTES.md records the runs).
#include "../../kernels/cuda/common.cuh"
#include "../../kernels/cuda/flash_common.cuh"
#include "../../kernels/cuda/flash_attention.cuh"
#include "../../kernels/cuda/flash_wgmma.cuh"
#include "../../kernels/cuda/flash_attention_sm90.cuh"
#include "../../kernels/cuda/flash_attention_sm90_backward.cuh"

template <int D, int BM, int BN, int W, int MINB>
__global__ void __launch_bounds__(32 * W, MINB) fwd_kernel(const FlashParams p) {
    flash_forward<bf16, D, BM, BN, W>(p);
}

template <int D, int BM, int BN, int W, int P1K, int P2K, int P3Q>
__global__ void __launch_bounds__(32 * W) bwd_kernel(const FlashParams p) {
    flash_backward<bf16, D, BM, BN, W, P1K, P2K, P3Q>(p);
}

// Hopper (sm_90a, wgmma) forward: NWG warpgroups of 64 query rows, BN keys per tile; OV = intra-warpgroup overlap;
// LAZY as in fwd90ws_kernel.
template <int D, int BN, int NWG, bool OV, bool LAZY>
__global__ void __launch_bounds__(128 * NWG, 1) fwd90_kernel(const FlashParams p) {
    flash_forward_sm90<bf16, D, BN, NWG, OV, LAZY>(p);
}

// Warp-specialized: NWG consumer warpgroups + 1 producer warpgroup (cp.async + mbarriers); PP = ping-pong between
// the consumer warpgroups; the producer keeps 48 registers (setmaxnreg), the consumers get the rest; LAZY = rescale
// O only when a row max grows by more than 2^8.
template <int D, int BN, int NWG, bool PP, bool LAZY>
__global__ void __launch_bounds__(128 * (NWG + 1), 1) fwd90ws_kernel(const FlashParams p) {
    flash_forward_sm90_ws<bf16, D, BN, NWG, PP, 48, LAZY>(p);
}

// Hopper backward: NWG warpgroups × 64 keys per block, 64-query tiles (all threads load); OV = P under dPᵀ's
// product and dS under dV's; SQ = dQ staged in shared memory and added by bulk reduce-adds instead of atomics;
// DF = a pair's dQ product left running under the next pair's first products.
template <int D, int NWG, bool OV, bool SQ, bool DF>
__global__ void __launch_bounds__(128 * NWG, 1) bwd90_kernel(const FlashParams p) {
    flash_backward_sm90<bf16, D, NWG, OV, SQ, DF>(p);
}

// Hopper backward with two warpgroups sharing 64 keys (queries split for Sᵀ/dPᵀ, head dims for dK/dV/dQ): the d256
// backward on wgmma.
template <int D>
__global__ void __launch_bounds__(256, 1) bwd90s_kernel(const FlashParams p) {
    flash_backward_sm90_split<bf16, D, false, false>(p);  // dQ by atomics: no TMA maps here
}

struct Variant {
    const char* name;
    int d, bm, bn, warps, smem;
    const void* kernel;
};

#define FWDB(D, BM, BN, W, MINB) \
    {"fwd d" #D " " #BM "x" #BN "x" #W " minb" #MINB, D, BM, BN, W, (BM + 2 * BN) * (D + 8) * 2, (const void*)fwd_kernel<D, BM, BN, W, MINB>}
#define FWD(D, BM, BN, W) FWDB(D, BM, BN, W, 1)
#define BWD(D, BM, BN, W, A, B, C) \
    {"bwd d" #D " " #BM "x" #BN "x" #W " " #A #B #C, D, BM, BN, W, (2 * BN + 4 * BM) * (D + 8) * 2 + 2 * BN * (BM + 8) * 2 + 16 * BM, (const void*)bwd_kernel<D, BM, BN, W, A, B, C>}

#define FWD90L(D, BN, NWG, OV, LAZY, TAG)                                                                  \
    {"fwd90 d" #D " " #BN " wg" #NWG " ov" #OV TAG, D, 64 * NWG, BN, 4 * NWG, Sm90ForwardSmem<D, BN, NWG>::bytes, \
     (const void*)fwd90_kernel<D, BN, NWG, OV, LAZY>}
#define FWD90(D, BN, NWG, OV) FWD90L(D, BN, NWG, OV, false, "")

#define FWD90WSL(D, BN, NWG, PP, LAZY, TAG)                                                                          \
    {"fwd90ws d" #D " " #BN " wg" #NWG " pp" #PP TAG, D, 64 * NWG, BN, 4 * (NWG + 1), Sm90ForwardWsSmem<D, BN, NWG>::bytes, \
     (const void*)fwd90ws_kernel<D, BN, NWG, PP, LAZY>}
#define FWD90WS(D, BN, NWG, PP) FWD90WSL(D, BN, NWG, PP, false, "")

#define BWD90Q(D, NWG, OV, SQ, DF, TAG)                                                                    \
    {"bwd90 d" #D " wg" #NWG TAG, D, 64, 64 * NWG, 4 * NWG, Sm90BackwardSmem<D, NWG, SQ, DF>::bytes, \
     (const void*)bwd90_kernel<D, NWG, OV, SQ, DF>}
#define BWD90O(D, NWG, OV, TAG) BWD90Q(D, NWG, OV, false, false, TAG)
#define BWD90(D, NWG) BWD90O(D, NWG, false, "")

#define BWD90S(D) {"bwd90s d" #D, D, 64, 64, 8, Sm90BackwardSplitSmem<D>::bytes, (const void*)bwd90s_kernel<D>}

static Variant VARIANTS[] = {
    FWD(64, 64, 64, 4),
    FWDB(64, 64, 64, 4, 4),
    FWD(64, 128, 64, 4),
    FWD(64, 64, 128, 4),
    FWD(128, 64, 64, 4),
    FWDB(128, 64, 64, 4, 3),
    FWD(128, 128, 64, 4),
    FWD(128, 64, 32, 4),
    FWD(256, 64, 64, 4),
    FWD(256, 64, 32, 4),
    BWD(64, 64, 64, 4, 4, 4, 4),
    BWD(64, 64, 128, 8, 8, 4, 4),
    BWD(64, 128, 64, 8, 4, 4, 8),
    BWD(128, 64, 64, 8, 4, 2, 4),
    BWD(128, 64, 128, 8, 8, 4, 4),
    BWD(128, 32, 64, 4, 4, 2, 2),
    BWD(256, 64, 64, 8, 4, 2, 4),
    BWD(256, 32, 64, 8, 4, 2, 2),
    FWD90(64, 128, 2, 1),
    FWD90(64, 128, 2, 0),
    FWD90(64, 64, 2, 1),
    FWD90(128, 128, 2, 1),
    FWD90(128, 128, 2, 0),
    FWD90(128, 64, 2, 1),
    FWD90(128, 128, 1, 1),
    FWD90(256, 64, 2, 0),
    FWD90L(256, 64, 2, 0, true, " lazy"),
    FWD90WS(64, 128, 2, 1),
    FWD90WS(64, 128, 2, 0),
    FWD90WS(128, 128, 2, 1),
    FWD90WS(128, 128, 2, 0),
    FWD90WS(128, 64, 2, 1),
    FWD90WS(256, 64, 2, 1),
    FWD90WS(256, 80, 2, 1),
    FWD90WS(256, 64, 2, 0),
    FWD90WSL(64, 128, 2, 1, true, " lazy"),
    FWD90WSL(128, 128, 2, 1, true, " lazy"),
    FWD90WS(64, 128, 3, 0),
    FWD90WS(64, 128, 3, 1),
    BWD90(64, 2),
    BWD90(64, 1),
    BWD90(128, 2),
    BWD90O(64, 2, true, " ov"),
    BWD90O(128, 2, true, " ov"),
    BWD90Q(64, 2, false, true, false, " sq"),
    BWD90Q(128, 2, true, true, false, " ov sq"),
    BWD90Q(64, 1, false, true, false, " sq"),
    BWD90Q(64, 2, false, true, true, " sq df"),
    BWD90Q(128, 2, true, true, true, " ov sq df"),
    BWD90Q(128, 2, true, false, true, " ov df"),
    BWD90Q(64, 2, true, true, true, " ov sq df"),
    BWD90S(256),
    BWD90S(128),
};

// ---- wgmma layout self-test ----------------------------------------------------------------------------------
// One warpgroup, one tile, the forward's own helpers: C = Q·Kᵀ (64 × BN over D; wgmma SS, both K-major, tiles written
// by sm90_load_tile) and O = bf16(C)·V (64 × D over BN; wgmma RS with P packed from C's accumulator registers, V
// MN-major). q [64][D], k and v [BN][D] bf16 row-major; c [64][BN] and o [64][D] f32, written from the accumulator
// fragments with the documented layout. A wrong descriptor, swizzle or fragment mapping shows here as a large error
// (variants.py compares with torch) before any attention kernel runs.
template <int D, int BN>
__global__ void __launch_bounds__(128) wgmma_selftest(const unsigned short* q, const unsigned short* k, const unsigned short* v, float* c, float* o,
                                                      float* o2, float* c3) {
    const unsigned sQ = (smem_u32(flash_smem) + 1023u) & ~1023u, sK = sQ + 64 * D * 2, sV = sK + BN * D * 2;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    sm90_load_tile<64, D, 128>(sQ, q, D, 64, D, tid);
    sm90_load_tile<BN, D, 128>(sK, k, D, BN, D, tid);
    sm90_load_tile<BN, D, 128>(sV, v, D, BN, D, tid);
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    float sacc[BN / 2], oacc[D / 2];
    unsigned pf[BN / 16][4];
    reg_fence(sacc);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) Wgmma<BN>::template ss<bf16, 0>(sacc, desc_k<64>(sQ, 0, kk), desc_k<BN>(sK, 0, kk), kk > 0);
    wg_commit();
    wg_wait<0>();
    reg_fence(sacc);
    sm90_pack_p<bf16, BN / 2>(sacc, pf);
    reg_fence(oacc);
    reg_fence(pf);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) Wgmma<D>::template rs<bf16, 1>(oacc, pf[kk], desc_mn<BN>(sV, kk), kk > 0);
    wg_commit();
    wg_wait<0>();
    reg_fence(oacc);
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) c[(16 * warp + g + 8 * ((i % 4) / 2)) * BN + 8 * (i / 4) + 2 * t + (i % 2)] = sacc[i];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[(16 * warp + g + 8 * ((i % 4) / 2)) * D + 8 * (i / 4) + 2 * t + (i % 2)] = oacc[i];

    // o2 [64][32] = bf16(C)·V[:, 32:64]: an N-major B whose start sits 64 bytes into the 128-byte rows (bwd90's dQ
    // at D = 64 splits its columns this way). c3 [64][64] = V[:, 0:64]ᵀ·K[:, 0:64]: A M-major (imm-trans-a = 1, the
    // layout bwd90 stores dSᵀ in) and B N-major, k = the BN rows.
    float o2acc[16], c3acc[32];
    reg_fence(pf);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) Wgmma<32>::template rs<bf16, 1>(o2acc, pf[kk], desc_sw128(sV + 64 + kk * 2048, BN * 128), kk > 0);
    Wgmma<64>::template ss0<bf16, 1, 1>(c3acc, desc_mn<BN>(sV, 0), desc_mn<BN>(sK, 0));
#pragma unroll
    for (int kk = 1; kk < BN / 16; ++kk) Wgmma<64>::template ss<bf16, 1, 1>(c3acc, desc_mn<BN>(sV, kk), desc_mn<BN>(sK, kk), 1);
    wg_commit();
    wg_wait<0>();
    reg_fence(o2acc);
    reg_fence(c3acc);
    reg_fence(pf);
#pragma unroll
    for (int i = 0; i < 16; ++i) o2[(16 * warp + g + 8 * ((i % 4) / 2)) * 32 + 8 * (i / 4) + 2 * t + (i % 2)] = o2acc[i];
#pragma unroll
    for (int i = 0; i < 32; ++i) c3[(16 * warp + g + 8 * ((i % 4) / 2)) * 64 + 8 * (i / 4) + 2 * t + (i % 2)] = c3acc[i];
}

struct SelfTest {
    int d, bn;
    const void* kernel;
};
static SelfTest SELFTESTS[] = {
    {64, 64, (const void*)wgmma_selftest<64, 64>},
    {128, 128, (const void*)wgmma_selftest<128, 128>},
    {128, 80, (const void*)wgmma_selftest<128, 80>},
    {256, 64, (const void*)wgmma_selftest<256, 64>},
};
extern "C" int n_selftests() { return sizeof(SELFTESTS) / sizeof(SELFTESTS[0]); }
extern "C" int selftest_d(int i) { return SELFTESTS[i].d; }
extern "C" int selftest_bn(int i) { return SELFTESTS[i].bn; }
// ptrs: q, k, v, c, o, o2, c3.
extern "C" int selftest(int i, const unsigned long long* ptrs, unsigned long long stream) {
    const SelfTest& s = SELFTESTS[i];
    const int smem = (64 + 2 * s.bn) * s.d * 2 + 1024;
    cudaError_t e = cudaFuncSetAttribute(s.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return (int)e;
    const unsigned short* q = (const unsigned short*)ptrs[0];
    const unsigned short* k = (const unsigned short*)ptrs[1];
    const unsigned short* v = (const unsigned short*)ptrs[2];
    float* c = (float*)ptrs[3];
    float* o = (float*)ptrs[4];
    float* o2 = (float*)ptrs[5];
    float* c3 = (float*)ptrs[6];
    void* args[] = {&q, &k, &v, &c, &o, &o2, &c3};
    e = cudaLaunchKernel(s.kernel, dim3(1), dim3(128), args, smem, (cudaStream_t)stream);
    return (int)e;
}

extern "C" int n_variants() { return sizeof(VARIANTS) / sizeof(VARIANTS[0]); }
extern "C" const char* variant_name(int i) { return VARIANTS[i].name; }
extern "C" int variant_d(int i) { return VARIANTS[i].d; }

// ptrs: q, k, v, out, lse, d_out, delta, dq_accum, dk, dv, cu_q, cu_k. Forward grids run over query tiles, backward
// over key tiles, as the product launcher does.
extern "C" int launch(int i, const unsigned long long* ptrs, int n_seqs, int max_rows, int n_heads, int n_kv_heads, int head_dim,
                      int window, float scale, float softcap, int causal, int tq, int tk, unsigned long long stream) {
    const Variant& v = VARIANTS[i];
    FlashParams p;
    p.q = (const void*)ptrs[0];
    p.k = (const void*)ptrs[1];
    p.v = (const void*)ptrs[2];
    p.out = (void*)ptrs[3];
    p.lse = (float*)ptrs[4];
    p.d_out = (const void*)ptrs[5];
    p.delta = (const float*)ptrs[6];
    p.dq_accum = (float*)ptrs[7];
    p.dk = (void*)ptrs[8];
    p.dv = (void*)ptrs[9];
    p.cu_q = (const int*)ptrs[10];
    p.cu_k = (const int*)ptrs[11];
    p.n_heads = n_heads;
    p.n_kv_heads = n_kv_heads;
    p.head_dim = head_dim;
    p.window = window;
    p.scale = scale;
    p.softcap = softcap;
    p.causal = causal;
    p.tq = tq;
    p.tk = tk;
    p.pad = 0;
    const bool fwd = v.name[0] == 'f';
    const int per_block = fwd ? v.bm : v.bn;
    p.n_seqs = n_seqs;
    p.tiles = (max_rows + per_block - 1) / per_block;
    // (heads, sequences, tiles): flash_common.cuh flash_block
    dim3 grid(fwd ? n_heads : n_kv_heads, n_seqs, (max_rows + per_block - 1) / per_block);
    cudaError_t e = cudaFuncSetAttribute(v.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, v.smem);
    if (e != cudaSuccess) return (int)e;
    void* args[] = {&p};
    e = cudaLaunchKernel(v.kernel, grid, dim3(32 * v.warps), args, v.smem, (cudaStream_t)stream);
    return (int)e;
}
