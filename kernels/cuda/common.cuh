// Shared by every kernel source: the bf16 storage type and its f32 conversions, grid-stride indexing, block
// reductions. The loader splices this file in place of each source's `#include "common.cuh"` line, so NVRTC needs no
// include path and no CUDA headers (nvcc compiles the sources unchanged, finding this file beside them).
//
// Conventions: I/O in f32 or bf16, arithmetic in f32, one rounding to the output type. Every entry point is
// `extern "C"` and named `<op>_<dtype>`; its launcher in kernels/src/cuda/<op>.rs passes arguments in the same
// order. Blocks are 1-D; row kernels take one block per row and a block size that is a multiple of 32.
#pragma once

typedef unsigned long long u64;

// bf16 as stored (half::bf16 on the Rust side): the top 16 bits of an f32. A struct, so no arithmetic happens on it
// by accident.
struct bf16 {
    unsigned short bits;
};

// IEEE half as stored (half::f16 on the Rust side); the attention kernels read it, NF4 dequantization writes it.
struct f16 {
    unsigned short bits;
};

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float(static_cast<unsigned>(v.bits) << 16); }
__device__ __forceinline__ float to_f32(f16 v) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(v.bits));
    return r;
}

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
// Round to nearest even, as half::bf16::from_f32 (sm_80+ instruction).
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) {
    bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float v) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
}

__device__ __forceinline__ float f32_nan() { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ float f32_neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float f32_pos_inf() { return __int_as_float(0x7f800000); }

// A subnormal becomes a zero of the same sign (what bitsandbytes' --use_fast_math kernels do; nf4.rs `ftz`).
__device__ __forceinline__ float flush_subnormal(float v) {
    return fabsf(v) < 1.17549435e-38f ? copysignf(0.0f, v) : v;
}

// SplitMix64: the i-th output from `seed` is splitmix_mix(seed + (i + 1)·SPLITMIX_STEP) (kernels/src/rng.rs
// `Rng::uniform_at` takes its top 53 bits): dropout's draw for element i, computed anywhere without the draws before
// it; consecutive elements' states differ by SPLITMIX_STEP, so a thread drawing a run of them adds instead of
// multiplying.
#define SPLITMIX_STEP 0x9E3779B97F4A7C15ull
__device__ __forceinline__ u64 splitmix_mix(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
// The state whose mix is the i-th draw; element i + j's is this + j·SPLITMIX_STEP.
__device__ __forceinline__ u64 splitmix_state(u64 seed, u64 i) { return seed + (i + 1) * SPLITMIX_STEP; }
__device__ __forceinline__ u64 splitmix_at(u64 seed, u64 i) { return splitmix_mix(splitmix_state(seed, i)); }

// Programmatic dependent launch (sm_90+; `launch!` for the modules of Module::waits_for_previous): such a kernel's
// blocks may start while the kernel before it in the stream is still running. Every block calls grid_dependency_wait()
// before it reads or writes memory an earlier kernel may touch (it returns once that kernel has completed and its
// writes are visible; at once when the launch did not overlap), then grid_dependents_launch(), which lets the next such
// kernel start: after the wait, so that at most one kernel waits behind a running one and none runs ahead of an
// unfinished kernel. Without the launch attribute, and below sm_90, both do nothing.
__device__ __forceinline__ void grid_dependency_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependents_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Both, where a kernel has nothing to do before its inputs are ready.
__device__ __forceinline__ void grid_dependency_sync() {
    grid_dependency_wait();
    grid_dependents_launch();
}

// Grid-stride loops over element counts past 2^32.
__device__ __forceinline__ u64 thread_index() { return static_cast<u64>(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64 thread_count() { return static_cast<u64>(gridDim.x) * blockDim.x; }

// v summed over the warp, in every lane (a fixed butterfly: the same sum run to run).
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Defines `__device__ float NAME(float v)`: v combined over the block with COMBINE(a, b) (IDENTITY for the lanes past
// the last warp), returned to every thread. A fixed tree for a fixed block size, so results are reproducible run to
// run. Every thread of the block must call it. One definition for every combine, so that they all take that tree.
#define DEFINE_BLOCK_REDUCE(NAME, COMBINE, IDENTITY)                                        \
    __device__ float NAME(float v) {                                                        \
        __shared__ float partial[32];                                                       \
        for (int o = 16; o > 0; o >>= 1) v = COMBINE(v, __shfl_xor_sync(0xffffffffu, v, o)); \
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;                         \
        __syncthreads(); /* the previous call's readers are done with `partial` */          \
        if (lane == 0) partial[warp] = v;                                                   \
        __syncthreads();                                                                    \
        v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : (IDENTITY);          \
        for (int o = 16; o > 0; o >>= 1) v = COMBINE(v, __shfl_xor_sync(0xffffffffu, v, o)); \
        return v;                                                                           \
    }

__device__ __forceinline__ float f32_add(float a, float b) { return a + b; }

// Sum over the block.
DEFINE_BLOCK_REDUCE(block_sum, f32_add, 0.0f)

// Sums over the block of two values at once (two rows of a row kernel), with block_sum's fixed tree: one pair of
// barriers for both.
__device__ float2 block_sum2(float2 v) {
    __shared__ float2 partial2[32];
    for (int o = 16; o > 0; o >>= 1) {
        v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
        v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) partial2[warp] = v;
    __syncthreads();
    v = lane < static_cast<int>(blockDim.x / 32) ? partial2[lane] : make_float2(0.0f, 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
        v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
    }
    return v;
}

// Max over the block (NaN-ignoring, like Rust's f32::max).
DEFINE_BLOCK_REDUCE(block_max, fmaxf, f32_neg_inf())

// Memory-bound kernels move 8 elements per access group: one 16-byte load or store of bf16 (or f16), two of f32
// (LDG.E.128, STG.E.128), so that a warp's accesses cover 512 or 1024 contiguous bytes and each thread has 16 or 32 bytes in
// flight per group. The address must be 16-byte aligned; launchers check the bases and callers the offsets, and take a
// scalar path where they are not.
template <typename T> struct Raw8;
template <> struct Raw8<bf16> {
    uint4 a;
};
template <> struct Raw8<f16> {
    uint4 a;
};
template <> struct Raw8<float> {
    uint4 a, b;
};

// Elements per 16 bytes: a row or buffer offset that is a multiple of this keeps 16-byte alignment.
template <typename T> __device__ __forceinline__ constexpr unsigned align_elems() { return 16 / sizeof(T); }

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<u64>(p) % 16 == 0; }

__device__ __forceinline__ uint4 ld_u4(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void st_u4(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

template <typename T> __device__ __forceinline__ Raw8<T> load8(const T* p);
template <> __device__ __forceinline__ Raw8<bf16> load8<bf16>(const bf16* p) { return Raw8<bf16>{ld_u4(p)}; }
template <> __device__ __forceinline__ Raw8<f16> load8<f16>(const f16* p) { return Raw8<f16>{ld_u4(p)}; }
template <> __device__ __forceinline__ Raw8<float> load8<float>(const float* p) {
    return Raw8<float>{ld_u4(p), ld_u4(p + 4)};
}

// A bf16 pair as stored in one 32-bit word (first element in the low half) → two exact f32.
__device__ __forceinline__ void unpack_bf16x2(unsigned w, float& first, float& second) {
    first = __uint_as_float(w << 16);
    second = __uint_as_float(w & 0xffff0000u);
}

// The same for an f16 pair.
__device__ __forceinline__ void unpack_f16x2(unsigned w, float& first, float& second) {
    asm("{\n.reg .f16 lo, hi;\nmov.b32 {lo, hi}, %2;\ncvt.f32.f16 %0, lo;\ncvt.f32.f16 %1, hi;\n}" : "=f"(first), "=f"(second) : "r"(w));
}

__device__ __forceinline__ void unpack8(const Raw8<bf16>& r, float (&v)[8]) {
    unpack_bf16x2(r.a.x, v[0], v[1]);
    unpack_bf16x2(r.a.y, v[2], v[3]);
    unpack_bf16x2(r.a.z, v[4], v[5]);
    unpack_bf16x2(r.a.w, v[6], v[7]);
}
__device__ __forceinline__ void unpack8(const Raw8<f16>& r, float (&v)[8]) {
    unpack_f16x2(r.a.x, v[0], v[1]);
    unpack_f16x2(r.a.y, v[2], v[3]);
    unpack_f16x2(r.a.z, v[4], v[5]);
    unpack_f16x2(r.a.w, v[6], v[7]);
}
__device__ __forceinline__ void unpack8(const Raw8<float>& r, float (&v)[8]) {
    v[0] = __uint_as_float(r.a.x), v[1] = __uint_as_float(r.a.y), v[2] = __uint_as_float(r.a.z), v[3] = __uint_as_float(r.a.w);
    v[4] = __uint_as_float(r.b.x), v[5] = __uint_as_float(r.b.y), v[6] = __uint_as_float(r.b.z), v[7] = __uint_as_float(r.b.w);
}

// Two values rounded to nearest even, as from_f32<T> rounds each, packed with the first in the low half (at the lower
// address).
template <typename T> __device__ __forceinline__ unsigned pack2(float first, float second);
template <> __device__ __forceinline__ unsigned pack2<bf16>(float first, float second) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(second), "f"(first));
    return r;
}
template <> __device__ __forceinline__ unsigned pack2<f16>(float first, float second) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(second), "f"(first));
    return r;
}

template <typename T> __device__ __forceinline__ void store8(T* p, const float (&v)[8]);
// A 2-byte type's 8 values, rounded pairwise by pack2<T>, in one 16-byte store.
template <typename T> __device__ __forceinline__ void store8_half(T* p, const float (&v)[8]) {
    st_u4(p, make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7])));
}
template <> __device__ __forceinline__ void store8<bf16>(bf16* p, const float (&v)[8]) { store8_half(p, v); }
template <> __device__ __forceinline__ void store8<f16>(f16* p, const float (&v)[8]) { store8_half(p, v); }
template <> __device__ __forceinline__ void store8<float>(float* p, const float (&v)[8]) {
    st_u4(p, make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3])));
    st_u4(p + 4, make_uint4(__float_as_uint(v[4]), __float_as_uint(v[5]), __float_as_uint(v[6]), __float_as_uint(v[7])));
}

// 8 elements stored as loaded (a copy: every bit pattern, NaN payloads included, survives).
__device__ __forceinline__ void store_raw8(bf16* p, const Raw8<bf16>& r) { st_u4(p, r.a); }
__device__ __forceinline__ void store_raw8(float* p, const Raw8<float>& r) {
    st_u4(p, r.a);
    st_u4(p + 4, r.b);
}

template <typename T> __device__ __forceinline__ void load8_f32(const T* p, float (&v)[8]) { unpack8(load8(p), v); }

// One 8-element chunk per input: loaded, mapped element by element, stored.
template <unsigned NI, unsigned NO, typename T, typename F>
__device__ __forceinline__ void map_chunk(const Raw8<T> (&raw)[NI], T* const (&out)[NO], u64 at, F f) {
    float a[NI][8], b[NO][8];
#pragma unroll
    for (unsigned i = 0; i < NI; ++i) unpack8(raw[i], a[i]);
#pragma unroll
    for (unsigned k = 0; k < 8; ++k) {
        float x[NI], y[NO];
#pragma unroll
        for (unsigned i = 0; i < NI; ++i) x[i] = a[i][k];
        f(x, y);
#pragma unroll
        for (unsigned o = 0; o < NO; ++o) b[o][k] = y[o];
    }
#pragma unroll
    for (unsigned o = 0; o < NO; ++o) store8(out[o] + at, b[o]);
}

// out_o[i] = f(in_0[i], …)_o for i < n, with f(const float (&x)[NI], float (&y)[NO]) one element's map. When every
// pointer is 16-byte aligned, 8-element chunks (16-byte accesses), two per thread per step so that the loads of both
// are in flight together; the rest, and everything otherwise, one element per thread. Grid-stride (the launchers'
// grids are one wave). Waits for the previous kernel first, so a map's launch may overlap it.
template <unsigned NI, unsigned NO, typename T, typename F>
__device__ __forceinline__ void map(const T* const (&in)[NI], T* const (&out)[NO], u64 n, F f) {
    grid_dependency_sync();
    bool vector = true;
#pragma unroll
    for (unsigned i = 0; i < NI; ++i) vector = vector && aligned16(in[i]);
#pragma unroll
    for (unsigned o = 0; o < NO; ++o) vector = vector && aligned16(out[o]);
    const u64 chunks = vector ? n / 8 : 0, stride = thread_count();
    for (u64 c = thread_index(); c < chunks; c += 2 * stride) {
        const u64 c1 = c + stride;
        Raw8<T> r0[NI], r1[NI] = {};
#pragma unroll
        for (unsigned i = 0; i < NI; ++i) r0[i] = load8(in[i] + 8 * c);
        if (c1 < chunks) {
#pragma unroll
            for (unsigned i = 0; i < NI; ++i) r1[i] = load8(in[i] + 8 * c1);
        }
        map_chunk(r0, out, 8 * c, f);
        if (c1 < chunks) map_chunk(r1, out, 8 * c1, f);
    }
    for (u64 j = 8 * chunks + thread_index(); j < n; j += stride) {
        float x[NI], y[NO];
#pragma unroll
        for (unsigned i = 0; i < NI; ++i) x[i] = to_f32(in[i][j]);
        f(x, y);
#pragma unroll
        for (unsigned o = 0; o < NO; ++o) out[o][j] = from_f32<T>(y[o]);
    }
}

