// A standalone experiment, not part of the build (kernels/NOTES.md "NF4 GEMV", "What bounds the rows kernel"): the
// rows kernel's loop (m = 1, bf16 x staged in the kernel's layout, the 16-copy code-pair table, plain f32 absmax per
// 64, f32 y) with knobs, checked against a naive kernel and timed on three decoding shapes over rotated copies (no L2
// hits): R rows per warp, U 16-byte loads per lane and row per step, AHEAD steps of loads in flight in registers, PF
// the warp's rows prefetched into L2 first (1: one bulk prefetch per row, sm_90; 2: one prefetch per line), XF x
// staged as f32 (no unpack in the loop, twice the shared memory), TB the code-pair table with 256-byte entries (32
// copies, 64 KB at the start of dynamic shared memory) whose address one PRMT forms (no IMAD per packed byte), H16
// the code pairs as f16x2 (one LDS.32 a lookup; each code rounded to f16), MINB the blocks per multiprocessor that
// __launch_bounds__ asks registers for. The max relative error is against |y| + 1e-3: the f16 codes' 1.1 is their
// ≤ 2^-12 rounding on outputs near zero, not a fault.
// On a GPU machine: nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/rows-loop rows-loop.cu && /tmp/rows-loop
#include <cstdio>
#include <cstdint>
#include <vector>
#include <cmath>
#include <cuda_runtime.h>
#include "device_copy.cuh"
#include "random_weights.cuh"
#include <cuda_bf16.h>
#include <cuda_fp16.h>

__constant__ float NF4[16] = {-1.0f, -0.6961928f, -0.5250731f, -0.3949175f, -0.2844414f, -0.1847734f, -0.0910500f, 0.0f,
                              0.0795803f, 0.1609302f, 0.2461123f, 0.3379152f, 0.4407098f, 0.5626170f, 0.7229568f, 1.0f};

__device__ __forceinline__ uint4 ld16(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ unsigned word_of(const uint4& w, unsigned j) {
    return j == 0 ? w.x : j == 1 ? w.y : j == 2 ? w.z : w.w;
}
__device__ __forceinline__ float2 code_pair(unsigned pairs, unsigned word, unsigned b) {
    float2 c;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(c.x), "=f"(c.y)
                 : "r"(pairs + __byte_perm(word, 0, 0x4440 + b) * 128));
    return c;
}
constexpr unsigned TABLE256_BYTES = 256 * 256;
// The codes of byte b of `word` from the 256-byte-entry table at shared address `base`: one PRMT makes
// byte·256 + lane8 (lane8 < 256), so the only add is the table's base, which ptxas may fold into the LDS.
__device__ __forceinline__ float2 code_pair256(unsigned base, unsigned lane8, unsigned word, unsigned b) {
    float2 c;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(c.x), "=f"(c.y)
                 : "r"(base + __byte_perm(word, lane8, 0x7604 + (b << 4))));
    return c;
}
// H16: the pair of codes as f16x2 (each code rounded to f16, ≤ 2^-12 relative), 4 bytes an entry: 32 copies fill
// 128 bytes, one LDS.32 a warp (a single L1 wavefront where the f32 pair's LDS.64 takes two), at 256-byte strides so
// that one PRMT forms the address; two conversions to f32 after.
__device__ __forceinline__ float2 code_pair_h16(unsigned base, unsigned lane4, unsigned word, unsigned b) {
    unsigned h;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(h) : "r"(base + __byte_perm(word, lane4, 0x7604 + (b << 4))));
    return __half22float2(*reinterpret_cast<__half2*>(&h));
}
__device__ __forceinline__ void unpack8(uint4 v, float (&f)[8]) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// Columns of a step: 32 lanes x U loads x 32 columns. Lane l, load u: columns step*STEP + u*1024 + 32 l .. + 31.
template <int R, int U, int AHEAD, int PF, int MINB, int XF = 0, int TB = 0, int H16 = 0>
__global__ void __launch_bounds__(256, MINB) gemv(const unsigned char* __restrict__ packed, const float* __restrict__ absmax,
                                               const __nv_bfloat16* __restrict__ x, float* __restrict__ y,
                                               unsigned out_f, unsigned in_f) {
    __shared__ float2 pairs[TB || H16 ? 2 : 256 * 16];
    // x by 8-value units, permuted (chunk of 1024, j, lane): a warp's read of one unit is 512 contiguous bytes (bf16)
    // or two of them (f32, halves h: (chunk, j, h, lane)).
    extern __shared__ uint4 dyn[];
    uint4* xs = TB || H16 ? dyn + TABLE256_BYTES / 16 : dyn;
    float4* xsf = reinterpret_cast<float4*>(xs);
    constexpr unsigned STEP = 1024 * U;
    const unsigned lane = threadIdx.x % 32, steps = in_f / STEP;
    const unsigned o0 = (blockIdx.x * 8 + threadIdx.x / 32) * R;
    if (PF == 2 && o0 < out_f) {
        // One prefetch.global.L2 per 128-byte line, spread over the lanes.
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const unsigned char* row = packed + (size_t)min(o0 + r, out_f - 1) * in_f / 2;
            for (unsigned line = lane; line < in_f / 256; line += 32)
                asm volatile("prefetch.global.L2 [%0];" ::"l"(row + line * 128) : "memory");
        }
    }
    if (PF == 1 && o0 < out_f && lane < R) {
        const unsigned o = min(o0 + lane, out_f - 1);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(packed + (size_t)o * in_f / 2), "r"(in_f / 2)
                     : "memory");
    }
    if (H16) {
        for (unsigned i = threadIdx.x; i < 256 * 32; i += blockDim.x) {
            const unsigned v = i / 32;
            const __half2 h = __floats2half2_rn(NF4[v >> 4], NF4[v & 15]);
            *reinterpret_cast<__half2*>(reinterpret_cast<unsigned char*>(dyn) + v * 256 + 4 * (i % 32)) = h;
        }
    } else if (TB) {
        // Entry v: 32 copies of (code[v >> 4], code[v & 15]), one per lane, 256 bytes.
        for (unsigned i = threadIdx.x; i < TABLE256_BYTES / 16; i += blockDim.x) {
            const unsigned v = i / 16;
            reinterpret_cast<float4*>(dyn)[i] = make_float4(NF4[v >> 4], NF4[v & 15], NF4[v >> 4], NF4[v & 15]);
        }
    }
    if (!TB && !H16) {
        for (unsigned i = threadIdx.x; i < 256 * 16 / 2; i += blockDim.x) {
            const unsigned v = i / 8;
            reinterpret_cast<float4*>(pairs)[i] = make_float4(NF4[v >> 4], NF4[v & 15], NF4[v >> 4], NF4[v & 15]);
        }
    }
    uint4 w[AHEAD][R][U];
    float am[AHEAD][R][U];
    auto load = [&](int slot, unsigned s) {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const size_t e = (size_t)min(o0 + r, out_f - 1) * in_f + s * STEP + u * 1024 + 32 * lane;
                w[slot][r][u] = ld16(packed + e / 2);
                am[slot][r][u] = __ldg(absmax + e / 64);
            }
    };
#pragma unroll
    for (int a = 0; a < AHEAD; ++a)
        if (a < (int)steps) load(a, a);
    // x staged: unit (c1024, j, lane) = 8 values at column c1024*1024 + 32 lane + 8 j.
    for (unsigned i = threadIdx.x; i < in_f / 8; i += blockDim.x) {
        const unsigned col = i * 8;
        const unsigned unit = (col / 1024) * 4 + col % 32 / 8, l = col % 1024 / 32;
        const uint4 v = *reinterpret_cast<const uint4*>(x + col);
        if (XF) {
            float f[8];
            unpack8(v, f);
            xsf[(unit * 2) * 32 + l] = make_float4(f[0], f[1], f[2], f[3]);
            xsf[(unit * 2 + 1) * 32 + l] = make_float4(f[4], f[5], f[6], f[7]);
        } else {
            xs[unit * 32 + l] = v;
        }
    }
    __syncthreads();
    if (o0 >= out_f) return;
    const unsigned lp = static_cast<unsigned>(__cvta_generic_to_shared(pairs)) + 8 * (lane % 16);
    const unsigned tbase = static_cast<unsigned>(__cvta_generic_to_shared(dyn)), lane8 = (H16 ? 4 : 8) * lane;
    float acc[R] = {};
    for (unsigned s = 0; s < steps; s += AHEAD) {
#pragma unroll
        for (int a = 0; a < AHEAD; ++a) {
            if (s + a >= steps) break;
            uint4 cw[R][U];
            float ca[R][U];
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int u = 0; u < U; ++u) cw[r][u] = w[a][r][u], ca[r][u] = am[a][r][u];
            if (s + a + AHEAD < steps) load(a, s + a + AHEAD);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                float sum[R][2] = {};
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    float xv[8];
                    const unsigned unit = ((s + a) * U + u) * 4 + j;
                    if (XF) {
                        const float4 lo = xsf[(unit * 2) * 32 + lane], hi = xsf[(unit * 2 + 1) * 32 + lane];
                        xv[0] = lo.x, xv[1] = lo.y, xv[2] = lo.z, xv[3] = lo.w;
                        xv[4] = hi.x, xv[5] = hi.y, xv[6] = hi.z, xv[7] = hi.w;
                    } else {
                        unpack8(xs[unit * 32 + lane], xv);
                    }
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        const unsigned word = word_of(cw[r][u], j);
#pragma unroll
                        for (int b = 0; b < 4; ++b) {
                            const float2 c = H16  ? code_pair_h16(tbase, lane8, word, b)
                                             : TB ? code_pair256(tbase, lane8, word, b) : code_pair(lp, word, b);
                            sum[r][0] = fmaf(c.x, xv[2 * b], sum[r][0]);
                            sum[r][1] = fmaf(c.y, xv[2 * b + 1], sum[r][1]);
                        }
                    }
                }
#pragma unroll
                for (int r = 0; r < R; ++r) acc[r] = fmaf(ca[r][u], sum[r][0] + sum[r][1], acc[r]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        float v = acc[r];
        for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
        if (lane == 0 && o0 + r < out_f) y[o0 + r] = v;
    }
}

__global__ void naive(const unsigned char* packed, const float* absmax, const __nv_bfloat16* x, float* y, unsigned out_f,
                      unsigned in_f) {
    const unsigned o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= out_f) return;
    double s = 0;
    for (unsigned i = 0; i < in_f; ++i) {
        const size_t e = (size_t)o * in_f + i;
        const unsigned byte = packed[e / 2];
        const unsigned q = e % 2 == 0 ? byte >> 4 : byte & 15;
        s += (double)NF4[q] * absmax[e / 64] * (double)__bfloat162float(x[i]);
    }
    y[o] = (float)s;
}

int main() {
    cudaEvent_t ea, eb;
    cudaEventCreate(&ea);
    cudaEventCreate(&eb);
    printf("device copy 1 GiB: %.1f GB/s (read + written)\n", device_copy_gbps());
    for (const GemvShape& sh : DECODE_SHAPES) {
        const RandomWeights w = random_weights(sh.out, sh.in);
        const size_t elems = w.elems, pbytes = w.pbytes, one = w.one;
        const int copies = w.copies;
        unsigned char* packed = w.packed;
        float* absmax = w.absmax;
        __nv_bfloat16* x = w.x;
        float *y, *yref;
        cudaMalloc(&y, sh.out * 4);
        cudaMalloc(&yref, sh.out * 4);
        naive<<<(sh.out + 127) / 128, 128>>>(packed, absmax, x, yref, sh.out, sh.in);
        std::vector<float> hr(sh.out), hy(sh.out);
        cudaMemcpy(hr.data(), yref, sh.out * 4, cudaMemcpyDeviceToHost);
        auto run = [&](const char* name, auto kernel, unsigned rows_per_block, unsigned step, unsigned x_bytes = 2,
                       size_t table = 0) {
            const unsigned blocks = (sh.out + rows_per_block - 1) / rows_per_block;
            const size_t smem = (size_t)sh.in * x_bytes + table;
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
            if (sh.in % step) { printf("  %-34s skipped (in %% step)\n", name); return; }
            cudaMemset(y, 0, sh.out * 4);
            kernel<<<blocks, 256, smem>>>(packed, absmax, x, y, sh.out, sh.in);
            cudaMemcpy(hy.data(), y, sh.out * 4, cudaMemcpyDeviceToHost);
            double err = 0;
            for (unsigned o = 0; o < sh.out; ++o) err = std::max(err, (double)std::fabs(hy[o] - hr[o]) / (1e-3 + std::fabs(hr[o])));
            for (int c = 0; c < copies; ++c)
                kernel<<<blocks, 256, smem>>>(packed + c * pbytes, absmax + c * (elems / 64), x, y, sh.out, sh.in);
            const int reps = 100;
            cudaEventRecord(ea);
            for (int i = 0; i < reps; ++i) {
                const int c = i % copies;
                kernel<<<blocks, 256, smem>>>(packed + c * pbytes, absmax + c * (elems / 64), x, y, sh.out, sh.in);
            }
            cudaEventRecord(eb);
            cudaEventSynchronize(eb);
            float ms;
            cudaEventElapsedTime(&ms, ea, eb);
            const double us = 1e3 * ms / reps;
            printf("  %-34s %7.2f us %7.1f GB/s  max rel err %.1e  %s\n", name, us, one / us / 1e3, err,
                   cudaGetErrorString(cudaGetLastError()));
        };
        printf("%s (%d copies of %.1f MB)\n", sh.name, copies, one / 1e6);
        run("R2 U1 A1 (main's rows)", gemv<2, 1, 1, 0, 3>, 16, 1024);
        run("R2 U1 A1 4/SM (64 registers)", gemv<2, 1, 1, 0, 4>, 16, 1024);
        run("R2 U1 A1 5/SM (48 registers)", gemv<2, 1, 1, 0, 5>, 16, 1024);
        run("R2 U1 A2 4/SM", gemv<2, 1, 2, 0, 4>, 16, 1024);
        run("R4 U1 A1 3/SM", gemv<4, 1, 1, 0, 3>, 32, 1024);
        run("R2 U1 A1 f16 codes", gemv<2, 1, 1, 0, 3, 0, 0, 1>, 16, 1024, 2, TABLE256_BYTES);
        run("R2 U1 A2 f16 codes", gemv<2, 1, 2, 0, 3, 0, 0, 1>, 16, 1024, 2, TABLE256_BYTES);
        run("R4 U1 A1 f16 codes", gemv<4, 1, 1, 0, 2, 0, 0, 1>, 16 * 2, 1024, 2, TABLE256_BYTES);
        run("R2 U1 A1 f16 codes x f32", gemv<2, 1, 1, 0, 2, 1, 0, 1>, 16, 1024, 4, TABLE256_BYTES);
        run("R2 U1 A1 + L2 bulk prefetch", gemv<2, 1, 1, 1, 3>, 16, 1024);
        run("R2 U1 A1 + L2 line prefetch", gemv<2, 1, 1, 2, 3>, 16, 1024);
        run("R2 U1 A2", gemv<2, 1, 2, 0, 3>, 16, 1024);
        run("R2 U1 A2 + L2 bulk prefetch", gemv<2, 1, 2, 1, 3>, 16, 1024);
        run("R2 U2 A1", gemv<2, 2, 1, 0, 2>, 16, 2048);
        run("R2 U2 A1 + L2 bulk prefetch", gemv<2, 2, 1, 1, 2>, 16, 2048);
        run("R1 U2 A1", gemv<1, 2, 1, 0, 3>, 8, 2048);
        run("R1 U2 A1 + L2 bulk prefetch", gemv<1, 2, 1, 1, 3>, 8, 2048);
        run("R4 U1 A1 + L2 bulk prefetch", gemv<4, 1, 1, 1, 2>, 32, 1024);
        run("R4 U1 A1", gemv<4, 1, 1, 0, 2>, 32, 1024);
        run("R2 U1 A1 x f32", gemv<2, 1, 1, 0, 3, 1>, 16, 1024, 4);
        run("R2 U1 A2 x f32", gemv<2, 1, 2, 0, 3, 1>, 16, 1024, 4);
        run("R4 U1 A1 x f32", gemv<4, 1, 1, 0, 2, 1>, 32, 1024, 4);
        run("R4 U1 A2 x f32", gemv<4, 1, 2, 0, 2, 1>, 32, 1024, 4);
        run("R2 U2 A1 x f32", gemv<2, 2, 1, 0, 2, 1>, 16, 2048, 4);
        run("R2 U1 A1 table256", gemv<2, 1, 1, 0, 3, 0, 1>, 16, 1024, 2, TABLE256_BYTES);
        run("R2 U1 A1 table256 x f32", gemv<2, 1, 1, 0, 2, 1, 1>, 16, 1024, 4, TABLE256_BYTES);
        run("R4 U1 A1 table256 x f32", gemv<4, 1, 1, 0, 2, 1, 1>, 32, 1024, 4, TABLE256_BYTES);
        cudaFree(y);
        cudaFree(yref);
        free_weights(w);
    }
    printf("status: %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
}
