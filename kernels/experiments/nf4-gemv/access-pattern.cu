// A standalone experiment, not part of the build (kernels/NOTES.md "NF4 GEMV", "What bounds the rows kernel"): the
// memory side of the rows kernel's access pattern. The bytes of an 8B gate/up pair (28672 rows of 2048 packed bytes)
// read with no arithmetic in the kernel's order (a warp owns 2 rows and reads 512 bytes of each per step, AHEAD steps
// in flight), with a stand-in for its arithmetic (WORK × 4 independent FMAs per step), at 3 blocks per multiprocessor
// (the kernel's registers) and 8, and as one contiguous stream; 8 copies rotated so no call finds its bytes in L2.
// On a GPU machine: nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/access-pattern access-pattern.cu && /tmp/access-pattern
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>
#include "device_copy.cuh"

__device__ __forceinline__ uint4 ld16(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ unsigned fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

// Grid-stride contiguous stream: each thread U loads of 16 bytes in flight.
template <int U>
__global__ void __launch_bounds__(256) contiguous(const unsigned char* p, size_t bytes, unsigned* sink) {
    size_t stride = (size_t)gridDim.x * blockDim.x * 16 * U;
    unsigned acc = 0;
    for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 16; i < bytes; i += stride) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) v[u] = ld16(p + i + (size_t)u * gridDim.x * blockDim.x * 16);
#pragma unroll
        for (int u = 0; u < U; ++u) acc ^= fold(v[u]);
    }
    if (acc == 0x12345678u) *sink = acc;
}

// The rows kernel's order: warp owns R rows of `row_bytes`; step s reads bytes [512 s, 512 s + 512) of each, lane l
// 16 bytes at 512 s + 16 l; AHEAD steps in flight. WORK: dependent FMAs per step per lane (the arithmetic stand-in).
template <int R, int AHEAD, int MINB>
__global__ void __launch_bounds__(256, MINB) rows(const unsigned char* p, unsigned nrows, unsigned row_bytes, int work,
                                               unsigned* sink) {
    extern __shared__ unsigned char pad[];
    const unsigned lane = threadIdx.x % 32;
    const unsigned r0 = (blockIdx.x * 8 + threadIdx.x / 32) * R;
    if (r0 >= nrows) return;
    const unsigned steps = row_bytes / 512;
    unsigned acc = 0;
    float f = lane, g = lane + 1, h = lane + 2, k = lane + 3;
    uint4 buf[AHEAD][R];
#pragma unroll
    for (int a = 0; a < AHEAD; ++a)
#pragma unroll
        for (int r = 0; r < R; ++r)
            buf[a][r] = a < (int)steps ? ld16(p + (size_t)(r0 + r) * row_bytes + a * 512 + lane * 16) : make_uint4(0, 0, 0, 0);
    for (unsigned s = 0; s < steps; s += AHEAD) {
#pragma unroll
        for (int a = 0; a < AHEAD; ++a) {
            uint4 cur[R];
#pragma unroll
            for (int r = 0; r < R; ++r) cur[r] = buf[a][r];
            const unsigned nxt = s + a + AHEAD;
#pragma unroll
            for (int r = 0; r < R; ++r)
                if (nxt < steps) buf[a][r] = ld16(p + (size_t)(r0 + r) * row_bytes + nxt * 512 + lane * 16);
#pragma unroll
            for (int r = 0; r < R; ++r) acc ^= fold(cur[r]);
            const float c = __uint_as_float(acc & 0x3f800000u);
            for (int i = 0; i < work; ++i) {
                f = fmaf(f, 1.0001f, c);
                g = fmaf(g, 1.0001f, c);
                h = fmaf(h, 1.0001f, c);
                k = fmaf(k, 1.0001f, c);
            }
        }
    }
    if (acc == 0x12345678u || f + g + h + k == 1.2345f) *sink = acc;
    (void)pad;
}

int main() {
    const unsigned nrows = 28672, row_bytes = 2048;
    const size_t bytes = (size_t)nrows * row_bytes;
    const int copies = 8;
    unsigned char* buf;
    unsigned* sink;
    cudaMalloc(&buf, bytes * copies);
    cudaMalloc(&sink, 4);
    cudaMemset(buf, 1, bytes * copies);
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    int sms;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    auto timed = [&](const char* name, auto launch) {
        for (int i = 0; i < copies; ++i) launch(buf + (size_t)i * bytes);
        const int reps = 64;
        cudaEventRecord(a);
        for (int i = 0; i < reps; ++i) launch(buf + (size_t)(i % copies) * bytes);
        cudaEventRecord(b);
        cudaEventSynchronize(b);
        float ms;
        cudaEventElapsedTime(&ms, a, b);
        const double us = 1e3 * ms / reps;
        printf("%-44s %8.2f us %8.1f GB/s\n", name, us, bytes / us / 1e3);
    };
    printf("%-44s %8.1f GB/s (read + written)\n", "device copy 1 GiB", device_copy_gbps());
    for (int blocks : {sms * 2, sms * 4, sms * 8}) {
        char name[64];
        snprintf(name, 64, "contiguous U=4 %d blocks", blocks);
        timed(name, [&](const unsigned char* p) { contiguous<4><<<blocks, 256>>>(p, bytes, sink); });
    }
    const unsigned grid = nrows / 16;
    // 72 KB of shared memory a block holds 3 blocks on a multiprocessor, as the rows kernel's registers do.
    const int smem3 = 72 * 1024;
    cudaFuncSetAttribute(rows<2, 1, 3>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem3);
    cudaFuncSetAttribute(rows<2, 2, 3>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem3);
    cudaFuncSetAttribute(rows<2, 4, 3>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem3);
    for (int work : {0, 32, 64}) {
        char name[64];
        snprintf(name, 64, "rows R=2 ahead 1, 3/SM, work %d", work);
        timed(name, [&](const unsigned char* p) { rows<2, 1, 3><<<grid, 256, smem3>>>(p, nrows, row_bytes, work, sink); });
        snprintf(name, 64, "rows R=2 ahead 2, 3/SM, work %d", work);
        timed(name, [&](const unsigned char* p) { rows<2, 2, 3><<<grid, 256, smem3>>>(p, nrows, row_bytes, work, sink); });
        snprintf(name, 64, "rows R=2 ahead 4, 3/SM, work %d", work);
        timed(name, [&](const unsigned char* p) { rows<2, 4, 3><<<grid, 256, smem3>>>(p, nrows, row_bytes, work, sink); });
        snprintf(name, 64, "rows R=2 ahead 1, 8/SM, work %d", work);
        timed(name, [&](const unsigned char* p) { rows<2, 1, 8><<<grid, 256, 0>>>(p, nrows, row_bytes, work, sink); });
        snprintf(name, 64, "rows R=2 ahead 4, 8/SM, work %d", work);
        timed(name, [&](const unsigned char* p) { rows<2, 4, 8><<<grid, 256, 0>>>(p, nrows, row_bytes, work, sink); });
    }
    cudaError_t e = cudaDeviceSynchronize();
    printf("status: %s\n", cudaGetErrorString(e));
}
