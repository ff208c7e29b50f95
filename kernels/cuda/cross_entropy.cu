// Twin of kernels/src/cross_entropy.rs: per-row softmax cross-entropy with ignore index −100; loss, lse and the
// upstream gradient are f32. One block per row. A target outside 0..vocab (other than −100) is a caller bug that the
// CPU kernel asserts; a kernel cannot, so its row gets NaN loss and NaN gradients, which no training run survives
// unnoticed.
//
// A row is read in 8-element chunks (16-byte accesses, four chunks in flight per thread) from its first 16-byte
// aligned element; the few before it (when vocab is not a multiple of 8) and the last vocab mod 8 go one per thread.
// The forward is one pass: each thread keeps a running max m and Σ exp(x − m) (rescaled when m grows), and the block
// combines them; exp there is ex2.approx of (x − m)·log2(e) (a relative error near 2⁻²²; the sum's own rounding is
// larger), which keeps it to three instructions per logit where expf takes eight.
#include "common.cuh"

#define IGNORE_INDEX (-100)
#define CE_LOG2E 1.4426950408889634f

// Chunks a thread has in flight per step.
constexpr unsigned CE_UNROLL = 4;

__device__ __forceinline__ float ex2_approx(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// A row of `len` elements at p, split for 16-byte accesses: `head` elements before the first 16-byte aligned one,
// then `chunks` of 8, then `tail`. `scalar` makes it all head: the path when two rows that are read and written
// together are not aligned alike.
struct RowSplit {
    unsigned head, chunks, tail;
    template <typename T> __device__ __forceinline__ static RowSplit of(const T* p, unsigned len) {
        constexpr unsigned A = align_elems<T>();
        const unsigned misaligned = static_cast<unsigned>(reinterpret_cast<u64>(p) / sizeof(T) % A);
        const unsigned head = min(len, (A - misaligned) % A);
        return RowSplit{head, (len - head) / 8, (len - head) % 8};
    }
    __device__ __forceinline__ static RowSplit scalar(unsigned len) { return RowSplit{len, 0, 0}; }
};

// Chunks c, c + blockDim.x, … (CE_UNROLL of them, those below `chunks`) of a row body: every load is issued before any
// is used.
template <typename T> __device__ __forceinline__ void load_chunks(Raw8<T> (&raw)[CE_UNROLL], const T* body, unsigned c, unsigned chunks) {
#pragma unroll
    for (unsigned u = 0; u < CE_UNROLL; ++u)
        if (c + u * blockDim.x < chunks) raw[u] = load8(body + 8 * (c + u * blockDim.x));
}

// A thread's running max m and Σ exp(x − m) over the logits it has seen, with K more logits added.
template <unsigned K> __device__ __forceinline__ void lse_add(float& m, float& s, const float (&v)[K]) {
    float most = v[0];
#pragma unroll
    for (unsigned k = 1; k < K; ++k) most = fmaxf(most, v[k]);
    if (most > m) {
        s *= ex2_approx((m - most) * CE_LOG2E);  // 0 while m is −∞ (s is 0 then too)
        m = most;
    }
    // While m is −∞ every logit so far was −∞ and adds exp(−∞) = 0; the shift 0 keeps −∞ − (−∞) out. The logit is
    // shifted before it is scaled, as the CPU shifts before exp: x·log2(e) − m·log2(e) would carry m·log2(e)'s
    // rounding (5e-4 at logits near 1e4) into every term.
    const float shift = m == f32_neg_inf() ? 0.0f : m;
#pragma unroll
    for (unsigned k = 0; k < K; ++k) s += ex2_approx((v[k] - shift) * CE_LOG2E);
}

// logits: [rows, vocab], targets: [rows] → loss: [rows] (0 where ignored), lse: [rows]. Grid: rows blocks.
template <typename T>
__device__ void cross_entropy_forward(const T* __restrict__ logits, const int* __restrict__ targets, float* __restrict__ loss,
                                      float* __restrict__ lse, unsigned vocab) {
    const u64 row = blockIdx.x;
    const T* x = logits + row * vocab;
    // The target's logit is needed only at the end: its two dependent loads go out first.
    int t = 0;
    float x_t = 0.0f;
    if (threadIdx.x == 0) {
        t = targets[row];
        if (t >= 0 && static_cast<unsigned>(t) < vocab) x_t = to_f32(x[t]);
    }
    const RowSplit split = RowSplit::of(x, vocab);
    const T* body = x + split.head;
    float m = f32_neg_inf(), s = 0.0f;
    for (unsigned c = threadIdx.x; c < split.chunks; c += CE_UNROLL * blockDim.x) {
        Raw8<T> raw[CE_UNROLL];
        load_chunks(raw, body, c, split.chunks);
#pragma unroll
        for (unsigned u = 0; u < CE_UNROLL; ++u) {
            if (c + u * blockDim.x < split.chunks) {
                float v[8];
                unpack8(raw[u], v);
                lse_add(m, s, v);
            }
        }
    }
    for (unsigned j = threadIdx.x; j < split.head; j += blockDim.x) lse_add<1>(m, s, {to_f32(x[j])});
    for (unsigned j = threadIdx.x; j < split.tail; j += blockDim.x) lse_add<1>(m, s, {to_f32(body[8 * split.chunks + j])});

    const float max = block_max(m);
    const float sum = block_sum(m == f32_neg_inf() ? 0.0f : s * ex2_approx((m - max) * CE_LOG2E));
    if (threadIdx.x == 0) {
        // A row of −∞ only: exp(−∞ − (−∞)) is NaN on the CPU, so here too.
        const float log_sum = max == f32_neg_inf() ? f32_nan() : logf(sum);
        lse[row] = max + log_sum;
        // From the shifted logit, as the CPU code: `lse − logit` would lose log_sum's low bits at large logits.
        if (t == IGNORE_INDEX) loss[row] = 0.0f;
        else if (t < 0 || static_cast<unsigned>(t) >= vocab) loss[row] = f32_nan();
        else loss[row] = log_sum - (x_t - max);
    }
}

// d_loss: [rows] → d_logits: [rows, vocab] = d_loss·(softmax − onehot); zero rows where ignored (their logits are
// not read). Grid: rows blocks.
template <typename T>
__device__ void cross_entropy_backward(const T* __restrict__ logits, const int* __restrict__ targets, const float* __restrict__ lse,
                                       const float* __restrict__ d_loss, T* __restrict__ d_logits, unsigned vocab) {
    const u64 row = blockIdx.x;
    const T* x = logits + row * vocab;
    T* d = d_logits + row * vocab;
    const int t = targets[row];
    const bool alike = reinterpret_cast<u64>(x) % 16 == reinterpret_cast<u64>(d) % 16;
    const RowSplit split = alike ? RowSplit::of(x, vocab) : RowSplit::scalar(vocab);
    T* d_body = d + split.head;
    if (t == IGNORE_INDEX || t < 0 || static_cast<unsigned>(t) >= vocab) {
        float fill[8];
#pragma unroll
        for (unsigned k = 0; k < 8; ++k) fill[k] = t == IGNORE_INDEX ? 0.0f : f32_nan();
        for (unsigned c = threadIdx.x; c < split.chunks; c += blockDim.x) store8(d_body + 8 * c, fill);
        for (unsigned j = threadIdx.x; j < split.head; j += blockDim.x) d[j] = from_f32<T>(fill[0]);
        for (unsigned j = threadIdx.x; j < split.tail; j += blockDim.x) d_body[8 * split.chunks + j] = from_f32<T>(fill[0]);
        return;
    }
    const float g = d_loss[row], l = lse[row];
    // The gradient of logit j (numbered from the first chunk's start) from its value.
    const int t_body = t - static_cast<int>(split.head);
    auto grad = [&](int j, float v) {
        const float e = expf(v - l);
        return j == t_body ? g * (e - 1.0f) : g * e;
    };
    const T* body = x + split.head;
    for (unsigned c = threadIdx.x; c < split.chunks; c += CE_UNROLL * blockDim.x) {
        Raw8<T> raw[CE_UNROLL];
        load_chunks(raw, body, c, split.chunks);
#pragma unroll
        for (unsigned u = 0; u < CE_UNROLL; ++u) {
            const unsigned cu = c + u * blockDim.x;
            if (cu < split.chunks) {
                float v[8];
                unpack8(raw[u], v);
#pragma unroll
                for (unsigned k = 0; k < 8; ++k) v[k] = grad(static_cast<int>(8 * cu + k), v[k]);
                store8(d_body + 8 * cu, v);
            }
        }
    }
    for (unsigned i = threadIdx.x; i < split.head; i += blockDim.x) {
        const int j = static_cast<int>(i);
        d[j] = from_f32<T>(grad(j - static_cast<int>(split.head), to_f32(x[j])));
    }
    for (unsigned i = threadIdx.x; i < split.tail; i += blockDim.x) {
        const int j = static_cast<int>(8 * split.chunks + i);
        d_body[j] = from_f32<T>(grad(j, to_f32(body[j])));
    }
}

// qlora-rt: hot
extern "C" __global__ void cross_entropy_forward_f32(const float* logits, const int* targets, float* loss, float* lse, unsigned vocab) { cross_entropy_forward(logits, targets, loss, lse, vocab); }
extern "C" __global__ void cross_entropy_forward_bf16(const bf16* logits, const int* targets, float* loss, float* lse, unsigned vocab) { cross_entropy_forward(logits, targets, loss, lse, vocab); }

// qlora-rt: hot
extern "C" __global__ void cross_entropy_backward_f32(const float* logits, const int* targets, const float* lse, const float* d_loss, float* d_logits, unsigned vocab) { cross_entropy_backward(logits, targets, lse, d_loss, d_logits, vocab); }
extern "C" __global__ void cross_entropy_backward_bf16(const bf16* logits, const int* targets, const float* lse, const float* d_loss, bf16* d_logits, unsigned vocab) { cross_entropy_backward(logits, targets, lse, d_loss, d_logits, vocab); }
