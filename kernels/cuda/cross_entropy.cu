// Twin of kernels/src/cross_entropy.rs: per-row softmax cross-entropy with ignore index −100; loss, lse and the
// upstream gradient are f32. One block per row. A target outside 0..vocab (other than −100) is a caller bug that the
// CPU kernel asserts; a kernel cannot, so its row gets NaN loss and NaN gradients, which no training run survives
// unnoticed.
#include "common.cuh"

#define IGNORE_INDEX (-100)

// logits: [rows, vocab], targets: [rows] → loss: [rows] (0 where ignored), lse: [rows]. Grid: rows blocks.
template <typename T>
__device__ void cross_entropy_forward(const T* logits, const int* targets, float* loss, float* lse, unsigned vocab) {
    const u64 row = blockIdx.x;
    const T* x = logits + row * vocab;
    float max = f32_neg_inf();
    for (unsigned j = threadIdx.x; j < vocab; j += blockDim.x) max = fmaxf(max, to_f32(x[j]));
    max = block_max(max);
    float sum = 0.0f;
    for (unsigned j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(to_f32(x[j]) - max);
    const float log_sum = logf(block_sum(sum));
    if (threadIdx.x == 0) {
        lse[row] = max + log_sum;
        const int t = targets[row];
        // From the shifted logit, as the CPU code: `lse − logit` would lose log_sum's low bits at large logits.
        if (t == IGNORE_INDEX) loss[row] = 0.0f;
        else if (t < 0 || static_cast<unsigned>(t) >= vocab) loss[row] = f32_nan();
        else loss[row] = log_sum - (to_f32(x[t]) - max);
    }
}

// d_loss: [rows] → d_logits: [rows, vocab] = d_loss·(softmax − onehot); zero rows where ignored. Grid: rows blocks.
template <typename T>
__device__ void cross_entropy_backward(const T* logits, const int* targets, const float* lse, const float* d_loss,
                                       T* d_logits, unsigned vocab) {
    const u64 row = blockIdx.x;
    const T* x = logits + row * vocab;
    T* d = d_logits + row * vocab;
    const int t = targets[row];
    const float g = d_loss[row], l = lse[row];
    const bool ignored = t == IGNORE_INDEX;
    const bool invalid = !ignored && (t < 0 || static_cast<unsigned>(t) >= vocab);
    for (unsigned j = threadIdx.x; j < vocab; j += blockDim.x) {
        float v;
        if (ignored) v = 0.0f;
        else if (invalid) v = f32_nan();
        else if (static_cast<int>(j) == t) v = g * (expf(to_f32(x[j]) - l) - 1.0f);
        else v = g * expf(to_f32(x[j]) - l);
        d[j] = from_f32<T>(v);
    }
}

// qlora-rt: hot
extern "C" __global__ void cross_entropy_forward_f32(const float* logits, const int* targets, float* loss, float* lse, unsigned vocab) {
    cross_entropy_forward(logits, targets, loss, lse, vocab);
}
extern "C" __global__ void cross_entropy_forward_bf16(const bf16* logits, const int* targets, float* loss, float* lse, unsigned vocab) {
    cross_entropy_forward(logits, targets, loss, lse, vocab);
}

// qlora-rt: hot
extern "C" __global__ void cross_entropy_backward_f32(const float* logits, const int* targets, const float* lse, const float* d_loss,
                                                      float* d_logits, unsigned vocab) {
    cross_entropy_backward(logits, targets, lse, d_loss, d_logits, vocab);
}
extern "C" __global__ void cross_entropy_backward_bf16(const bf16* logits, const int* targets, const float* lse, const float* d_loss,
                                                       bf16* d_logits, unsigned vocab) {
    cross_entropy_backward(logits, targets, lse, d_loss, d_logits, vocab);
}
