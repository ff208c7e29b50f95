// Tile variants of the flash-attention kernels for scripts/flash/variants.py, which builds this file with nvcc on the
// GPU machine into a shared library and drives it from PyTorch: each variant is checked against a float32 reference
// and timed next to torch's SDPA in the same process. The product launch table is kernels/src/cuda/attention.rs
// `FLASH`; a variant that wins here moves there (kernels/NOTES.md records the runs).
#include "../../kernels/cuda/common.cuh"
#include "../../kernels/cuda/flash_attention.cuh"

template <int D, int BM, int BN, int W, int MINB>
__global__ void __launch_bounds__(32 * W, MINB) fwd_kernel(const FlashParams p) {
    flash_forward<bf16, D, BM, BN, W>(p);
}

template <int D, int BM, int BN, int W, int P1K, int P2K, int P3Q>
__global__ void __launch_bounds__(32 * W) bwd_kernel(const FlashParams p) {
    flash_backward<bf16, D, BM, BN, W, P1K, P2K, P3Q>(p);
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
};

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
    dim3 grid((max_rows + per_block - 1) / per_block, fwd ? n_heads : n_kv_heads, n_seqs);
    cudaError_t e = cudaFuncSetAttribute(v.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, v.smem);
    if (e != cudaSuccess) return (int)e;
    void* args[] = {&p};
    e = cudaLaunchKernel(v.kernel, grid, dim3(32 * v.warps), args, v.smem, (cudaStream_t)stream);
    return (int)e;
}
