// The experiments' inputs (rows-loop.cu, mma-gemv.cu): Llama-3-8B's decoding shapes, and for each a [out, in] NF4
// weight of random packed bytes with plain f32 absmax per 64 elements, in rotated copies filling over 512 MB (so that
// no timed call finds its weight in L2), and one random bf16 row of x. Host code only.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>
#include <cuda_runtime.h>
#include <cuda_bf16.h>

struct GemvShape {
    unsigned out, in;
    const char* name;
};
inline constexpr GemvShape DECODE_SHAPES[] = {
    {4096, 4096, "4096x4096"}, {28672, 4096, "28672x4096 (gate+up)"}, {4096, 14336, "4096x14336 (down)"}};

struct RandomWeights {
    size_t elems, pbytes, abytes, one;  // elements, packed bytes, absmax bytes, a copy's bytes
    int copies;
    unsigned char* packed;  // copy c at c·pbytes
    float* absmax;          // copy c at c·elems / 64
    __nv_bfloat16* x;
};

inline RandomWeights random_weights(unsigned out, unsigned in) {
    RandomWeights w;
    w.elems = (size_t)out * in;
    w.pbytes = w.elems / 2;
    w.abytes = w.elems / 64 * 4;
    w.one = w.pbytes + w.abytes;
    w.copies = (int)std::max<size_t>(2, (512ull << 20) / w.one + 1);
    cudaMalloc(&w.packed, w.pbytes * w.copies);
    cudaMalloc(&w.absmax, w.abytes * w.copies);
    cudaMalloc(&w.x, in * 2);
    std::vector<unsigned char> hp(w.pbytes);
    std::vector<float> ha(w.elems / 64);
    std::vector<__nv_bfloat16> hx(in);
    uint32_t st = 12345;
    auto rnd = [&] { st = st * 1664525u + 1013904223u; return st >> 8; };
    for (auto& v : hp) v = rnd() & 255;
    for (auto& v : ha) v = 0.5f + (rnd() % 1000) / 1000.0f;
    for (auto& v : hx) v = __float2bfloat16(((int)(rnd() % 2001) - 1000) / 1000.0f);
    for (int c = 0; c < w.copies; ++c) {
        cudaMemcpy(w.packed + c * w.pbytes, hp.data(), w.pbytes, cudaMemcpyHostToDevice);
        cudaMemcpy(w.absmax + c * (w.elems / 64), ha.data(), w.abytes, cudaMemcpyHostToDevice);
    }
    cudaMemcpy(w.x, hx.data(), in * 2, cudaMemcpyHostToDevice);
    return w;
}

inline void free_weights(const RandomWeights& w) {
    cudaFree(w.packed);
    cudaFree(w.absmax);
    cudaFree(w.x);
}
