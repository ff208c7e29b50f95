// A standalone experiment, not part of the build (kernels/NOTES.md "NF4 GEMV"): the NF4 GEMV at batch 1 with the
// products on tensor cores. The rows kernel spends ~240 instructions per KB of weights, two FFMAs per packed byte of
// them; here one mma.sync m16n8k16 takes 16 rows × 16 columns, so a packed byte costs one PRMT (its entry's address)
// and one LDS (two codes as a bf16x2, the A fragment's layout), and the FMAs vanish into the tensor pipe.
// - A fragment: thread (g = lane/4, t = lane%4) holds rows g and g+8, k-slots 2t, 2t+1, 2t+8, 2t+9. The 4 threads of a
//   row cover one 64-column scale block in 4 mmas: thread t reads the block's bytes 8t..8t+7 (ld.64), mma i takes
//   bytes 2i (slots 2t, 2t+1) and 2i+1 (slots 2t+8, 2t+9); B (x) is permuted the same way: thread t's 16 columns.
// - The scale factors out of a block: 4 mmas into a zeroed C, then acc += absmax·C per row.
// - HL = 0: codes as bf16 (one rounding of each code, like bitsandbytes' kernel rounding code·absmax to bf16);
//   HL = 1: code = hi + lo, both bf16 (16 significant bits), twice the mmas, an 8-byte entry (hi pair, lo pair).
// - The table: 256 entries of 256 bytes (one copy per lane: conflict-free), its address one PRMT: byte·256 + lane·4|8.
// - Blocks of KS warps own 16 rows; warp w takes the column blocks w·per..; partial sums met in shared memory in
//   a fixed order. Grid: PERSIST ? one wave looping over row tiles : one block per tile.
// On a GPU machine: nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/mma-gemv mma-gemv.cu && /tmp/mma-gemv
#include <cstdio>
#include <cstdint>
#include <vector>
#include <cmath>
#include <algorithm>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include "device_copy.cuh"
#include "random_weights.cuh"
#include "bf16_code_pairs.cuh"

constexpr unsigned TABLE_BYTES = 256 * 256;

__device__ __forceinline__ uint2 ld8(const void* p) {
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

template <int HL> __device__ __forceinline__ uint2 lut(unsigned base, unsigned lanesel, unsigned word, unsigned b) {
    const unsigned addr = base + __byte_perm(word, lanesel, 0x7604 + (b << 4));
    uint2 r;
    if (HL) {
        asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "r"(addr));
    } else {
        asm volatile("ld.shared.u32 %0, [%1];" : "=r"(r.x) : "r"(addr));
        r.y = 0;
    }
    return r;
}

template <int HL, int KS, int U, int PERSIST>
__global__ void __launch_bounds__(32 * KS) mgemv(const unsigned char* __restrict__ packed,
                                                 const float* __restrict__ absmax, const __nv_bfloat16* __restrict__ x,
                                                 float* __restrict__ y, unsigned out_f, unsigned in_f) {
    extern __shared__ __align__(256) unsigned char smem[];
    float* partial = reinterpret_cast<float*>(smem + TABLE_BYTES);  // [KS][16]
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    stage_code_pairs<HL, 256, 32>(smem);
    __syncthreads();
    const unsigned base = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    const unsigned lanesel = HL ? 8 * lane : 4 * lane;
    const unsigned per = in_f / 64 / KS, b0 = warp * per;  // column blocks of this warp
    const unsigned tiles = out_f / 16;
    for (unsigned tile = blockIdx.x; tile < tiles; tile += PERSIST ? gridDim.x : tiles) {
        const unsigned ra = tile * 16 + g, rb = ra + 8;
        const unsigned char* pa = packed + (size_t)ra * in_f / 2 + 8 * t;
        const unsigned char* pb = packed + (size_t)rb * in_f / 2 + 8 * t;
        const float* sa_p = absmax + (size_t)ra * in_f / 64;
        const float* sb_p = absmax + (size_t)rb * in_f / 64;
        uint2 wa[U], wb[U];
        float sa[U], sb[U];
        auto load = [&](unsigned s) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const unsigned blk = b0 + s + u;
                wa[u] = ld8(pa + 32 * blk);
                wb[u] = ld8(pb + 32 * blk);
                sa[u] = __ldg(sa_p + blk);
                sb[u] = __ldg(sb_p + blk);
            }
        };
        load(0);
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (unsigned s = 0; s < per; s += U) {
            uint2 ca[U], cb[U];
            float csa[U], csb[U];
#pragma unroll
            for (int u = 0; u < U; ++u) ca[u] = wa[u], cb[u] = wb[u], csa[u] = sa[u], csb[u] = sb[u];
            if (s + U < per) load(s + U);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const unsigned blk = b0 + s + u;
                const uint4* xp = reinterpret_cast<const uint4*>(x + blk * 64 + 16 * t);
                const uint4 x0 = xp[0], x1 = xp[1];
                const unsigned xw[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
                float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const unsigned wa_ = i < 2 ? ca[u].x : ca[u].y, wb_ = i < 2 ? cb[u].x : cb[u].y;
                    const unsigned bsel = 2 * (i % 2);
                    const uint2 a0 = lut<HL>(base, lanesel, wa_, bsel), a2 = lut<HL>(base, lanesel, wa_, bsel + 1);
                    const uint2 a1 = lut<HL>(base, lanesel, wb_, bsel), a3 = lut<HL>(base, lanesel, wb_, bsel + 1);
                    mma(c, a0.x, a1.x, a2.x, a3.x, xw[2 * i], xw[2 * i + 1]);
                    if (HL) mma(c, a0.y, a1.y, a2.y, a3.y, xw[2 * i], xw[2 * i + 1]);
                }
                acc[0] = fmaf(csa[u], c[0], acc[0]);
                acc[2] = fmaf(csb[u], c[2], acc[2]);
            }
        }
        // Column n = 0 (the one row of x) lives in thread t = 0's c[0] (row g) and c[2] (row g + 8).
        if (t == 0) partial[warp * 16 + g] = acc[0], partial[warp * 16 + g + 8] = acc[2];
        __syncthreads();
        if (threadIdx.x < 16) {
            float v = partial[threadIdx.x];
            for (unsigned w = 1; w < KS; ++w) v += partial[w * 16 + threadIdx.x];
            y[tile * 16 + threadIdx.x] = v;
        }
        __syncthreads();
    }
}

// The hi/lo codes in one mma: A = {entry(byte X), entry(byte Y)} as two 8-byte LDS straight into (a0, a1) and (a2, a3),
// so rows g + 8 of the mma are the lo halves of rows g: C[g] + C[g + 8] is row g's sum. 8 rows of W per mma and no
// register moves (two mmas on separate hi and lo fragments cost a MOV per code pair: the LDS pairs land adjacent).
// A warp takes TR tiles of 8 rows (x loaded once for all), blocks of KS warps split the columns.
template <int KS, int U, int TR>
__global__ void __launch_bounds__(32 * KS) mgemv_pair(const unsigned char* __restrict__ packed,
                                                      const float* __restrict__ absmax,
                                                      const __nv_bfloat16* __restrict__ x, float* __restrict__ y,
                                                      unsigned out_f, unsigned in_f) {
    extern __shared__ __align__(256) unsigned char smem[];
    float* partial = reinterpret_cast<float*>(smem + TABLE_BYTES);  // [KS][8·TR]
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    stage_code_pairs<1, 256, 32>(smem);
    __syncthreads();
    const unsigned base = static_cast<unsigned>(__cvta_generic_to_shared(smem)), lanesel = 8 * lane;
    const unsigned per = in_f / 64 / KS, b0 = warp * per;
    const unsigned tiles = out_f / (8 * TR);
    const unsigned row_bytes = in_f / 2, row_scales = in_f / 64;
    for (unsigned tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const unsigned r0 = tile * 8 * TR + g;
        // Pointers advanced by a step after each load, so that every load is [pointer + constant].
        const unsigned char* pw[TR];
        const float* ps[TR];
#pragma unroll
        for (int r = 0; r < TR; ++r) {
            pw[r] = packed + (size_t)(r0 + 8 * r) * row_bytes + 32 * b0 + 8 * t;
            ps[r] = absmax + (size_t)(r0 + 8 * r) * row_scales + b0;
        }
        const uint4* px = reinterpret_cast<const uint4*>(x + 64 * b0 + 16 * t);
        // Two buffers of U blocks, ping-ponged: one in flight while the other is summed, with no copies between.
        uint2 wa[U][TR], wb[U][TR];
        float sa[U][TR], sb[U][TR];
        auto load = [&](uint2 (&w)[U][TR], float (&sc)[U][TR]) {
#pragma unroll
            for (int r = 0; r < TR; ++r) {
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    w[u][r] = ld8(pw[r] + 32 * u);
                    sc[u][r] = __ldg(ps[r] + u);
                }
                pw[r] += 32 * U;
                ps[r] += U;
            }
        };
        float acc[TR] = {};
        auto sum = [&](const uint2 (&w)[U][TR], const float (&sc)[U][TR]) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const uint4 x0 = px[8 * u], x1 = px[8 * u + 1];
                const unsigned xw[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
                for (int r = 0; r < TR; ++r) {
                    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const unsigned word = i < 2 ? w[u][r].x : w[u][r].y, bsel = 2 * (i % 2);
                        const uint2 a01 = lut<1>(base, lanesel, word, bsel), a23 = lut<1>(base, lanesel, word, bsel + 1);
                        mma(c, a01.x, a01.y, a23.x, a23.y, xw[2 * i], xw[2 * i + 1]);
                    }
                    acc[r] = fmaf(sc[u][r], c[0] + c[2], acc[r]);
                }
            }
            px += 8 * U;
        };
        load(wa, sa);
        for (unsigned s = 0; s < per; s += 2 * U) {
            if (s + U < per) load(wb, sb);
            sum(wa, sa);
            if (s + U >= per) break;
            if (s + 2 * U < per) load(wa, sa);
            sum(wb, sb);
        }
#pragma unroll
        for (int r = 0; r < TR; ++r)
            if (t == 0) partial[warp * 8 * TR + 8 * r + g] = acc[r];
        __syncthreads();
        if (threadIdx.x < 8 * TR) {
            float v = partial[threadIdx.x];
            for (unsigned k = 1; k < KS; ++k) v += partial[k * 8 * TR + threadIdx.x];
            y[tile * 8 * TR + threadIdx.x] = v;
        }
        __syncthreads();
    }
}

__global__ void naive(const unsigned char* packed, const float* absmax, const __nv_bfloat16* x, float* y, unsigned out_f,
                      unsigned in_f) {
    const unsigned o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= out_f) return;
    double s = 0, sa = 0;
    for (unsigned i = 0; i < in_f; ++i) {
        const size_t e = (size_t)o * in_f + i;
        const unsigned byte = packed[e / 2];
        const unsigned q = e % 2 == 0 ? byte >> 4 : byte & 15;
        const double p = (double)NF4[q] * absmax[e / 64] * (double)__bfloat162float(x[i]);
        s += p;
        sa += fabs(p);
    }
    y[o] = (float)s;
    y[out_f + o] = (float)sa;  // the error's scale
}

int main() {
    const ExperimentStart start = experiment_start();
    const int sms = start.sms;
    cudaEvent_t ea = start.a, eb = start.b;
    for (const GemvShape& sh : DECODE_SHAPES) {
        const RandomWeights w = random_weights(sh.out, sh.in);
        const size_t elems = w.elems, pbytes = w.pbytes, one = w.one;
        const int copies = w.copies;
        unsigned char* packed = w.packed;
        float* absmax = w.absmax;
        __nv_bfloat16* x = w.x;
        float *y, *yref;
        cudaMalloc(&y, sh.out * 4);
        cudaMalloc(&yref, sh.out * 8);
        naive<<<(sh.out + 127) / 128, 128>>>(packed, absmax, x, yref, sh.out, sh.in);
        std::vector<float> hr(2 * sh.out), hy(sh.out);
        cudaMemcpy(hr.data(), yref, sh.out * 8, cudaMemcpyDeviceToHost);
        auto run = [&](const char* name, auto kernel, unsigned ks, bool persist, unsigned per_block) {
            const size_t smem = TABLE_BYTES + ks * 32 * 4;  // partial sums: up to 32 rows per block
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
            if ((sh.in / 64) % (ks * per_block)) { printf("  %-34s skipped (in / 64 %% (KS·U))\n", name); return; }
            int occ = 0;
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, 32 * ks, smem);
            const unsigned tiles = sh.out / 16, blocks = persist ? std::min<unsigned>(tiles, sms * occ) : tiles;
            cudaMemset(y, 0, sh.out * 4);
            kernel<<<blocks, 32 * ks, smem>>>(packed, absmax, x, y, sh.out, sh.in);
            cudaMemcpy(hy.data(), y, sh.out * 4, cudaMemcpyDeviceToHost);
            double err = 0;  // relative to Σ|w·x|, the dot product's own scale
            for (unsigned o = 0; o < sh.out; ++o) err = std::max(err, (double)std::fabs(hy[o] - hr[o]) / hr[sh.out + o]);
            for (int c = 0; c < copies; ++c)
                kernel<<<blocks, 32 * ks, smem>>>(packed + c * pbytes, absmax + c * (elems / 64), x, y, sh.out, sh.in);
            const int reps = 100;
            cudaEventRecord(ea);
            for (int i = 0; i < reps; ++i) {
                const int c = i % copies;
                kernel<<<blocks, 32 * ks, smem>>>(packed + c * pbytes, absmax + c * (elems / 64), x, y, sh.out, sh.in);
            }
            cudaEventRecord(eb);
            cudaEventSynchronize(eb);
            float ms;
            cudaEventElapsedTime(&ms, ea, eb);
            const double us = 1e3 * ms / reps;
            printf("  %-34s %7.2f us %7.1f GB/s  occ %d  max err/Σ|wx| %.1e  %s\n", name, us, one / us / 1e3, occ, err,
                   cudaGetErrorString(cudaGetLastError()));
        };
        printf("%s (%d copies of %.1f MB)\n", sh.name, copies, one / 1e6);
        run("pair  KS8 U2 TR2 persistent", mgemv_pair<8, 2, 2>, 8, true, 2);
        run("pair  KS8 U1 TR2 persistent", mgemv_pair<8, 1, 2>, 8, true, 1);
        run("pair  KS8 U2 TR4 persistent", mgemv_pair<8, 2, 4>, 8, true, 2);
        run("pair  KS8 U4 TR1 persistent", mgemv_pair<8, 4, 1>, 8, true, 4);
        run("pair  KS8 U2 TR1 persistent", mgemv_pair<8, 2, 1>, 8, true, 2);
        run("pair  KS4 U4 TR2 persistent", mgemv_pair<4, 4, 2>, 4, true, 4);
        run("pair  KS8 U4 TR2 persistent", mgemv_pair<8, 4, 2>, 8, true, 4);
        run("pair  KS16 U2 TR2 persistent", mgemv_pair<16, 2, 2>, 16, true, 2);
        run("hi    KS8 U2 persistent", mgemv<0, 8, 2, 1>, 8, true, 2);
        run("hi/lo KS8 U2 persistent", mgemv<1, 8, 2, 1>, 8, true, 2);
        cudaFree(y);
        cudaFree(yref);
        free_weights(w);
    }
    printf("status: %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
}
