// Twin of kernels/src/adamw.rs: torch.optim.AdamW's update (decay, then the Adam step with the bias corrections
// folded into step_size and bc2_sqrt, computed on the host exactly as the CPU code computes them). Parameters and
// gradients f32 or bf16; the moments are always f32.
#include "common.cuh"

// p, g: [n] T, m, v: [n] f32 → p, m, v updated in place. With `norm_sq` (the squared global gradient norm on the
// device), the gradient is first clipped to `max_norm` as torch.nn.utils.clip_grad_norm_ does (× max_norm /
// (norm + 1e-6) when norm > max_norm), so neither the norm nor the factor goes through the host.
template <typename T>
__device__ void adamw_step(T* p, const T* g, float* m, float* v, u64 n, float beta1, float beta2, float decay,
                           float step_size, float bc2_sqrt, float eps, const float* norm_sq, float max_norm) {
    float clip = 1.0f;
    if (norm_sq) {
        const float norm = sqrtf(*norm_sq);
        if (norm > max_norm) clip = max_norm / (norm + 1e-6f);
    }
    for (u64 i = thread_index(); i < n; i += thread_count()) {
        const float gi = to_f32(g[i]) * clip;
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = from_f32<T>(to_f32(p[i]) * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps));
    }
}

// qlora-rt: hot
extern "C" __global__ void adamw_step_f32(float* p, const float* g, float* m, float* v, u64 n, float beta1, float beta2, float decay,
                                          float step_size, float bc2_sqrt, float eps, const float* norm_sq, float max_norm) {
    adamw_step(p, g, m, v, n, beta1, beta2, decay, step_size, bc2_sqrt, eps, norm_sq, max_norm);
}
extern "C" __global__ void adamw_step_bf16(bf16* p, const bf16* g, float* m, float* v, u64 n, float beta1, float beta2, float decay,
                                           float step_size, float bc2_sqrt, float eps, const float* norm_sq, float max_norm) {
    adamw_step(p, g, m, v, n, beta1, beta2, decay, step_size, bc2_sqrt, eps, norm_sq, max_norm);
}
