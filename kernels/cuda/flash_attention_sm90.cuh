// Flash attention for Hopper (sm_90a) on wgmma: the same semantics and the same FlashParams as flash_attention.cuh's
// flash_forward / flash_backward (packed varlen sequences with bottom-right alignment, causal, GQA without expanding
// K/V, sliding window with fully-masked tiles skipped, logit softcap, any scale, bf16 and f16 I/O, f32 accumulation),
// for head dims padded to a multiple of 64 (64, 128, 256; a head of hd < D elements is zero-padded in shared memory).
// Include after common.cuh and flash_attention.cuh (it reuses FlashParams, the geometry helpers and the PTX wrappers).
// Compile for sm_90a (nvcc -gencode=arch=compute_90a,code=sm_90a; NVRTC --gpu-architecture=sm_90a): wgmma and
// setmaxnreg exist only there.
//
// Entry templates: flash_forward_sm90 (every thread loads, optional intra-warpgroup overlap), flash_forward_sm90_ws
// (producer warpgroup + consumer warpgroups on mbarriers, optional ping-pong), flash_backward_sm90 (D = 64, 128).
// kernels/NOTES.md ("Flash attention on Hopper wgmma") has the design record and the register budget;
// scripts/flash/variants.cu instantiates them and its wgmma_selftest checks the layouts below on the GPU;
// scripts/flash/sm90_layout_model.py checks the index math on the CPU.
//
// ---- wgmma in one page (PTX ISA "Asynchronous Warpgroup Level Matrix Multiply-Accumulate") --------------------------
// A warpgroup (4 consecutive warps, the first a multiple of 4) computes D[64×N] (+)= A[64×16]·B[16×N] per
// wgmma.mma_async.m64nNk16; B always comes from shared memory through a 64-bit matrix descriptor, A from shared
// memory (descriptor) or from registers. The instruction is asynchronous: wgmma.fence before the first one that reads
// registers written since the last wgmma (accumulators, A fragments), wgmma.commit_group to close a batch,
// wgmma.wait_group N to wait until at most N batches are in flight. The accumulator and A registers must not be touched
// between issue and wait; the compiler does not know this, so every accumulator and A array is passed through an empty
// `asm volatile("" : "+f"(x))` (reg_fence) before wgmma.fence and after wgmma.wait_group: volatile asm statements keep
// their order, so no read or write of those registers can move across the fence/wait.
//
// Register fragments (per warp w of the warpgroup, g = lane / 4, t = lane % 4; CUTLASS CLayout_64xN, ALayout_64x16):
//   accumulator d[N/2]: d[4j + e] holds (row 16w + g + 8·(e/2), column 8j + 2t + e%2) — per warp, exactly
//     mma.sync.m16n8's C layout for each of the N/8 column tiles;
//   A from registers a[4] (16 columns k): a[r] holds the pair (row 16w + g + 8·(r%2), columns 2t + 8·(r/2) + {0,1}),
//     i.e. mma.sync.m16n8k16's A layout. So P for k-step kk of P·V is pack(s[8kk + 2r], s[8kk + 2r + 1]) straight from
//     the score accumulator s (columns 16kk … 16kk + 15), as in flash_attention.cuh.
//
// Shared-memory layout: every operand tile is stored in the canonical 128-byte-swizzle layout (what TMA's
// SWIZZLE_128B writes and what FlashAttention-3 uses): a [ROWS][D] tile is D/64 column blocks of [ROWS][64] elements,
// each row 128 bytes, block c at byte c·ROWS·128; the 16-byte chunk k8 (elements 8·k8 … 8·k8+7) of row r sits at chunk
// position k8 ^ (r % 8) of the row. Tiles start 1024-byte aligned (the swizzle is a function of address bits 4–9, so
// the pattern repeats every 8 rows = 1024 bytes; with aligned bases the descriptor's base-offset field is 0). Chosen
// over the no-swizzle "core matrix" layout because (1) cp.async rows of 8 × 16 bytes land on 32 distinct banks, as do
// the fragment stores of the epilogue, (2) the same bytes serve as a K-major operand (Q, K: rows = M or N, 64
// contiguous k per row) and as an MN-major one (V in P·V: rows = k, 64 contiguous n per row), (3) it is exactly TMA's
// SWIZZLE_128B layout, so a later TMA producer changes nothing on the consumer side.
//
// Descriptor (PTX "Matrix Descriptor Format"; CUTLASS GmmaDescriptor): bits 0–13 start address >> 4, 16–29 leading
// byte offset >> 4, 32–45 stride byte offset >> 4, 49–51 base offset (0), 62–63 swizzle (1 = 128B). For the layout
// above (CUTLASS make_gmma_desc, canonical forms in uint128 units):
//   K-major  SW128 ((8,m),2):((8,SBO),1): SBO = 1024 (next 8 rows), LBO unused (1). A 16-wide k-step kk inside a
//     64-column block is start + 32·(kk % 4) bytes (the hardware applies the XOR to the final address, so advancing
//     the start by 32 bytes inside a 128-byte row selects chunks 2·(kk%4), +1 before the swizzle); the block is
//     kk / 4, at + (kk/4)·ROWS·128.
//   MN-major SW128 ((8,n),(8,k)):((1,LBO),(8,SBO)): 64 n per 128-byte row, k rows 128 bytes apart, SBO = 1024 (next 8
//     k rows), LBO = ROWS·128 (next 64-column block of n). A 16-row k-step kk is start + 2048·kk; used with
//     imm-trans-b = 1.
#pragma once

template <typename T> struct Sm90IsBf16 {
    static constexpr bool value = false;
};
template <> struct Sm90IsBf16<bf16> {
    static constexpr bool value = true;
};


// ---- PTX wrappers (sm_90a) -----------------------------------------------------------------------------------

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Orders this thread's generic-proxy shared-memory writes (st.shared, cp.async after its wait) before later
// async-proxy reads (wgmma operands, bulk copies) once a barrier has been passed.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

template <int N> __device__ __forceinline__ void reg_fence(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int M> __device__ __forceinline__ void reg_fence(unsigned (&r)[M][4]) {
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// A copy the compiler cannot see through: addresses derived from it inside a loop stay in the loop instead of being
// hoisted out of it as one register each.
__device__ __forceinline__ unsigned opaque(unsigned x) {
    asm volatile("mov.b32 %0, %1;\n" : "=r"(x) : "r"(x));
    return x;
}

// Shared-memory accesses by 32-bit shared address.
__device__ __forceinline__ void st_shared_u32(unsigned a, unsigned v) { asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(a), "r"(v) : "memory"); }
__device__ __forceinline__ void st_shared_u16(unsigned a, unsigned short v) { asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(a), "h"(v) : "memory"); }
// Not volatile: the compiler may merge repeated loads of one address (a query's lse is read for two key rows).
__device__ __forceinline__ float ld_shared_f32(unsigned a) {
    float v;
    asm("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(a));
    return v;
}
__device__ __forceinline__ unsigned short ld_shared_u16(unsigned a) {
    unsigned short v;
    asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(a) : "memory");
    return v;
}
__device__ __forceinline__ void ld_shared_v4(unsigned a, unsigned (&v)[4]) {
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "r"(a) : "memory");
}
__device__ __forceinline__ void st_global_v4(void* p, const unsigned (&v)[4]) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3]) : "memory");
}

// mbarrier (shared::cta) and named barriers.
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// Release-arrive (default .release.cta semantics): this thread's prior writes are visible to a thread whose wait
// observes the phase completion.
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Waits (acquire) until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void named_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void named_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
template <int R> __device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R)); }
template <int R> __device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R)); }

// ---- Layout and descriptors ----------------------------------------------------------------------------------

// Byte offset of the 16-byte chunk k8 (elements 8·k8 … 8·k8 + 7) of row r in a [ROWS][D] tile in the 128-byte
// swizzled layout (see the top of this file). The tile base must be 1024-byte aligned.
template <int ROWS> __device__ __forceinline__ unsigned sw128(int r, int k8) {
    return static_cast<unsigned>((k8 >> 3) * (ROWS * 128) + r * 128 + (((k8 & 7) ^ (r & 7)) << 4));
}

// Descriptor of a 128-byte-swizzled operand starting at shared address `addr` (16-byte aligned; 1024-aligned up to
// the k-step offsets described above); SBO 1024, LBO `lbo` bytes (16 for K-major, where it is unused).
__device__ __forceinline__ u64 desc_sw128(unsigned addr, unsigned lbo) {
    return static_cast<u64>((addr & 0x3FFFFu) >> 4) | (static_cast<u64>((lbo >> 4) & 0x3FFFu) << 16) |
           (static_cast<u64>(1024u >> 4) << 32) | (1ull << 62);
}
// K-major operand (rows = M or N) of a [ROWS][D] tile at `tile`, k-step kk (16 columns), starting at row `row0`
// (a multiple of 8).
template <int ROWS> __device__ __forceinline__ u64 desc_k(unsigned tile, int row0, int kk) {
    return desc_sw128(tile + (kk >> 2) * (ROWS * 128) + row0 * 128 + (kk & 3) * 32, 16);
}
// MN-major operand (rows = k, N = every column of the tile) of a [ROWS][D] tile at `tile`, k-step kk (rows 16kk …).
template <int ROWS> __device__ __forceinline__ u64 desc_mn(unsigned tile, int kk) { return desc_sw128(tile + kk * 2048, ROWS * 128); }

// ---- wgmma wrappers ------------------------------------------------------------------------------------------
// Wgmma<N>::ss<T, TB>(d, a_desc, b_desc, scale_d) and ::rs<T, TB>(d, a_regs, b_desc, scale_d): one
// wgmma.mma_async.m64nNk16.f32.T.T; TB = imm-trans-b (0: B K-major, 1: B MN-major); scale_d 0 overwrites d.
// ---- GENERATED by scripts/flash/gen_wgmma.py: do not edit by hand -------------------------------------
template <int N> struct Wgmma;
template <> struct Wgmma<16> {
    template <typename T, int TB, int TA = 0>
    static __device__ __forceinline__ void ss(float (&d)[8], u64 a, u64 b, int scale_d) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, %11, %12;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                         : "l"(a), "l"(b), "r"(scale_d), "n"(TA), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, %11, %12;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                         : "l"(a), "l"(b), "r"(scale_d), "n"(TA), "n"(TB));
        }
    }
    template <typename T, int TB, int TA = 0>
    static __device__ __forceinline__ void ss0(float (&d)[8], u64 a, u64 b) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, %11, %12;\n}\n"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7])
                         : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, %11, %12;\n}\n"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7])
                         : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB));
        }
    }
    template <typename T, int TB>
    static __device__ __forceinline__ void rs(float (&d)[8], const unsigned (&a)[4], u64 b, int scale_d) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1, %14;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1, %14;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
        }
    }
};
template <> struct Wgmma<32> {
    template <typename T, int TB, int TA = 0>
    static __device__ __forceinline__ void ss(float (&d)[16], u64 a, u64 b, int scale_d) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, %19, %20;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                         : "l"(a), "l"(b), "r"(scale_d), "n"(TA), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, %19, %20;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                         : "l"(a), "l"(b), "r"(scale_d), "n"(TA), "n"(TB));
        }
    }
    template <typename T, int TB, int TA = 0>
    static __device__ __forceinline__ void ss0(float (&d)[16], u64 a, u64 b) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, %19, %20;\n}\n"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15])
                         : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, %19, %20;\n}\n"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15])
                         : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB));
        }
    }
    template <typename T, int TB>
    static __device__ __forceinline__ void rs(float (&d)[16], const unsigned (&a)[4], u64 b, int scale_d) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, %22;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, %22;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
        }
    }
};
template <> struct Wgmma<64> {
    template <typename T, int TB, int TA = 0>
    static __device__ __forceinline__ void ss(float (&d)[32], u64 a, u64 b, int scale_d) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                         : "l"(a), "l"(b), "r"(scale_d), "n"(TA), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                         : "l"(a), "l"(b), "r"(scale_d), "n"(TA), "n"(TB));
        }
    }
    template <typename T, int TB, int TA = 0>
    static __device__ __forceinline__ void ss0(float (&d)[32], u64 a, u64 b) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]), "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]), "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31])
                         : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]), "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]), "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31])
                         : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB));
        }
    }
    template <typename T, int TB>
    static __device__ __forceinline__ void rs(float (&d)[32], const unsigned (&a)[4], u64 b, int scale_d) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
        }
    }
};
template <> struct Wgmma<80> {
    template <typename T, int TB, int TA = 0>
    static __device__ __forceinline__ void ss(float (&d)[40], u64 a, u64 b, int scale_d) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %42, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n80k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}, %40, %41, p, 1, 1, %43, %44;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
                         : "l"(a), "l"(b), "r"(scale_d), "n"(TA), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %42, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n80k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}, %40, %41, p, 1, 1, %43, %44;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
                         : "l"(a), "l"(b), "r"(scale_d), "n"(TA), "n"(TB));
        }
    }
    template <typename T, int TB, int TA = 0>
    static __device__ __forceinline__ void ss0(float (&d)[40], u64 a, u64 b) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %42, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n80k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}, %40, %41, p, 1, 1, %43, %44;\n}\n"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]), "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]), "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31]), "=f"(d[32]), "=f"(d[33]), "=f"(d[34]), "=f"(d[35]), "=f"(d[36]), "=f"(d[37]), "=f"(d[38]), "=f"(d[39])
                         : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %42, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n80k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}, %40, %41, p, 1, 1, %43, %44;\n}\n"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]), "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]), "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31]), "=f"(d[32]), "=f"(d[33]), "=f"(d[34]), "=f"(d[35]), "=f"(d[36]), "=f"(d[37]), "=f"(d[38]), "=f"(d[39])
                         : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB));
        }
    }
    template <typename T, int TB>
    static __device__ __forceinline__ void rs(float (&d)[40], const unsigned (&a)[4], u64 b, int scale_d) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %45, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n80k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}, {%40, %41, %42, %43}, %44, p, 1, 1, %46;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %45, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n80k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}, {%40, %41, %42, %43}, %44, p, 1, 1, %46;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
        }
    }
};
template <> struct Wgmma<96> {
    template <typename T, int TB, int TA = 0>
    static __device__ __forceinline__ void ss(float (&d)[48], u64 a, u64 b, int scale_d) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %50, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, %48, %49, p, 1, 1, %51, %52;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
                         : "l"(a), "l"(b), "r"(scale_d), "n"(TA), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %50, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n96k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, %48, %49, p, 1, 1, %51, %52;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
                         : "l"(a), "l"(b), "r"(scale_d), "n"(TA), "n"(TB));
        }
    }
    template <typename T, int TB, int TA = 0>
    static __device__ __forceinline__ void ss0(float (&d)[48], u64 a, u64 b) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %50, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, %48, %49, p, 1, 1, %51, %52;\n}\n"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]), "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]), "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31]), "=f"(d[32]), "=f"(d[33]), "=f"(d[34]), "=f"(d[35]), "=f"(d[36]), "=f"(d[37]), "=f"(d[38]), "=f"(d[39]), "=f"(d[40]), "=f"(d[41]), "=f"(d[42]), "=f"(d[43]), "=f"(d[44]), "=f"(d[45]), "=f"(d[46]), "=f"(d[47])
                         : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %50, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n96k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, %48, %49, p, 1, 1, %51, %52;\n}\n"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]), "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]), "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31]), "=f"(d[32]), "=f"(d[33]), "=f"(d[34]), "=f"(d[35]), "=f"(d[36]), "=f"(d[37]), "=f"(d[38]), "=f"(d[39]), "=f"(d[40]), "=f"(d[41]), "=f"(d[42]), "=f"(d[43]), "=f"(d[44]), "=f"(d[45]), "=f"(d[46]), "=f"(d[47])
                         : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB));
        }
    }
    template <typename T, int TB>
    static __device__ __forceinline__ void rs(float (&d)[48], const unsigned (&a)[4], u64 b, int scale_d) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %53, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, {%48, %49, %50, %51}, %52, p, 1, 1, %54;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %53, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n96k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, {%48, %49, %50, %51}, %52, p, 1, 1, %54;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
        }
    }
};
template <> struct Wgmma<128> {
    template <typename T, int TB, int TA = 0>
    static __device__ __forceinline__ void ss(float (&d)[64], u64 a, u64 b, int scale_d) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                         : "l"(a), "l"(b), "r"(scale_d), "n"(TA), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                         : "l"(a), "l"(b), "r"(scale_d), "n"(TA), "n"(TB));
        }
    }
    template <typename T, int TB, int TA = 0>
    static __device__ __forceinline__ void ss0(float (&d)[64], u64 a, u64 b) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n}\n"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]), "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]), "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31]), "=f"(d[32]), "=f"(d[33]), "=f"(d[34]), "=f"(d[35]), "=f"(d[36]), "=f"(d[37]), "=f"(d[38]), "=f"(d[39]), "=f"(d[40]), "=f"(d[41]), "=f"(d[42]), "=f"(d[43]), "=f"(d[44]), "=f"(d[45]), "=f"(d[46]), "=f"(d[47]), "=f"(d[48]), "=f"(d[49]), "=f"(d[50]), "=f"(d[51]), "=f"(d[52]), "=f"(d[53]), "=f"(d[54]), "=f"(d[55]), "=f"(d[56]), "=f"(d[57]), "=f"(d[58]), "=f"(d[59]), "=f"(d[60]), "=f"(d[61]), "=f"(d[62]), "=f"(d[63])
                         : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n}\n"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]), "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]), "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31]), "=f"(d[32]), "=f"(d[33]), "=f"(d[34]), "=f"(d[35]), "=f"(d[36]), "=f"(d[37]), "=f"(d[38]), "=f"(d[39]), "=f"(d[40]), "=f"(d[41]), "=f"(d[42]), "=f"(d[43]), "=f"(d[44]), "=f"(d[45]), "=f"(d[46]), "=f"(d[47]), "=f"(d[48]), "=f"(d[49]), "=f"(d[50]), "=f"(d[51]), "=f"(d[52]), "=f"(d[53]), "=f"(d[54]), "=f"(d[55]), "=f"(d[56]), "=f"(d[57]), "=f"(d[58]), "=f"(d[59]), "=f"(d[60]), "=f"(d[61]), "=f"(d[62]), "=f"(d[63])
                         : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB));
        }
    }
    template <typename T, int TB>
    static __device__ __forceinline__ void rs(float (&d)[64], const unsigned (&a)[4], u64 b, int scale_d) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
        }
    }
};
template <> struct Wgmma<192> {
    template <typename T, int TB, int TA = 0>
    static __device__ __forceinline__ void ss(float (&d)[96], u64 a, u64 b, int scale_d) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, %96, %97, p, 1, 1, %99, %100;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
                         : "l"(a), "l"(b), "r"(scale_d), "n"(TA), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n192k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, %96, %97, p, 1, 1, %99, %100;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
                         : "l"(a), "l"(b), "r"(scale_d), "n"(TA), "n"(TB));
        }
    }
    template <typename T, int TB, int TA = 0>
    static __device__ __forceinline__ void ss0(float (&d)[96], u64 a, u64 b) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, %96, %97, p, 1, 1, %99, %100;\n}\n"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]), "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]), "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31]), "=f"(d[32]), "=f"(d[33]), "=f"(d[34]), "=f"(d[35]), "=f"(d[36]), "=f"(d[37]), "=f"(d[38]), "=f"(d[39]), "=f"(d[40]), "=f"(d[41]), "=f"(d[42]), "=f"(d[43]), "=f"(d[44]), "=f"(d[45]), "=f"(d[46]), "=f"(d[47]), "=f"(d[48]), "=f"(d[49]), "=f"(d[50]), "=f"(d[51]), "=f"(d[52]), "=f"(d[53]), "=f"(d[54]), "=f"(d[55]), "=f"(d[56]), "=f"(d[57]), "=f"(d[58]), "=f"(d[59]), "=f"(d[60]), "=f"(d[61]), "=f"(d[62]), "=f"(d[63]), "=f"(d[64]), "=f"(d[65]), "=f"(d[66]), "=f"(d[67]), "=f"(d[68]), "=f"(d[69]), "=f"(d[70]), "=f"(d[71]), "=f"(d[72]), "=f"(d[73]), "=f"(d[74]), "=f"(d[75]), "=f"(d[76]), "=f"(d[77]), "=f"(d[78]), "=f"(d[79]), "=f"(d[80]), "=f"(d[81]), "=f"(d[82]), "=f"(d[83]), "=f"(d[84]), "=f"(d[85]), "=f"(d[86]), "=f"(d[87]), "=f"(d[88]), "=f"(d[89]), "=f"(d[90]), "=f"(d[91]), "=f"(d[92]), "=f"(d[93]), "=f"(d[94]), "=f"(d[95])
                         : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n192k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, %96, %97, p, 1, 1, %99, %100;\n}\n"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]), "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]), "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31]), "=f"(d[32]), "=f"(d[33]), "=f"(d[34]), "=f"(d[35]), "=f"(d[36]), "=f"(d[37]), "=f"(d[38]), "=f"(d[39]), "=f"(d[40]), "=f"(d[41]), "=f"(d[42]), "=f"(d[43]), "=f"(d[44]), "=f"(d[45]), "=f"(d[46]), "=f"(d[47]), "=f"(d[48]), "=f"(d[49]), "=f"(d[50]), "=f"(d[51]), "=f"(d[52]), "=f"(d[53]), "=f"(d[54]), "=f"(d[55]), "=f"(d[56]), "=f"(d[57]), "=f"(d[58]), "=f"(d[59]), "=f"(d[60]), "=f"(d[61]), "=f"(d[62]), "=f"(d[63]), "=f"(d[64]), "=f"(d[65]), "=f"(d[66]), "=f"(d[67]), "=f"(d[68]), "=f"(d[69]), "=f"(d[70]), "=f"(d[71]), "=f"(d[72]), "=f"(d[73]), "=f"(d[74]), "=f"(d[75]), "=f"(d[76]), "=f"(d[77]), "=f"(d[78]), "=f"(d[79]), "=f"(d[80]), "=f"(d[81]), "=f"(d[82]), "=f"(d[83]), "=f"(d[84]), "=f"(d[85]), "=f"(d[86]), "=f"(d[87]), "=f"(d[88]), "=f"(d[89]), "=f"(d[90]), "=f"(d[91]), "=f"(d[92]), "=f"(d[93]), "=f"(d[94]), "=f"(d[95])
                         : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB));
        }
    }
    template <typename T, int TB>
    static __device__ __forceinline__ void rs(float (&d)[96], const unsigned (&a)[4], u64 b, int scale_d) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %101, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, {%96, %97, %98, %99}, %100, p, 1, 1, %102;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %101, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n192k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, {%96, %97, %98, %99}, %100, p, 1, 1, %102;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
        }
    }
};
template <> struct Wgmma<256> {
    template <typename T, int TB, int TA = 0>
    static __device__ __forceinline__ void ss(float (&d)[128], u64 a, u64 b, int scale_d) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, %131, %132;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                         : "l"(a), "l"(b), "r"(scale_d), "n"(TA), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, %131, %132;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                         : "l"(a), "l"(b), "r"(scale_d), "n"(TA), "n"(TB));
        }
    }
    template <typename T, int TB, int TA = 0>
    static __device__ __forceinline__ void ss0(float (&d)[128], u64 a, u64 b) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, %131, %132;\n}\n"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]), "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]), "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31]), "=f"(d[32]), "=f"(d[33]), "=f"(d[34]), "=f"(d[35]), "=f"(d[36]), "=f"(d[37]), "=f"(d[38]), "=f"(d[39]), "=f"(d[40]), "=f"(d[41]), "=f"(d[42]), "=f"(d[43]), "=f"(d[44]), "=f"(d[45]), "=f"(d[46]), "=f"(d[47]), "=f"(d[48]), "=f"(d[49]), "=f"(d[50]), "=f"(d[51]), "=f"(d[52]), "=f"(d[53]), "=f"(d[54]), "=f"(d[55]), "=f"(d[56]), "=f"(d[57]), "=f"(d[58]), "=f"(d[59]), "=f"(d[60]), "=f"(d[61]), "=f"(d[62]), "=f"(d[63]), "=f"(d[64]), "=f"(d[65]), "=f"(d[66]), "=f"(d[67]), "=f"(d[68]), "=f"(d[69]), "=f"(d[70]), "=f"(d[71]), "=f"(d[72]), "=f"(d[73]), "=f"(d[74]), "=f"(d[75]), "=f"(d[76]), "=f"(d[77]), "=f"(d[78]), "=f"(d[79]), "=f"(d[80]), "=f"(d[81]), "=f"(d[82]), "=f"(d[83]), "=f"(d[84]), "=f"(d[85]), "=f"(d[86]), "=f"(d[87]), "=f"(d[88]), "=f"(d[89]), "=f"(d[90]), "=f"(d[91]), "=f"(d[92]), "=f"(d[93]), "=f"(d[94]), "=f"(d[95]), "=f"(d[96]), "=f"(d[97]), "=f"(d[98]), "=f"(d[99]), "=f"(d[100]), "=f"(d[101]), "=f"(d[102]), "=f"(d[103]), "=f"(d[104]), "=f"(d[105]), "=f"(d[106]), "=f"(d[107]), "=f"(d[108]), "=f"(d[109]), "=f"(d[110]), "=f"(d[111]), "=f"(d[112]), "=f"(d[113]), "=f"(d[114]), "=f"(d[115]), "=f"(d[116]), "=f"(d[117]), "=f"(d[118]), "=f"(d[119]), "=f"(d[120]), "=f"(d[121]), "=f"(d[122]), "=f"(d[123]), "=f"(d[124]), "=f"(d[125]), "=f"(d[126]), "=f"(d[127])
                         : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, %131, %132;\n}\n"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]), "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]), "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31]), "=f"(d[32]), "=f"(d[33]), "=f"(d[34]), "=f"(d[35]), "=f"(d[36]), "=f"(d[37]), "=f"(d[38]), "=f"(d[39]), "=f"(d[40]), "=f"(d[41]), "=f"(d[42]), "=f"(d[43]), "=f"(d[44]), "=f"(d[45]), "=f"(d[46]), "=f"(d[47]), "=f"(d[48]), "=f"(d[49]), "=f"(d[50]), "=f"(d[51]), "=f"(d[52]), "=f"(d[53]), "=f"(d[54]), "=f"(d[55]), "=f"(d[56]), "=f"(d[57]), "=f"(d[58]), "=f"(d[59]), "=f"(d[60]), "=f"(d[61]), "=f"(d[62]), "=f"(d[63]), "=f"(d[64]), "=f"(d[65]), "=f"(d[66]), "=f"(d[67]), "=f"(d[68]), "=f"(d[69]), "=f"(d[70]), "=f"(d[71]), "=f"(d[72]), "=f"(d[73]), "=f"(d[74]), "=f"(d[75]), "=f"(d[76]), "=f"(d[77]), "=f"(d[78]), "=f"(d[79]), "=f"(d[80]), "=f"(d[81]), "=f"(d[82]), "=f"(d[83]), "=f"(d[84]), "=f"(d[85]), "=f"(d[86]), "=f"(d[87]), "=f"(d[88]), "=f"(d[89]), "=f"(d[90]), "=f"(d[91]), "=f"(d[92]), "=f"(d[93]), "=f"(d[94]), "=f"(d[95]), "=f"(d[96]), "=f"(d[97]), "=f"(d[98]), "=f"(d[99]), "=f"(d[100]), "=f"(d[101]), "=f"(d[102]), "=f"(d[103]), "=f"(d[104]), "=f"(d[105]), "=f"(d[106]), "=f"(d[107]), "=f"(d[108]), "=f"(d[109]), "=f"(d[110]), "=f"(d[111]), "=f"(d[112]), "=f"(d[113]), "=f"(d[114]), "=f"(d[115]), "=f"(d[116]), "=f"(d[117]), "=f"(d[118]), "=f"(d[119]), "=f"(d[120]), "=f"(d[121]), "=f"(d[122]), "=f"(d[123]), "=f"(d[124]), "=f"(d[125]), "=f"(d[126]), "=f"(d[127])
                         : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB));
        }
    }
    template <typename T, int TB>
    static __device__ __forceinline__ void rs(float (&d)[128], const unsigned (&a)[4], u64 b, int scale_d) {
        if constexpr (Sm90IsBf16<T>::value) {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, %134;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
        } else {
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
                         "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, %134;\n}\n"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
        }
    }
};
// ---- end GENERATED ---------------------------------------------------------------------------------------

// ---- Tile copies ---------------------------------------------------------------------------------------------

// Rows [0, ROWS) of a head's [tokens, heads, hd] slice at `g` (rows `stride` elements apart) into the swizzled
// [ROWS][D] tile at shared address `dst`; rows ≥ nrows and columns ≥ hd become zeros. cp.async (asynchronous, commit
// and wait by the caller) when rows are 16-byte aligned (hd % 8 == 0), else element by element (tiny test heads).
// Threads `tid` of NT share the work: thread → column chunk tid % (D/8) and rows tid / (D/8) + i·RS, RS = NT / (D/8);
// when RS is a multiple of 8 the swizzle of all of a thread's rows is the same, so its shared addresses step by a
// constant and its global pointer by RS rows (nothing per chunk for the compiler to hoist out of a tile loop).
// ALIGNED: 0 tests hd % 8 at run time, 1 assumes hd % 8 == 0, −1 assumes it is not (callers that branch once outside
// a tile loop keep only one path's values live in it).
template <int ROWS, int D, int NT, int ALIGNED = 0>
__device__ __forceinline__ void sm90_load_tile(unsigned dst, const unsigned short* g, u64 stride, int nrows, unsigned hd, int tid) {
    constexpr int CH = D / 8;
    if (ALIGNED == 1 || (ALIGNED == 0 && hd % 8 == 0)) {
        if constexpr (NT % CH == 0 && (NT / CH) % 8 == 0) {
            constexpr int RS = NT / CH, IT = (ROWS + RS - 1) / RS;
            const int k8 = tid % CH, rb = tid / CH;
            const bool col_in = static_cast<unsigned>(k8 * 8) < hd;
            const unsigned d0 = dst + sw128<ROWS>(rb, k8);
            const unsigned short* src = g + rb * stride + k8 * 8;
            const u64 step = RS * stride;
#pragma unroll
            for (int i = 0; i < IT; ++i) {
                const int r = rb + i * RS;
                if ((i + 1) * RS <= ROWS || r < ROWS) {
                    const bool in = col_in && r < nrows;
                    cp_async16(d0 + i * RS * 128, in ? src : g, in ? 16u : 0u);
                }
                src += step;
            }
        } else {
            for (int c = tid; c < ROWS * CH; c += NT) {
                const int r = c / CH, k8 = c % CH;
                const bool in = r < nrows && static_cast<unsigned>(k8 * 8) < hd;
                cp_async16(dst + sw128<ROWS>(r, k8), in ? g + r * stride + k8 * 8 : g, in ? 16u : 0u);
            }
        }
    } else {
        for (int e = tid; e < ROWS * D; e += NT) {
            const int r = e / D, col = e % D;
            const unsigned short v = (r < nrows && static_cast<unsigned>(col) < hd) ? g[r * stride + col] : static_cast<unsigned short>(0);
            st_shared_u16(dst + sw128<ROWS>(r, col / 8) + 2 * (col % 8), v);
        }
    }
}

// Rows [rb, rb + NR) of the swizzled [ROWS][D] tile at `src` (only those < nrows, columns < hd) → rows rb … of a
// head's [tokens, heads, hd] slice at `g` (rows `stride` elements apart). Threads `tid` of NT.
template <int ROWS, int NR, int D, int NT>
__device__ __forceinline__ void sm90_store_rows(unsigned short* g, u64 stride, unsigned src, int rb, int nrows, unsigned hd, int tid) {
    constexpr int CH = D / 8;
    if (hd % 8 == 0) {
        for (int c = tid; c < NR * CH; c += NT) {
            const int r = rb + c / CH, k8 = c % CH;
            if (r < nrows && static_cast<unsigned>(k8 * 8) < hd) {
                unsigned v[4];
                ld_shared_v4(src + sw128<ROWS>(r, k8), v);
                st_global_v4(g + r * stride + k8 * 8, v);
            }
        }
    } else {
        for (int e = tid; e < NR * D; e += NT) {
            const int r = rb + e / D, col = e % D;
            if (r < nrows && static_cast<unsigned>(col) < hd) g[r * stride + col] = ld_shared_u16(src + sw128<ROWS>(r, col / 8) + 2 * (col % 8));
        }
    }
}

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

// ---- Forward, all warps load (cp.async) ------------------------------------------------------------------------

// Grid (⌈max_seqlen_q / BM⌉, n_heads, n_seqs) with BM = 64·NWG, 128·NWG threads (NWG warpgroups, each owning 64 query
// rows). K/V tiles of BN keys stream through two stages each, loaded by every thread with cp.async one tile ahead;
// one __syncthreads per tile (after the wait for the current tile, which also frees the stage the next prefetch
// overwrites). Per tile and warpgroup: S = Q·Kᵀ (wgmma SS, K-major both), online softmax in registers, O += P·V
// (wgmma RS: P from registers, V MN-major). OVERLAP (FlashAttention-3's intra-warpgroup pipelining): S(n) = Q·K(n)ᵀ
// and O += P(n+1)·V(n+1) are issued together; the softmax of S(n) runs while the P·V product is still on the tensor
// cores, and O is rescaled after it lands. Tiles are visited from the last (diagonal) to the first, and a warpgroup
// skips the products of tiles none of its rows sees (it still takes part in the loads and barriers). Dynamic shared
// memory: Sm90ForwardSmem<D, BN, NWG>::bytes (Q, 2 K stages, 2 V stages, 1 KB of alignment slack). LAZY: see
// sm90_softmax_tile.
template <int D, int BN, int NWG> struct Sm90ForwardSmem {
    static constexpr int bytes = (64 * NWG + 4 * BN) * D * 2 + 1024;
};

template <typename T, int D, int BN, int NWG, bool OVERLAP, bool LAZY = false>
__device__ __forceinline__ void flash_forward_sm90(const FlashParams p) {
    constexpr int BM = 64 * NWG, THREADS = 128 * NWG, NS = BN / 2, NO = D / 2;
    static_assert(D % 64 == 0 && D <= 256 && BN % 16 == 0 && BN <= 256, "tile shape");
    constexpr unsigned KV_BYTES = BN * D * 2;
    const unsigned sQ = (smem_u32(flash_smem) + 1023u) & ~1023u;
    const unsigned sK = sQ + BM * D * 2, sV = sK + 2 * KV_BYTES;

    FlashSeq s;
    if (!flash_seq(p, blockIdx.z, s)) return;
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
    if (m0 >= s.len_q) return;
    const int h = blockIdx.y, kvh = h / (p.n_heads / p.n_kv_heads);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4, wg = warp / 4;
    const unsigned hd = p.head_dim;
    const int m1 = min(m0 + BM, s.len_q), off = s.len_k - s.len_q;
    const u64 q_stride = static_cast<u64>(p.n_heads) * hd, kv_stride = static_cast<u64>(p.n_kv_heads) * hd;
    const u64 q_row0 = (static_cast<u64>(s.q0 + m0) * p.n_heads + h) * hd;
    const unsigned short* gq = static_cast<const unsigned short*>(p.q) + q_row0;
    const unsigned short* gk = static_cast<const unsigned short*>(p.k) + (static_cast<u64>(s.k0) * p.n_kv_heads + kvh) * hd;
    const unsigned short* gv = static_cast<const unsigned short*>(p.v) + (static_cast<u64>(s.k0) * p.n_kv_heads + kvh) * hd;

    // Keys some row of this block sees: tiles entirely outside the causal or window band are never visited.
    const int i_min = m0 + off, i_max = m1 - 1 + off;
    int lo = 0, hi = s.len_k;
    if (p.causal) hi = min(hi, i_max + 1);
    if (p.window) lo = max(lo, i_min - p.window + 1);
    const int n_first = lo / BN, n_last = hi > lo ? (hi - 1) / BN : n_first - 1;
    // The same for this warpgroup's rows: tiles [wf, wl] (empty when wf > wl).
    const int wr0 = m0 + 64 * wg, wr1 = min(wr0 + 64, s.len_q);
    const int wi_min = wr0 + off, wi_max = wr1 - 1 + off;
    int wf = n_last + 1, wl = n_last;
    if (wr0 < s.len_q) {
        int wlo = 0, whi = s.len_k;
        if (p.causal) whi = min(whi, wi_max + 1);
        if (p.window) wlo = max(wlo, wi_min - p.window + 1);
        if (whi > wlo) wf = wlo / BN, wl = (whi - 1) / BN;
    }

    auto load_k = [&](int n) {
        sm90_load_tile<BN, D, THREADS>(sK + (n & 1) * KV_BYTES, gk + static_cast<u64>(n) * BN * kv_stride, kv_stride, s.len_k - n * BN, hd, tid);
    };
    auto load_v = [&](int n) {
        sm90_load_tile<BN, D, THREADS>(sV + (n & 1) * KV_BYTES, gv + static_cast<u64>(n) * BN * kv_stride, kv_stride, s.len_k - n * BN, hd, tid);
    };
    sm90_load_tile<BM, D, THREADS>(sQ, gq, q_stride, m1 - m0, hd, tid);
    if (n_last >= n_first) {
        load_k(n_last);
        if (!OVERLAP) load_v(n_last);
    }
    cp_async_commit();

    float o[NO], sacc[NS];
    unsigned pf[NS / 8][4];
#pragma unroll
    for (int i = 0; i < NO; ++i) o[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < NS / 8; ++i) pf[i][0] = pf[i][1] = pf[i][2] = pf[i][3] = 0u;
    float row_max[2] = {f32_neg_inf(), f32_neg_inf()}, row_sum[2] = {0.0f, 0.0f};
    const ScoreMap sm = score_map(p);
    const int r0 = m0 + 16 * warp + g;  // this thread's rows: r0, r0 + 8 (sequence-relative)

    auto issue_s = [&](int n) {
        const unsigned k_tile = sK + (n & 1) * KV_BYTES;
        Wgmma<BN>::template ss0<T, 0>(sacc, desc_k<BM>(sQ, 64 * wg, 0), desc_k<BN>(k_tile, 0, 0));
#pragma unroll
        for (int kk = 1; kk < D / 16; ++kk) Wgmma<BN>::template ss<T, 0>(sacc, desc_k<BM>(sQ, 64 * wg, kk), desc_k<BN>(k_tile, 0, kk), 1);
        wg_commit();
    };
    auto issue_pv = [&](int n) {
        const unsigned v_tile = sV + (n & 1) * KV_BYTES;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) Wgmma<D>::template rs<T, 1>(o, pf[kk], desc_mn<BN>(v_tile, kk), 1);
        wg_commit();
    };
    auto softmax = [&](int n, float (&corr)[2]) {
        const int n0 = n * BN;
        const bool full = n0 + BN <= s.len_k && (!p.causal || n0 + BN - 1 <= wi_min) && (p.window == 0 || wi_max - n0 < p.window);
        sm90_softmax<NS, LAZY>(sacc, row_max, row_sum, corr, p, s, sm, full, r0, n0, t);
    };

    for (int n = n_last; n >= n_first; --n) {
        cp_async_wait<0>();  // this tile's group (committed one iteration ago)
        fence_proxy_async();
        __syncthreads();  // its data is visible to every warpgroup, and every warpgroup is done with tile n + 1
        if (n > n_first) load_k(n - 1);
        if (OVERLAP) load_v(n);  // P(n)·V(n) runs in the next iteration
        else if (n > n_first) load_v(n - 1);
        cp_async_commit();

        const bool do_s = n >= wf && n <= wl;
        if (!OVERLAP) {
            if (do_s) {
                wg_fence();
                issue_s(n);
                wg_wait<0>();
                reg_fence(sacc);
                float corr[2];
                softmax(n, corr);
                sm90_rescale_lazy<NO, LAZY>(o, corr);
                sm90_pack_p<T, NS>(sacc, pf);
                reg_fence(o);
                reg_fence(pf);
                wg_fence();
                issue_pv(n);
                wg_wait<0>();
                reg_fence(o);
                reg_fence(pf);
            }
        } else {
            const bool do_pv = n + 1 >= wf && n + 1 <= wl;
            // Three straight-line cases (ptxas serializes wgmma issued under divergent-looking conditions).
            if (do_s && do_pv) {
                reg_fence(o);
                reg_fence(pf);
                wg_fence();
                issue_s(n);
                issue_pv(n + 1);
                wg_wait<1>();
                reg_fence(sacc);
                float corr[2];
                softmax(n, corr);  // overlaps the P·V product still in flight
                wg_wait<0>();
                reg_fence(o);
                reg_fence(pf);
                sm90_rescale_lazy<NO, LAZY>(o, corr);
                sm90_pack_p<T, NS>(sacc, pf);
            } else if (do_s) {
                wg_fence();
                issue_s(n);
                wg_wait<0>();
                reg_fence(sacc);
                float corr[2];
                softmax(n, corr);
                sm90_rescale_lazy<NO, LAZY>(o, corr);
                sm90_pack_p<T, NS>(sacc, pf);
            } else if (do_pv) {
                reg_fence(o);
                reg_fence(pf);
                wg_fence();
                issue_pv(n + 1);
                wg_wait<0>();
                reg_fence(o);
                reg_fence(pf);
            }
        }
    }
    if (OVERLAP && n_last >= n_first) {
        cp_async_wait<0>();  // V(n_first)
        fence_proxy_async();
        __syncthreads();
        if (n_first >= wf && n_first <= wl) {
            reg_fence(o);
            reg_fence(pf);
            wg_fence();
            issue_pv(n_first);
            wg_wait<0>();
            reg_fence(o);
            reg_fence(pf);
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // every warpgroup is done with sQ (and, with no key tile at all, every Q copy has landed)

    // Normalise, stage O through this warpgroup's rows of the Q tile, write lse, then 16-byte coalesced stores.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float sum = row_sum[hr];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        const int r = 16 * warp + g + 8 * hr;
#pragma unroll
        for (int j = 0; j < NO / 4; ++j)
            st_shared_u32(sQ + sw128<BM>(r, j) + 4 * t, pack2<T>(o[4 * j + 2 * hr] * inv, o[4 * j + 2 * hr + 1] * inv));
        if (t == 0 && m0 + r < s.len_q) {
            const float m = row_max[hr];
            p.lse[static_cast<u64>(s.q0 + m0 + r) * p.n_heads + h] = sum > 0.0f ? (m + __log2f(sum)) * FLASH_LN2 : f32_neg_inf();
        }
    }
    __syncthreads();
    sm90_store_rows<BM, BM, D, THREADS>(static_cast<unsigned short*>(p.out) + q_row0, q_stride, sQ, 0, m1 - m0, hd, tid);
}

// ---- Forward, warp-specialized (producer warpgroup + consumer warpgroups) ---------------------------------------

// Grid as flash_forward_sm90, 128·(NWG + 1) threads: warpgroups 0 … NWG−1 compute (64 query rows each), warpgroup NWG
// loads. The producer drops to PR registers (setmaxnreg) and streams Q once, then K(n), V(n) for every tile into two
// stages each with cp.async; after each group it waits for the previous group with cp.async.wait_group 1, fences
// (fence.proxy.async: the tensor cores read what the generic proxy wrote) and release-arrives on that stage's `full`
// mbarrier (128 arrivals). Before overwriting a stage it waits on the stage's `empty` mbarrier, which every consumer
// warp arrives on once its wgmma reading the stage has completed (4·NWG arrivals). Consumers raise their limit to CR
// registers and never take a block-wide barrier: per tile they issue S(n) = Q·K(n)ᵀ and O += P(n+1)·V(n+1) together,
// release K as soon as S has landed, run the softmax of S(n) while P·V is on the tensor cores, then release V, rescale
// O and keep P(n) in registers (FlashAttention-3's intra-warpgroup overlap). PP (ping-pong, NWG ≥ 2): named barriers
// make the consumer warpgroups issue their products in turn, so one warpgroup's softmax runs under the other's
// products. No warpgroup skips tiles here (a tile none of its rows sees is masked to P = 0). Dynamic shared memory:
// Sm90ForwardWsSmem<D, BN, NWG>::bytes.
template <int D, int BN, int NWG> struct Sm90ForwardWsSmem {
    static constexpr int bytes = (64 * NWG + 4 * BN) * D * 2 + 1024 + 128;
};

// Register split for THREADS threads, one block per multiprocessor: the block holds THREADS × ENTRY registers (ENTRY
// = 65536 / THREADS rounded down to a multiple of 8, at most 248); the producer keeps PR, the consumers share the rest
// (at most 240 each).
template <int NWG, int PR> struct Sm90WsRegs {
    static constexpr int THREADS = 128 * (NWG + 1);
    static constexpr int ENTRY0 = (65536 / THREADS) & ~7, ENTRY = ENTRY0 > 248 ? 248 : ENTRY0;
    static constexpr int CR0 = ((ENTRY * THREADS - 128 * PR) / (128 * NWG)) & ~7, CR = CR0 > 240 ? 240 : CR0;
};

// The producer warpgroup's loop (AL: sm90_load_tile's ALIGNED). Groups: Q, then K(n), V(n) per tile in visiting
// order, into stage it % 2; group i is signalled (full barrier, 128 arrivals) once group i + 1 has been issued and
// cp.async.wait_group 1 has seen group i land.
template <int AL, int D, int BN, int BM>
__device__ __forceinline__ void sm90_produce(const FlashParams& p, const FlashSeq& s, unsigned sQ, unsigned sK, unsigned sV, unsigned full_q, unsigned full_k,
                                             unsigned full_v, unsigned empty_k, unsigned empty_v, u64 q_row0, u64 q_stride, u64 kv_stride, int q_rows,
                                             int n_first, int n_last, int ptid, const unsigned short* gk, const unsigned short* gv) {
    constexpr unsigned KV_BYTES = BN * D * 2;
    const unsigned hd = p.head_dim;
    sm90_load_tile<BM, D, 128, AL>(sQ, static_cast<const unsigned short*>(p.q) + q_row0, q_stride, q_rows, hd, ptid);
    cp_async_commit();
    unsigned prev = full_q;  // the barrier of the last group committed and not yet signalled
    int it = 0;
    for (int n = n_last; n >= n_first; --n, ++it) {
        const int st = it & 1;
        const unsigned ph = (it >> 1) & 1;
        const u64 row = static_cast<u64>(n) * BN * kv_stride;
        if (it >= 2) mbar_wait(empty_k + 8 * st, ph ^ 1);
        sm90_load_tile<BN, D, 128, AL>(sK + st * KV_BYTES, gk + row, kv_stride, s.len_k - n * BN, hd, ptid);
        cp_async_commit();
        cp_async_wait<1>();
        fence_proxy_async();
        mbar_arrive(prev);
        if (it >= 2) mbar_wait(empty_v + 8 * st, ph ^ 1);
        sm90_load_tile<BN, D, 128, AL>(sV + st * KV_BYTES, gv + row, kv_stride, s.len_k - n * BN, hd, ptid);
        cp_async_commit();
        cp_async_wait<1>();
        fence_proxy_async();
        mbar_arrive(full_k + 8 * st);
        prev = full_v + 8 * st;
    }
    cp_async_wait<0>();
    fence_proxy_async();
    mbar_arrive(prev);
}

template <typename T, int D, int BN, int NWG, bool PP, int PR, bool LAZY = false>
__device__ __forceinline__ void flash_forward_sm90_ws(const FlashParams p) {
    constexpr int BM = 64 * NWG, CT = 128 * NWG, NS = BN / 2, NO = D / 2;
    constexpr int CR = Sm90WsRegs<NWG, PR>::CR;
    static_assert(D % 64 == 0 && D <= 256 && BN % 16 == 0 && BN <= 256, "tile shape");
    static_assert(PR >= 24 && PR % 8 == 0 && CR >= PR, "register split");
    constexpr unsigned KV_BYTES = BN * D * 2;
    const unsigned sQ = (smem_u32(flash_smem) + 1023u) & ~1023u;
    const unsigned sK = sQ + BM * D * 2, sV = sK + 2 * KV_BYTES, bars = sV + 2 * KV_BYTES;
    // mbarriers: full_q; full_k[2]; full_v[2]; empty_k[2]; empty_v[2] (8 bytes each; stage st at + 8·st).
    const unsigned full_q = bars, full_k = bars + 8, full_v = bars + 24, empty_k = bars + 40, empty_v = bars + 56;

    FlashSeq s;
    if (!flash_seq(p, blockIdx.z, s)) return;
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
    if (m0 >= s.len_q) return;
    const int h = blockIdx.y, kvh = h / (p.n_heads / p.n_kv_heads);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4, wg = warp / 4;
    const unsigned hd = p.head_dim;
    const int m1 = min(m0 + BM, s.len_q), off = s.len_k - s.len_q;
    const u64 q_stride = static_cast<u64>(p.n_heads) * hd, kv_stride = static_cast<u64>(p.n_kv_heads) * hd;
    const u64 q_row0 = (static_cast<u64>(s.q0 + m0) * p.n_heads + h) * hd;

    const int i_min = m0 + off, i_max = m1 - 1 + off;
    int lo = 0, hi = s.len_k;
    if (p.causal) hi = min(hi, i_max + 1);
    if (p.window) lo = max(lo, i_min - p.window + 1);
    const int n_first = lo / BN, n_last = hi > lo ? (hi - 1) / BN : n_first - 1;

    if (tid == 0) {
        mbar_init(full_q, 128);
#pragma unroll
        for (int st = 0; st < 2; ++st) {
            mbar_init(full_k + 8 * st, 128);
            mbar_init(full_v + 8 * st, 128);
            mbar_init(empty_k + 8 * st, 4 * NWG);
            mbar_init(empty_v + 8 * st, 4 * NWG);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == NWG) {
        // ---- producer ----
        setmaxnreg_dec<PR>();
        const int ptid = tid - CT;
        const unsigned short* gk = static_cast<const unsigned short*>(p.k) + (static_cast<u64>(s.k0) * p.n_kv_heads + kvh) * hd;
        const unsigned short* gv = static_cast<const unsigned short*>(p.v) + (static_cast<u64>(s.k0) * p.n_kv_heads + kvh) * hd;
        // One loop per row alignment, so only one load path's values are live in it.
        if (hd % 8 == 0)
            sm90_produce<1, D, BN, BM>(p, s, sQ, sK, sV, full_q, full_k, full_v, empty_k, empty_v, q_row0, q_stride, kv_stride, m1 - m0, n_first, n_last, ptid, gk, gv);
        else
            sm90_produce<-1, D, BN, BM>(p, s, sQ, sK, sV, full_q, full_k, full_v, empty_k, empty_v, q_row0, q_stride, kv_stride, m1 - m0, n_first, n_last, ptid, gk, gv);
        return;
    }

    // ---- consumers ----
    setmaxnreg_inc<CR>();
    const int wr0 = m0 + 64 * wg, wr1 = min(wr0 + 64, s.len_q);
    const int wi_min = wr0 + off, wi_max = wr1 - 1 + off;
    float o[NO], sacc[NS];
    unsigned pf[NS / 8][4];
#pragma unroll
    for (int i = 0; i < NO; ++i) o[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < NS / 8; ++i) pf[i][0] = pf[i][1] = pf[i][2] = pf[i][3] = 0u;
    float row_max[2] = {f32_neg_inf(), f32_neg_inf()}, row_sum[2] = {0.0f, 0.0f};
    const ScoreMap sm = score_map(p);
    const int r0 = m0 + 16 * warp + g;

    auto issue_s = [&](int st) {
        const unsigned k_tile = sK + st * KV_BYTES;
        Wgmma<BN>::template ss0<T, 0>(sacc, desc_k<BM>(sQ, 64 * wg, 0), desc_k<BN>(k_tile, 0, 0));
#pragma unroll
        for (int kk = 1; kk < D / 16; ++kk) Wgmma<BN>::template ss<T, 0>(sacc, desc_k<BM>(sQ, 64 * wg, kk), desc_k<BN>(k_tile, 0, kk), 1);
        wg_commit();
    };
    auto issue_pv = [&](int st) {
        const unsigned v_tile = sV + st * KV_BYTES;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) Wgmma<D>::template rs<T, 1>(o, pf[kk], desc_mn<BN>(v_tile, kk), 1);
        wg_commit();
    };
    auto softmax = [&](int n, float (&corr)[2]) {
        const int n0 = n * BN;
        const bool full = n0 + BN <= s.len_k && (!p.causal || n0 + BN - 1 <= wi_min) && (p.window == 0 || wi_max - n0 < p.window);
        sm90_softmax<NS, LAZY>(sacc, row_max, row_sum, corr, p, s, sm, full, r0, n0, t);
    };

    mbar_wait(full_q, 0);
    if (PP && NWG > 1 && wg == NWG - 1) named_arrive(1, 256);  // warpgroup 0 issues first
    int it = 0;
    for (int n = n_last; n >= n_first; --n, ++it) {
        const int st = it & 1, pst = st ^ 1;  // pst: the stage of tile n + 1 (iteration it − 1)
        mbar_wait(full_k + 8 * st, (it >> 1) & 1);
        if (it > 0) {
            mbar_wait(full_v + 8 * pst, ((it - 1) >> 1) & 1);
            if (PP && NWG > 1) named_sync(1 + wg, 256);
            reg_fence(o);
            reg_fence(pf);
            wg_fence();
            issue_s(st);
            issue_pv(pst);
            if (PP && NWG > 1) named_arrive(1 + (wg + 1) % NWG, 256);
            wg_wait<1>();
            reg_fence(sacc);
            if (lane == 0) mbar_arrive(empty_k + 8 * st);
            float corr[2];
            softmax(n, corr);  // overlaps the P·V product still in flight
            wg_wait<0>();
            reg_fence(o);
            reg_fence(pf);
            if (lane == 0) mbar_arrive(empty_v + 8 * pst);
            sm90_rescale_lazy<NO, LAZY>(o, corr);
            sm90_pack_p<T, NS>(sacc, pf);
        } else {
            if (PP && NWG > 1) named_sync(1 + wg, 256);
            wg_fence();
            issue_s(st);
            if (PP && NWG > 1) named_arrive(1 + (wg + 1) % NWG, 256);
            wg_wait<0>();
            reg_fence(sacc);
            if (lane == 0) mbar_arrive(empty_k + 8 * st);
            float corr[2];
            softmax(n, corr);
            sm90_rescale_lazy<NO, LAZY>(o, corr);
            sm90_pack_p<T, NS>(sacc, pf);
        }
    }
    if (it > 0) {
        const int st = (it - 1) & 1;  // P(n_first)·V(n_first)
        mbar_wait(full_v + 8 * st, ((it - 1) >> 1) & 1);
        reg_fence(o);
        reg_fence(pf);
        wg_fence();
        issue_pv(st);
        wg_wait<0>();
        reg_fence(o);
        reg_fence(pf);
    }

    // Normalise, stage O through this warpgroup's rows of the Q tile (its last read of them has completed), write lse,
    // then the warpgroup's 64 rows with 16-byte coalesced stores.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float sum = row_sum[hr];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        const int r = 16 * warp + g + 8 * hr;
#pragma unroll
        for (int j = 0; j < NO / 4; ++j)
            st_shared_u32(sQ + sw128<BM>(r, j) + 4 * t, pack2<T>(o[4 * j + 2 * hr] * inv, o[4 * j + 2 * hr + 1] * inv));
        if (t == 0 && m0 + r < s.len_q) {
            const float m = row_max[hr];
            p.lse[static_cast<u64>(s.q0 + m0 + r) * p.n_heads + h] = sum > 0.0f ? (m + __log2f(sum)) * FLASH_LN2 : f32_neg_inf();
        }
    }
    named_sync(1 + NWG + wg, 128);
    sm90_store_rows<BM, 64, D, 128>(static_cast<unsigned short*>(p.out) + q_row0, q_stride, sQ, 64 * wg, m1 - m0, hd, tid - 128 * wg);
}

// ---- Backward ------------------------------------------------------------------------------------------------

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
    // Key j is visible to query r iff j < len_k, (!causal || r ≥ j − off) and (!window || r < j − off + window):
    // a query range [lo, hi) per key row, relative to this thread's first query m0 + 2t.
    int lo[2], hi[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int j = kj + 8 * hr;
        lo[hr] = (p.causal ? j - off : -(1 << 29)) - (m0 + 2 * t);
        hi[hr] = j < sq.len_k ? (p.window ? j - off + p.window : (1 << 29)) - (m0 + 2 * t) : -(1 << 29);
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

template <int D, int NWG> struct Sm90BackwardSmem {
    // K, V [BN][D]; Q, dO [2][64][D]; dSᵀ [BN][64]; lse, delta [2][64] f32; 1 KB alignment slack.
    static constexpr int BN = 64 * NWG;
    static constexpr int bytes = 2 * BN * D * 2 + 4 * 64 * D * 2 + BN * 64 * 2 + 4 * 64 * 4 + 1024;
};

// Grid (⌈max_seqlen_k / BN⌉, n_kv_heads, n_seqs) with BN = 64·NWG keys per block, 128·NWG threads; NWG warpgroups,
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
// under it. Dynamic shared memory: Sm90BackwardSmem<D, NWG>::bytes.
template <typename T, int D, int NWG, bool OVERLAP = false>
__device__ __forceinline__ void flash_backward_sm90(const FlashParams p) {
    constexpr int BM = 64, BN = 64 * NWG, THREADS = 128 * NWG, NO = D / 2, DQN = D / NWG;
    static_assert((D == 64 || D == 128) && DQN % 16 == 0, "shape");
    constexpr unsigned KV_BYTES = BN * D * 2, QO_BYTES = BM * D * 2;
    const unsigned sK = (smem_u32(flash_smem) + 1023u) & ~1023u;
    const unsigned sV = sK + KV_BYTES, sQ = sV + KV_BYTES, sdO = sQ + 2 * QO_BYTES, sdS = sdO + 2 * QO_BYTES;
    const unsigned sL = sdS + BN * BM * 2, sD = sL + 2 * BM * 4;  // f32 [2][BM] each

    FlashSeq s;
    if (!flash_seq(p, blockIdx.z, s)) return;
    const int n0 = blockIdx.x * BN;
    if (n0 >= s.len_k) return;
    const int kvh = blockIdx.y, group = p.n_heads / p.n_kv_heads;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4, wg = warp / 4;
    const unsigned hd = p.head_dim;
    const int n1 = min(n0 + BN, s.len_k), off = s.len_k - s.len_q;
    const u64 q_stride = static_cast<u64>(p.n_heads) * hd, kv_stride = static_cast<u64>(p.n_kv_heads) * hd;
    const u64 kv_row0 = (static_cast<u64>(s.k0 + n0) * p.n_kv_heads + kvh) * hd;

    // Query rows that see some key of this tile.
    int r_lo = 0, r_hi = s.len_q;
    if (p.causal) r_lo = max(0, n0 - off);
    if (p.window) r_hi = min(r_hi, n1 - 1 + p.window - off);
    const int m_lo = r_lo / BM, tiles = r_hi > r_lo ? (r_hi - 1) / BM - m_lo + 1 : 0;
    const int pairs = group * tiles;

    sm90_load_tile<BN, D, THREADS>(sK, static_cast<const unsigned short*>(p.k) + kv_row0, kv_stride, n1 - n0, hd, tid);
    sm90_load_tile<BN, D, THREADS>(sV, static_cast<const unsigned short*>(p.v) + kv_row0, kv_stride, n1 - n0, hd, tid);
    auto prefetch = [&](int it, int st) {
        const int h = kvh * group + it / tiles, m0 = (m_lo + it % tiles) * BM;
        const u64 row0 = static_cast<u64>(s.q0 + m0) * p.n_heads + h;
        const int rows = min(BM, s.len_q - m0);
        sm90_load_tile<BM, D, THREADS>(sQ + st * QO_BYTES, static_cast<const unsigned short*>(p.q) + row0 * hd, q_stride, rows, hd, tid);
        sm90_load_tile<BM, D, THREADS>(sdO + st * QO_BYTES, static_cast<const unsigned short*>(p.d_out) + row0 * hd, q_stride, rows, hd, tid);
        if (tid < BM) {
            const bool in = tid < rows;
            cp_async4(sL + st * BM * 4 + 4 * tid, in ? p.lse + (row0 + static_cast<u64>(tid) * p.n_heads) : p.lse, in ? 4u : 0u);
            cp_async4(sD + st * BM * 4 + 4 * tid, in ? p.delta + (row0 + static_cast<u64>(tid) * p.n_heads) : p.delta, in ? 4u : 0u);
        }
    };
    if (pairs > 0) prefetch(0, 0);
    cp_async_commit();

    float dk[NO], dv[NO];
#pragma unroll
    for (int i = 0; i < NO; ++i) dk[i] = dv[i] = 0.0f;
    const int kr0 = 16 * warp + g;  // this thread's key rows in the tile: kr0, kr0 + 8

    for (int it = 0; it < pairs; ++it) {
        const int st = it & 1;
        const int h = kvh * group + it / tiles, m0 = (m_lo + it % tiles) * BM;
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();  // this pair's tiles are visible; every thread is done with pair it − 1 (its buffers and sdS)
        if (it + 1 < pairs) prefetch(it + 1, st ^ 1);
        cp_async_commit();
        const unsigned cQ = sQ + st * QO_BYTES, cdO = sdO + st * QO_BYTES;
        const unsigned cL = sL + st * BM * 4 + 8 * t, cD = sD + st * BM * 4 + 8 * t;  // this thread's first query
        // Loop-invariant tile addresses made opaque per pair: otherwise every descriptor built from them is hoisted
        // out of the loop into two registers of its own (64 registers of descriptors at D = 128).
        const unsigned cK = opaque(sK), cV = opaque(sV), cdS = opaque(sdS);

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
        __syncthreads();  // every warpgroup's dSᵀ is in place

        // 4. dQ[64 queries][DQN columns c0 …] = dS·K: A = dS M-major (the stored dSᵀ), B = K N-major.
        float dq[DQN / 2];
        const int c0 = wg * DQN;
        const unsigned k_cols = cK + (c0 / 64) * (BN * 128) + (c0 % 64) * 2;
        wg_fence();
        Wgmma<DQN>::template ss0<T, 1, 1>(dq, desc_mn<BN>(cdS, 0), desc_sw128(k_cols, BN * 128));
#pragma unroll
        for (int kk = 1; kk < BN / 16; ++kk)
            Wgmma<DQN>::template ss<T, 1, 1>(dq, desc_mn<BN>(cdS, kk), desc_sw128(k_cols + kk * 2048, BN * 128), 1);
        wg_commit();
        wg_wait<0>();  // dV, dK and dQ
        reg_fence(dq);
        reg_fence(dv);
        reg_fence(dk);
        reg_fence(pf);
        reg_fence(dsf);

        // dq entry i: query 16·(warp%4) + g + 8·((i%4)/2), column c0 + 8·(i/4) + 2t + i%2. The row offset comes from
        // an opaque thread index: kept across the pair loop, it was the one value D = 128 spilled.
        const int tid_q = static_cast<int>(opaque(threadIdx.x)), rq = 16 * ((tid_q / 32) % 4) + (tid_q % 32) / 4;
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int r = m0 + rq + 8 * hr;
            if (r >= s.len_q) continue;
            float* dst = p.dq_accum + (static_cast<u64>(s.q0 + r) * p.n_heads + h) * hd;
#pragma unroll
            for (int j = 0; j < DQN / 8; ++j) {
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
    cp_async_wait<0>();

    // dK, dV: rows < len_k, columns < hd, straight from the fragments (entry i: key kr0 + 8·((i%4)/2), column
    // 8·(i/4) + 2t + i%2).
    unsigned short* gdk = static_cast<unsigned short*>(p.dk) + kv_row0;
    unsigned short* gdv = static_cast<unsigned short*>(p.dv) + kv_row0;
    const int tid_e = static_cast<int>(opaque(threadIdx.x));  // recomputed here rather than kept across the loop
    const int kr0_e = 16 * (tid_e / 32) + (tid_e % 32) / 4, t_e = tid_e % 4;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int r = kr0_e + 8 * hr;
        if (n0 + r >= s.len_k) continue;
#pragma unroll
        for (int j = 0; j < NO / 4; ++j) {
            const unsigned c = 8 * j + 2 * t_e;
            const unsigned pk = pack2<T>(dk[4 * j + 2 * hr], dk[4 * j + 2 * hr + 1]);
            const unsigned pvv = pack2<T>(dv[4 * j + 2 * hr], dv[4 * j + 2 * hr + 1]);
            if (hd % 2 == 0 && c + 1 < hd) {
                *reinterpret_cast<unsigned*>(gdk + r * kv_stride + c) = pk;
                *reinterpret_cast<unsigned*>(gdv + r * kv_stride + c) = pvv;
            } else {
                if (c < hd) {
                    gdk[r * kv_stride + c] = static_cast<unsigned short>(pk & 0xffffu);
                    gdv[r * kv_stride + c] = static_cast<unsigned short>(pvv & 0xffffu);
                }
                if (c + 1 < hd) {
                    gdk[r * kv_stride + c + 1] = static_cast<unsigned short>(pk >> 16);
                    gdv[r * kv_stride + c + 1] = static_cast<unsigned short>(pvv >> 16);
                }
            }
        }
    }
}

template <int D> struct Sm90BackwardSplitSmem {
    // K, V [64][D]; Q, dO [2][64][D]; Pᵀ, dSᵀ [64][64]; lse, delta [2][64] f32; 1 KB alignment slack.
    static constexpr int bytes = 2 * 64 * D * 2 + 4 * 64 * D * 2 + 2 * 64 * 64 * 2 + 4 * 64 * 4 + 1024;
};

// The backward for head dims whose dK and dV do not fit one warpgroup's registers (D = 256: 256 per thread with 64
// keys per warpgroup): two warpgroups share one tile of 64 keys and split the work by queries where the products are
// per query and by head dims where they are per head dim. Grid (⌈max_seqlen_k / 64⌉, n_kv_heads, n_seqs), 256
// threads; the pair walk, the double-buffered Q/dO/lse/delta loads and the masks are flash_backward_sm90's. Per
// pair, warpgroup w:
//   1. Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for all 64 keys × queries 32w … 32w + 31 (wgmma SS, N = 32; P is formed while
//      dPᵀ's product runs);
//   2. P and dS in registers (sm90_bwd_p, sm90_bwd_ds), stored as Pᵀ and dSᵀ (bf16/f16, swizzled [key][query]); block barrier;
//   3. dV[:, DH·w …] += Pᵀ·dO, dK[:, DH·w …] += dSᵀ·Q and dQ[:, DH·w …] = dS·K, DH = D/2 head dims each (wgmma SS: Pᵀ
//      and dSᵀ K-major, dS M-major from the same store; dO, Q and K N-major column slices), issued together;
//   4. dQ added to the f32 dq_accum with red.global.add.v2.f32.
// Registers per thread: dK and dV D/4 each, dQ D/4, Sᵀ and dPᵀ 16 each. Dynamic shared memory:
// Sm90BackwardSplitSmem<D>::bytes (210 KB at D = 256).
template <typename T, int D>
__device__ __forceinline__ void flash_backward_sm90_split(const FlashParams p) {
    constexpr int BM = 64, BN = 64, THREADS = 256, DH = D / 2, NQ = BM / 2;
    static_assert(D % 128 == 0 && D <= 256, "shape");
    constexpr unsigned KV_BYTES = BN * D * 2, QO_BYTES = BM * D * 2, PS_BYTES = BN * BM * 2;
    const unsigned sK = (smem_u32(flash_smem) + 1023u) & ~1023u;
    const unsigned sV = sK + KV_BYTES, sQ = sV + KV_BYTES, sdO = sQ + 2 * QO_BYTES, sP = sdO + 2 * QO_BYTES;
    const unsigned sdS = sP + PS_BYTES, sL = sdS + PS_BYTES, sD = sL + 2 * BM * 4;  // f32 [2][BM] each

    FlashSeq s;
    if (!flash_seq(p, blockIdx.z, s)) return;
    const int n0 = blockIdx.x * BN;
    if (n0 >= s.len_k) return;
    const int kvh = blockIdx.y, group = p.n_heads / p.n_kv_heads;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4, wg = warp / 4;
    const unsigned hd = p.head_dim;
    const int n1 = min(n0 + BN, s.len_k), off = s.len_k - s.len_q;
    const u64 q_stride = static_cast<u64>(p.n_heads) * hd, kv_stride = static_cast<u64>(p.n_kv_heads) * hd;
    const u64 kv_row0 = (static_cast<u64>(s.k0 + n0) * p.n_kv_heads + kvh) * hd;

    int r_lo = 0, r_hi = s.len_q;
    if (p.causal) r_lo = max(0, n0 - off);
    if (p.window) r_hi = min(r_hi, n1 - 1 + p.window - off);
    const int m_lo = r_lo / BM, tiles = r_hi > r_lo ? (r_hi - 1) / BM - m_lo + 1 : 0;
    const int pairs = group * tiles;

    sm90_load_tile<BN, D, THREADS>(sK, static_cast<const unsigned short*>(p.k) + kv_row0, kv_stride, n1 - n0, hd, tid);
    sm90_load_tile<BN, D, THREADS>(sV, static_cast<const unsigned short*>(p.v) + kv_row0, kv_stride, n1 - n0, hd, tid);
    auto prefetch = [&](int it, int st) {
        const int h = kvh * group + it / tiles, m0 = (m_lo + it % tiles) * BM;
        const u64 row0 = static_cast<u64>(s.q0 + m0) * p.n_heads + h;
        const int rows = min(BM, s.len_q - m0);
        sm90_load_tile<BM, D, THREADS>(sQ + st * QO_BYTES, static_cast<const unsigned short*>(p.q) + row0 * hd, q_stride, rows, hd, tid);
        sm90_load_tile<BM, D, THREADS>(sdO + st * QO_BYTES, static_cast<const unsigned short*>(p.d_out) + row0 * hd, q_stride, rows, hd, tid);
        if (tid < BM) {
            const bool in = tid < rows;
            cp_async4(sL + st * BM * 4 + 4 * tid, in ? p.lse + (row0 + static_cast<u64>(tid) * p.n_heads) : p.lse, in ? 4u : 0u);
            cp_async4(sD + st * BM * 4 + 4 * tid, in ? p.delta + (row0 + static_cast<u64>(tid) * p.n_heads) : p.delta, in ? 4u : 0u);
        }
    };
    if (pairs > 0) prefetch(0, 0);
    cp_async_commit();

    float dk[DH / 2], dv[DH / 2];
#pragma unroll
    for (int i = 0; i < DH / 2; ++i) dk[i] = dv[i] = 0.0f;
    const int kr0 = 16 * (warp % 4) + g;  // this thread's key rows in the tile: kr0, kr0 + 8

    for (int it = 0; it < pairs; ++it) {
        const int st = it & 1;
        const int h = kvh * group + it / tiles, m0 = (m_lo + it % tiles) * BM;
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();  // this pair's tiles are visible; every thread is done with pair it − 1
        if (it + 1 < pairs) prefetch(it + 1, st ^ 1);
        cp_async_commit();
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
        __syncthreads();  // both warpgroups' halves of Pᵀ and dSᵀ are in place

        // 3. This warpgroup's DH head dims c0 … of dV, dK and dQ (k = the 64 queries for dV and dK, the 64 keys for dQ).
        const int c0 = DH * wg;
        const unsigned o_cols = cdO + (c0 / 64) * (BM * 128), q_cols = cQ + (c0 / 64) * (BM * 128);
        const unsigned k_cols = cK + (c0 / 64) * (BN * 128);
        float dq[DH / 2];
        reg_fence(dv);
        reg_fence(dk);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) Wgmma<DH>::template ss<T, 1>(dv, desc_k<BN>(cP, 0, kk), desc_sw128(o_cols + kk * 2048, BM * 128), 1);
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) Wgmma<DH>::template ss<T, 1>(dk, desc_k<BN>(cdS, 0, kk), desc_sw128(q_cols + kk * 2048, BM * 128), 1);
        Wgmma<DH>::template ss0<T, 1, 1>(dq, desc_mn<BN>(cdS, 0), desc_sw128(k_cols, BN * 128));
#pragma unroll
        for (int kk = 1; kk < BN / 16; ++kk)
            Wgmma<DH>::template ss<T, 1, 1>(dq, desc_mn<BN>(cdS, kk), desc_sw128(k_cols + kk * 2048, BN * 128), 1);
        wg_commit();
        wg_wait<0>();
        reg_fence(dq);
        reg_fence(dv);
        reg_fence(dk);

        // 4. dq entry i: query 16·(warp%4) + g + 8·((i%4)/2), column c0 + 8·(i/4) + 2t + i%2.
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int r = m0 + kr0 + 8 * hr;
            if (r >= s.len_q) continue;
            float* dst = p.dq_accum + (static_cast<u64>(s.q0 + r) * p.n_heads + h) * hd;
#pragma unroll
            for (int j = 0; j < DH / 8; ++j) {
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
    cp_async_wait<0>();

    // dK, dV: entry i: key kr0 + 8·((i%4)/2), column c0 + 8·(i/4) + 2t + i%2; rows < len_k, columns < hd.
    unsigned short* gdk = static_cast<unsigned short*>(p.dk) + kv_row0;
    unsigned short* gdv = static_cast<unsigned short*>(p.dv) + kv_row0;
    const int c0 = DH * wg;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int r = kr0 + 8 * hr;
        if (n0 + r >= s.len_k) continue;
#pragma unroll
        for (int j = 0; j < DH / 8; ++j) {
            const unsigned c = c0 + 8 * j + 2 * t;
            const unsigned pk = pack2<T>(dk[4 * j + 2 * hr], dk[4 * j + 2 * hr + 1]);
            const unsigned pvv = pack2<T>(dv[4 * j + 2 * hr], dv[4 * j + 2 * hr + 1]);
            if (hd % 2 == 0 && c + 1 < hd) {
                *reinterpret_cast<unsigned*>(gdk + r * kv_stride + c) = pk;
                *reinterpret_cast<unsigned*>(gdv + r * kv_stride + c) = pvv;
            } else {
                if (c < hd) {
                    gdk[r * kv_stride + c] = static_cast<unsigned short>(pk & 0xffffu);
                    gdv[r * kv_stride + c] = static_cast<unsigned short>(pvv & 0xffffu);
                }
                if (c + 1 < hd) {
                    gdk[r * kv_stride + c + 1] = static_cast<unsigned short>(pk >> 16);
                    gdv[r * kv_stride + c + 1] = static_cast<unsigned short>(pvv >> 16);
                }
            }
        }
    }
}
