// The activations of kernels/src/activation.rs (SiLU, tanh-GELU, their derivatives, a GLU's element), shared by
// activation.cu's kernels and matmul.cu's GLU-then-product (`glu_few_rows`), which must form act(gate) ⊙ up bit for bit
// as glu_forward does. Same formulas in the same order as the CPU code.

// √(2/π) and the cubic coefficient of the tanh approximation: activation.rs GELU_BETA, GELU_KAPPA.
#define GELU_BETA 0.7978845608028654f
#define GELU_KAPPA 0.044715f

// exp only ever sees −|z|, so no intermediate overflows; z ≥ 0 gives 1/(1 + e^−z), z < 0 gives e^z/(1 + e^z), the
// CPU's two branches (activation.rs sigmoid) without a branch: a warp of mixed signs pays for one exp, not two.
__device__ __forceinline__ float sigmoid(float z) {
    const float e = expf(-fabsf(z));
    return (z >= 0.0f ? 1.0f : e) / (1.0f + e);
}

__device__ __forceinline__ float silu(float z) { return z * sigmoid(z); }

__device__ __forceinline__ float silu_grad(float z) {
    const float s = sigmoid(z);
    return s * (1.0f + z * (1.0f - s));
}

__device__ __forceinline__ float gelu_tanh(float z) {
    const float inner = GELU_BETA * (z + GELU_KAPPA * (z * z * z));
    return 0.5f * z * (1.0f + tanhf(inner));
}

__device__ __forceinline__ float gelu_tanh_grad(float z) {
    const float z_sq = z * z;
    const float inner = GELU_BETA * (z + GELU_KAPPA * (z_sq * z));
    const float t = tanhf(inner);
    const float left = 0.5f * z;
    const float right = 1.0f + t;
    const float left_grad = 0.5f * right;
    const float right_grad = 1.0f - t * t;
    const float inner_grad = GELU_BETA * (1.0f + 3.0f * GELU_KAPPA * z_sq);
    return left_grad + left * right_grad * inner_grad;
}

enum Act { SILU, GELU_TANH };

template <Act A> __device__ __forceinline__ float act(float z) { return A == SILU ? silu(z) : gelu_tanh(z); }
template <Act A> __device__ __forceinline__ float act_grad(float z) { return A == SILU ? silu_grad(z) : gelu_tanh_grad(z); }

// One element of a GLU, act(gate) ⊙ up: glu_forward's and glu_few_rows' values.
template <Act A> __device__ __forceinline__ float glu_value(float gate, float up) { return act<A>(gate) * up; }
