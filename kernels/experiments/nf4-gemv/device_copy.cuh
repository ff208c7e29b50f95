// The ceiling the experiments here report against: a 1 GiB device-to-device copy, bytes read + written per second, as
// `qlora-rt bench kernels` measures it.
#pragma once
#include <cuda_runtime.h>

inline double device_copy_gbps() {
    const size_t n = 1ull << 30;
    unsigned char *s, *d;
    cudaMalloc(&s, n);
    cudaMalloc(&d, n);
    cudaMemcpy(d, s, n, cudaMemcpyDeviceToDevice);
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    cudaEventRecord(a);
    for (int i = 0; i < 5; ++i) cudaMemcpy(d, s, n, cudaMemcpyDeviceToDevice);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    cudaFree(s);
    cudaFree(d);
    return 2.0 * n * 5 / (ms * 1e6);
}
