// A row's RMS norm, the arithmetic of kernels/src/rms_norm.rs: shared by rms_norm.cu's vector path and matmul.cu's
// norm-then-product (`norm_few_rows`), which must form rstd, h and y bit for bit as rms_norm_forward_rows does.

// The value a T holds after rounding: h is normalized as stored.
template <typename T> __device__ __forceinline__ float rounded(float v) { return to_f32(from_f32<T>(v)); }

// One thread's share of a row's Σ x²: its 8 values in order (the block sums the shares with block_sum's tree).
__device__ __forceinline__ float sum_sq8(const float (&v)[8]) {
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) s += v[k] * v[k];
    return s;
}

// rstd = 1/√(mean(x²) + eps) from a row's Σ x².
__device__ __forceinline__ float rms_rstd(float sum_sq, unsigned dim, float eps) {
    return 1.0f / sqrtf(sum_sq / static_cast<float>(dim) + eps);
}

// y = (x · rstd) · w_off for 8 values, w_off = offset + w (Llama: offset 0, Gemma: 1).
__device__ __forceinline__ void rms_scale8(const float (&x)[8], float rstd, const float (&w_off)[8], float (&y)[8]) {
#pragma unroll
    for (int k = 0; k < 8; ++k) y[k] = x[k] * rstd * w_off[k];
}
