// Twin of kernels/src/adamw.rs: torch.optim.AdamW's update (decay, then the Adam step with the bias corrections
// folded into step_size and bc2_sqrt, computed on the host exactly as the CPU code computes them). Parameters and
// gradients f32 or bf16; the moments are always f32.
#include "common.cuh"

// The clip factor of torch.nn.utils.clip_grad_norm_ (× max_norm / (norm + 1e-6) when norm > max_norm) from the squared
// global norm on the device; 1 without one.
__device__ __forceinline__ float clip_of(const float* norm_sq, float max_norm) {
    if (!norm_sq) return 1.0f;
    const float norm = sqrtf(*norm_sq);
    return norm > max_norm ? max_norm / (norm + 1e-6f) : 1.0f;
}

// Elements first, first + stride, … < n of p, g: T, m, v: f32 updated in place, the gradient scaled by `clip` first.
template <typename T>
__device__ __forceinline__ void adamw_range(T* p, const T* g, float* m, float* v, u64 n, u64 first, u64 stride,
                                            float beta1, float beta2, float decay, float step_size, float bc2_sqrt,
                                            float eps, float clip) {
    for (u64 i = first; i < n; i += stride) {
        const float gi = to_f32(g[i]) * clip;
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = from_f32<T>(to_f32(p[i]) * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps));
    }
}

// p, g: [n] T, m, v: [n] f32 → p, m, v updated in place. With `norm_sq` (the squared global gradient norm on the
// device), the gradient is first clipped to `max_norm` (clip_of), so neither the norm nor the factor goes through the
// host.
template <typename T>
__device__ void adamw_step(T* p, const T* g, float* m, float* v, u64 n, float beta1, float beta2, float decay,
                           float step_size, float bc2_sqrt, float eps, const float* norm_sq, float max_norm) {
    adamw_range(p, g, m, v, n, thread_index(), thread_count(), beta1, beta2, decay, step_size, bc2_sqrt, eps,
                clip_of(norm_sq, max_norm));
}

// One parameter of a multi-tensor update, as kernels/src/cuda/adamw.rs `adamw_multi` writes it: value, gradient
// and moments, n f32 each.
struct AdamwEntry {
    float* p;
    const float* g;
    float* m;
    float* v;
    u64 n;
};

// qlora-rt: hot
extern "C" __global__ void adamw_step_f32(float* p, const float* g, float* m, float* v, u64 n, float beta1, float beta2, float decay,
                                          float step_size, float bc2_sqrt, float eps, const float* norm_sq, float max_norm) {
    adamw_step(p, g, m, v, n, beta1, beta2, decay, step_size, bc2_sqrt, eps, norm_sq, max_norm);
}
extern "C" __global__ void adamw_step_bf16(bf16* p, const bf16* g, float* m, float* v, u64 n, float beta1, float beta2, float decay,
                                           float step_size, float bc2_sqrt, float eps, const float* norm_sq, float max_norm) {
    adamw_step(p, g, m, v, n, beta1, beta2, decay, step_size, bc2_sqrt, eps, norm_sq, max_norm);
}

// entries: [gridDim.y] parameters, each updated by its row of gridDim.x blocks as adamw_step_f32 updates one (the same
// arithmetic per element, so the same bits): every parameter of an optimizer in one launch instead of one each.
extern "C" __global__ void adamw_multi_f32(const AdamwEntry* entries, float beta1, float beta2, float decay,
                                           float step_size, float bc2_sqrt, float eps, const float* norm_sq, float max_norm) {
    const AdamwEntry e = entries[blockIdx.y];
    adamw_range(e.p, e.g, e.m, e.v, e.n, static_cast<u64>(blockIdx.x) * blockDim.x + threadIdx.x,
                static_cast<u64>(gridDim.x) * blockDim.x, beta1, beta2, decay, step_size, bc2_sqrt, eps,
                clip_of(norm_sq, max_norm));
}
