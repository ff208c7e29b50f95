// Twin of kernels/src/elementwise.rs: add, mul, scale, axpy, add_bias. One thread per element, grid-stride.
#include "common.cuh"

// a, b: [n] → out: [n] = a + b
template <typename T> __device__ void add(const T* a, const T* b, T* out, u64 n) {
    for (u64 i = thread_index(); i < n; i += thread_count()) out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}

// a, b: [n] → out: [n] = a ⊙ b
template <typename T> __device__ void mul(const T* a, const T* b, T* out, u64 n) {
    for (u64 i = thread_index(); i < n; i += thread_count()) out[i] = from_f32<T>(to_f32(a[i]) * to_f32(b[i]));
}

// x: [n] → out: [n] = s·x
template <typename T> __device__ void scale(const T* x, float s, T* out, u64 n) {
    for (u64 i = thread_index(); i < n; i += thread_count()) out[i] = from_f32<T>(s * to_f32(x[i]));
}

// x: [n], y: [n] → y += alpha·x
template <typename T> __device__ void axpy(float alpha, const T* x, T* y, u64 n) {
    for (u64 i = thread_index(); i < n; i += thread_count()) y[i] = from_f32<T>(to_f32(y[i]) + alpha * to_f32(x[i]));
}

// x: [rows, cols], bias: [cols] → x += bias broadcast over rows (n = rows·cols)
template <typename T> __device__ void add_bias(T* x, const T* bias, u64 n, unsigned cols) {
    for (u64 i = thread_index(); i < n; i += thread_count()) x[i] = from_f32<T>(to_f32(x[i]) + to_f32(bias[i % cols]));
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
