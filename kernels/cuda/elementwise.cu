// Twin of kernels/src/elementwise.rs: add, mul, scale, dropout, axpy, add_bias, broadcast_scaled. add, mul, scale
// and axpy map 8-element chunks (common.cuh's map, 16-byte accesses, launched as one wave); the others take one
// thread per element, grid-stride.
#include "common.cuh"

// a, b: [n] → out: [n] = a + b
template <typename T> __device__ void add(const T* a, const T* b, T* out, u64 n) {
    map<2, 1>({a, b}, {out}, n, [](const float (&x)[2], float (&y)[1]) { y[0] = x[0] + x[1]; });
}

// a, b: [n] → out: [n] = a ⊙ b
template <typename T> __device__ void mul(const T* a, const T* b, T* out, u64 n) {
    map<2, 1>({a, b}, {out}, n, [](const float (&x)[2], float (&y)[1]) { y[0] = x[0] * x[1]; });
}

// x: [n] → out: [n] = s·x
template <typename T> __device__ void scale(const T* x, float s, T* out, u64 n) {
    map<1, 1>({x}, {out}, n, [s](const float (&a)[1], float (&b)[1]) { b[0] = s * a[0]; });
}

// The i-th uniform in [0, 1) of SplitMix64 from `seed` (kernels/src/rng.rs `Rng::uniform_at`), bit for bit.
__device__ __forceinline__ double uniform_at(u64 seed, u64 i) {
    return (double)(splitmix_at(seed, i) >> 11) * (1.0 / 9007199254740992.0);
}

// x: [n] → out: [n] = 0 where draw i < p, keep·x elsewhere (inverted dropout; the CPU twin's mask exactly)
template <typename T> __device__ void dropout(const T* x, T* out, u64 n, u64 seed, double p, float keep) {
    grid_dependency_sync();
    for (u64 i = thread_index(); i < n; i += thread_count())
        out[i] = uniform_at(seed, i) < p ? from_f32<T>(0.0f) : from_f32<T>(to_f32(x[i]) * keep);
}

// x: [n], y: [n] → y += alpha·x (in place: map reads each element of y before the same thread writes it)
template <typename T> __device__ void axpy(float alpha, const T* x, T* y, u64 n) {
    map<2, 1>({x, y}, {y}, n, [alpha](const float (&a)[2], float (&b)[1]) { b[0] = a[1] + alpha * a[0]; });
}

// x: [rows, cols], bias: [cols] → x += bias broadcast over rows (n = rows·cols)
template <typename T> __device__ void add_bias(T* x, const T* bias, u64 n, unsigned cols) {
    grid_dependency_sync();
    for (u64 i = thread_index(); i < n; i += thread_count()) x[i] = from_f32<T>(to_f32(x[i]) + to_f32(bias[i % cols]));
}

// s: [1] f32 on the device → out: [n] = scale·s (a scalar's gradient spread over a tensor, never read by the host)
template <typename T> __device__ void broadcast_scaled(const float* s, float scale, T* out, u64 n) {
    grid_dependency_sync();
    const T v = from_f32<T>(scale * s[0]);
    for (u64 i = thread_index(); i < n; i += thread_count()) out[i] = v;
}

// qlora-rt: hot
extern "C" __global__ void add_f32(const float* a, const float* b, float* out, u64 n) { add(a, b, out, n); }
extern "C" __global__ void add_bf16(const bf16* a, const bf16* b, bf16* out, u64 n) { add(a, b, out, n); }

extern "C" __global__ void mul_f32(const float* a, const float* b, float* out, u64 n) { mul(a, b, out, n); }
extern "C" __global__ void mul_bf16(const bf16* a, const bf16* b, bf16* out, u64 n) { mul(a, b, out, n); }

extern "C" __global__ void scale_f32(const float* x, float s, float* out, u64 n) { scale(x, s, out, n); }
extern "C" __global__ void scale_bf16(const bf16* x, float s, bf16* out, u64 n) { scale(x, s, out, n); }

// qlora-rt: hot
extern "C" __global__ void axpy_f32(float alpha, const float* x, float* y, u64 n) { axpy(alpha, x, y, n); }
extern "C" __global__ void axpy_bf16(float alpha, const bf16* x, bf16* y, u64 n) { axpy(alpha, x, y, n); }

extern "C" __global__ void add_bias_f32(float* x, const float* bias, u64 n, unsigned cols) { add_bias(x, bias, n, cols); }
extern "C" __global__ void add_bias_bf16(bf16* x, const bf16* bias, u64 n, unsigned cols) { add_bias(x, bias, n, cols); }

extern "C" __global__ void dropout_f32(const float* x, float* out, u64 n, u64 seed, double p, float keep) {
    dropout(x, out, n, seed, p, keep);
}
extern "C" __global__ void dropout_bf16(const bf16* x, bf16* out, u64 n, u64 seed, double p, float keep) {
    dropout(x, out, n, seed, p, keep);
}

extern "C" __global__ void broadcast_scaled_f32(const float* s, float scale, float* out, u64 n) { broadcast_scaled(s, scale, out, n); }
extern "C" __global__ void broadcast_scaled_bf16(const float* s, float scale, bf16* out, u64 n) { broadcast_scaled(s, scale, out, n); }
