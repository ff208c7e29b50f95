// The ceiling the experiments here report against: a 1 GiB device-to-device copy, bytes read + written per second, as
// `qlora-rt bench kernels` measures it.
#pragma once
#include <cstdio>
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

// An experiment's start: the device's multiprocessors, two events for its timings, and the copy ceiling printed.
struct ExperimentStart {
    int sms;
    cudaEvent_t a, b;
};
inline ExperimentStart experiment_start() {
    ExperimentStart e;
    cudaDeviceGetAttribute(&e.sms, cudaDevAttrMultiProcessorCount, 0);
    cudaEventCreate(&e.a);
    cudaEventCreate(&e.b);
    printf("device copy 1 GiB: %.1f GB/s (read + written)\n", device_copy_gbps());
    return e;
}
