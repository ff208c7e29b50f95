// Twin of kernels/src/attention.rs: packed varlen attention with causal masking (bottom-right aligned when a
// sequence has fewer queries than keys), GQA, sliding window and logit softcap, in f32: the reference the f32 path
// runs. bf16 and f16 run the tensor-core flash kernels (flash_attention.cuh), which share this file's delta pass and
// convert their f32 dQ accumulator here.
//
// Correct for any sequence length and simple rather than fast: one warp per (query, head) for forward and dQ, one per
// (key, KV head) for dK and dV, each walking its visible range one row at a time with an online softmax, so nothing
// is sized by the sequence length and no atomics are needed. A lane holds head_dim/32 elements of each row it keeps
// in registers (head_dim ≤ MAX_HEAD_DIM). Grids are (rows / WARPS, heads, sequences): a warp whose row lies past its
// sequence's length exits.
#include "common.cuh"

#define MAX_HEAD_DIM 256
#define PER_LANE (MAX_HEAD_DIM / 32)
#define WARPS 4

// Geometry and masking (kernels/src/cuda/attention.rs has the same layout). window 0: none; softcap 0: off.
struct Attn {
    unsigned n_heads, n_kv_heads, head_dim, window;
    float scale, softcap;
    int causal;
    unsigned tq, tk;
};

// One packed sequence. A sequence whose offsets fall outside the buffers is skipped (its rows stay unwritten)
// rather than letting a malformed cu_seqlens reach memory past q, k or v.
struct Seq {
    long long q0, k0, len_q, len_k;
};

__device__ __forceinline__ bool seq_of(const int* cu_q, const int* cu_k, const Attn& a, Seq& s) {
    const int q0 = cu_q[blockIdx.z], q1 = cu_q[blockIdx.z + 1], k0 = cu_k[blockIdx.z], k1 = cu_k[blockIdx.z + 1];
    if (q0 < 0 || q1 < q0 || static_cast<unsigned>(q1) > a.tq || k0 < 0 || k1 < k0 || static_cast<unsigned>(k1) > a.tk) return false;
    s = Seq{q0, k0, q1 - q0, k1 - k0};
    return true;
}

// This lane's elements d = lane + 32·t (t < PER_LANE) of a head_dim row, 0 past head_dim.
template <typename T> __device__ __forceinline__ void load_row(const T* row, unsigned hd, float (&x)[PER_LANE]) {
    const unsigned lane = threadIdx.x % 32;
#pragma unroll
    for (int t = 0; t < PER_LANE; ++t) {
        const unsigned d = lane + 32 * t;
        x[t] = d < hd ? to_f32(row[d]) : 0.0f;
    }
}

template <typename T> __device__ __forceinline__ void store_row(T* row, unsigned hd, const float (&x)[PER_LANE], float s) {
    const unsigned lane = threadIdx.x % 32;
#pragma unroll
    for (int t = 0; t < PER_LANE; ++t) {
        const unsigned d = lane + 32 * t;
        if (d < hd) row[d] = from_f32<T>(x[t] * s);
    }
}

__device__ __forceinline__ float lane_dot(const float (&a)[PER_LANE], const float (&b)[PER_LANE]) {
    float s = 0.0f;
#pragma unroll
    for (int t = 0; t < PER_LANE; ++t) s += a[t] * b[t];
    return s;
}

// The scaled, capped score from the full dot product q·k.
__device__ __forceinline__ float score(const Attn& a, float qk) {
    const float s = a.scale * qk;
    return a.softcap > 0.0f ? a.softcap * tanhf(s / a.softcap) : s;
}

// ∂loss/∂(q·k) from a capped score, its probability, dP = dO·v and D = dO·O: softmax's P(dP − D), tanh's
// 1 − (s/cap)², then the scale.
__device__ __forceinline__ float d_raw_score(const Attn& a, float s, float p, float dp, float delta) {
    float ds = p * (dp - delta);
    if (a.softcap > 0.0f) ds *= 1.0f - (s / a.softcap) * (s / a.softcap);
    return ds * a.scale;
}

// Keys [lo, hi) of a sequence that the query at absolute position i sees (i may be negative: a non-causal sequence
// with more queries than keys).
__device__ __forceinline__ void key_range(const Attn& a, long long i, long long len_k, long long& lo, long long& hi) {
    lo = 0;
    hi = len_k;
    if (a.causal) hi = min(hi, i + 1);
    if (a.window) lo = max(lo, i - static_cast<long long>(a.window) + 1);
}

// Calls body() for each key that query row r (sequence-relative) sees, in order, with its K and V rows of KV head kv
// loaded into kj and vj; returns whether there was one.
template <typename T, typename Body>
__device__ __forceinline__ bool for_each_key(const Attn& a, const Seq& s, long long r, unsigned kv, unsigned hd, const T* k, const T* v,
                                             float (&kj)[PER_LANE], float (&vj)[PER_LANE], Body body) {
    long long lo, hi;
    key_range(a, r + s.len_k - s.len_q, s.len_k, lo, hi);
    for (long long j = lo; j < hi; ++j) {
        const u64 kr = (static_cast<u64>(s.k0 + j) * a.n_kv_heads + kv) * hd;
        load_row(k + kr, hd, kj);
        load_row(v + kr, hd, vj);
        body();
    }
    return hi > lo;
}

// q: [tq, n_heads, hd], k, v: [tk, n_kv_heads, hd] → out: [tq, n_heads, hd], lse: [tq, n_heads] f32 (−∞ and a zero
// row for a query that sees no key). Grid: (⌈max_seqlen_q / WARPS⌉, n_heads, n_seqs), WARPS warps per block.
template <typename T>
__device__ void attention_forward(const T* q, const T* k, const T* v, const int* cu_q, const int* cu_k, T* out, float* lse, Attn a) {
    Seq s;
    const long long r = static_cast<long long>(blockIdx.x) * WARPS + threadIdx.x / 32;
    if (!seq_of(cu_q, cu_k, a, s) || r >= s.len_q) return;
    const unsigned h = blockIdx.y, kv = h / (a.n_heads / a.n_kv_heads), hd = a.head_dim;
    const u64 row = static_cast<u64>(s.q0 + r) * a.n_heads + h;
    float qr[PER_LANE], acc[PER_LANE], kj[PER_LANE], vj[PER_LANE];
    load_row(q + row * hd, hd, qr);
#pragma unroll
    for (int t = 0; t < PER_LANE; ++t) acc[t] = 0.0f;
    float m = f32_neg_inf(), l = 0.0f;
    const bool none = !for_each_key(a, s, r, kv, hd, k, v, kj, vj, [&] {
        const float sc = score(a, warp_sum(lane_dot(qr, kj)));
        const float m_new = fmaxf(m, sc);
        const float corr = expf(m - m_new), p = expf(sc - m_new);
        l = l * corr + p;
#pragma unroll
        for (int t = 0; t < PER_LANE; ++t) acc[t] = acc[t] * corr + p * vj[t];
        m = m_new;
    });
    store_row(out + row * hd, hd, acc, none ? 0.0f : 1.0f / l);
    if (threadIdx.x % 32 == 0) lse[row] = none ? f32_neg_inf() : m + logf(l);
}

// out, d_out: [rows, hd] → delta: [rows] f32 = rowsum(dO ⊙ O). One warp per row; grid ⌈rows / WARPS⌉.
template <typename T> __device__ void attention_delta(const T* out, const T* d_out, float* delta, u64 rows, unsigned hd) {
    const u64 row = static_cast<u64>(blockIdx.x) * WARPS + threadIdx.x / 32;
    if (row >= rows) return;
    float o[PER_LANE], d_o[PER_LANE];
    load_row(out + row * hd, hd, o);
    load_row(d_out + row * hd, hd, d_o);
    const float d = warp_sum(lane_dot(o, d_o));
    if (threadIdx.x % 32 == 0) delta[row] = d;
}

// → dq: [tq, n_heads, hd] = Σ over visible keys of dS·k. Grid as forward.
template <typename T>
__device__ void attention_backward_dq(const T* q, const T* k, const T* v, const float* lse, const float* delta, const T* d_out,
                                      const int* cu_q, const int* cu_k, T* dq, Attn a) {
    Seq s;
    const long long r = static_cast<long long>(blockIdx.x) * WARPS + threadIdx.x / 32;
    if (!seq_of(cu_q, cu_k, a, s) || r >= s.len_q) return;
    const unsigned h = blockIdx.y, kv = h / (a.n_heads / a.n_kv_heads), hd = a.head_dim;
    const u64 row = static_cast<u64>(s.q0 + r) * a.n_heads + h;
    float qr[PER_LANE], d_o[PER_LANE], acc[PER_LANE], kj[PER_LANE], vj[PER_LANE];
    load_row(q + row * hd, hd, qr);
    load_row(d_out + row * hd, hd, d_o);
#pragma unroll
    for (int t = 0; t < PER_LANE; ++t) acc[t] = 0.0f;
    const float L = lse[row], D = delta[row];
    for_each_key(a, s, r, kv, hd, k, v, kj, vj, [&] {
        const float qk = warp_sum(lane_dot(qr, kj)), dp = warp_sum(lane_dot(d_o, vj));
        const float sc = score(a, qk);
        const float ds = d_raw_score(a, sc, expf(sc - L), dp, D);
#pragma unroll
        for (int t = 0; t < PER_LANE; ++t) acc[t] += ds * kj[t];
    });
    store_row(dq + row * hd, hd, acc, 1.0f);
}

// → dk, dv: [tk, n_kv_heads, hd]: for key j and KV head kv, Σ over the group's query heads (outer) and the queries
// that see j (inner, in order) of dS·q and P·dO. Grid: (⌈max_seqlen_k / WARPS⌉, n_kv_heads, n_seqs).
template <typename T>
__device__ void attention_backward_dkdv(const T* q, const T* k, const T* v, const float* lse, const float* delta, const T* d_out,
                                        const int* cu_q, const int* cu_k, T* dk, T* dv, Attn a) {
    Seq s;
    const long long j = static_cast<long long>(blockIdx.x) * WARPS + threadIdx.x / 32;
    if (!seq_of(cu_q, cu_k, a, s) || j >= s.len_k) return;
    const unsigned kv = blockIdx.y, group = a.n_heads / a.n_kv_heads, hd = a.head_dim;
    const u64 kr = (static_cast<u64>(s.k0 + j) * a.n_kv_heads + kv) * hd;
    float kj[PER_LANE], vj[PER_LANE], dk_acc[PER_LANE], dv_acc[PER_LANE], qi[PER_LANE], d_o[PER_LANE];
    load_row(k + kr, hd, kj);
    load_row(v + kr, hd, vj);
#pragma unroll
    for (int t = 0; t < PER_LANE; ++t) dk_acc[t] = dv_acc[t] = 0.0f;
    // Query r sits at i = r + off and sees j when (not causal or j ≤ i) and (no window or i − j < window).
    const long long off = s.len_k - s.len_q;
    const long long r_lo = a.causal ? max(0ll, j - off) : 0ll;
    const long long r_hi = a.window ? min(s.len_q, j + static_cast<long long>(a.window) - off) : s.len_q;
    for (unsigned h = kv * group; h < (kv + 1) * group; ++h) {
        for (long long r = r_lo; r < r_hi; ++r) {
            const u64 row = static_cast<u64>(s.q0 + r) * a.n_heads + h;
            load_row(q + row * hd, hd, qi);
            load_row(d_out + row * hd, hd, d_o);
            const float qk = warp_sum(lane_dot(qi, kj)), dp = warp_sum(lane_dot(d_o, vj));
            const float sc = score(a, qk);
            const float p = expf(sc - lse[row]);
            const float ds = d_raw_score(a, sc, p, dp, delta[row]);
#pragma unroll
            for (int t = 0; t < PER_LANE; ++t) {
                dv_acc[t] += p * d_o[t];
                dk_acc[t] += ds * qi[t];
            }
        }
    }
    store_row(dk + kr, hd, dk_acc, 1.0f);
    store_row(dv + kr, hd, dv_acc, 1.0f);
}

// qlora-rt: hot
extern "C" __global__ void attention_forward_f32(const float* q, const float* k, const float* v, const int* cu_q, const int* cu_k,
                                                 float* out, float* lse, Attn a) {
    attention_forward(q, k, v, cu_q, cu_k, out, lse, a);
}

// qlora-rt: hot
extern "C" __global__ void attention_delta_f32(const float* out, const float* d_out, float* delta, u64 rows, unsigned hd) {
    attention_delta(out, d_out, delta, rows, hd);
}
extern "C" __global__ void attention_delta_bf16(const bf16* out, const bf16* d_out, float* delta, u64 rows, unsigned hd) {
    attention_delta(out, d_out, delta, rows, hd);
}
extern "C" __global__ void attention_delta_f16(const f16* out, const f16* d_out, float* delta, u64 rows, unsigned hd) {
    attention_delta(out, d_out, delta, rows, hd);
}

// The flash backward's passes before and after its kernel, at copy bandwidth (kernels/NOTES.md: the one-element-
// per-lane versions took 13 % of a d64 forward + backward).

// delta = rowsum(dO ⊙ O) ([rows] f32) and the backward's dq_accum zeroed ([rows, hd] f32), one pass: a thread takes
// 8 elements (16 bytes of O and of dO, 32 of dq_accum) of a row of hd = 8·2^log2_units elements (2^log2_units ≤ 32),
// so a row's units lie in adjacent lanes of one warp and its sum is a xor-shuffle tree over them. The launcher checks
// the shape and the 16-byte alignment of out, d_out and dq_accum.
template <typename T>
__device__ void attention_delta_zero(const T* out, const T* d_out, float* delta, float* dq_accum, u64 rows, unsigned log2_units) {
    const unsigned lane = threadIdx.x % 32, units = 1u << log2_units;
    const u64 total = rows << log2_units;
    // Warp-uniform trip count: every lane reaches the shuffles.
    for (u64 u = thread_index(); u - lane < total; u += thread_count()) {
        float s = 0.0f;
        if (u < total) {
            float o[8], d_o[8];
            load8_f32(out + 8 * u, o);
            load8_f32(d_out + 8 * u, d_o);
#pragma unroll
            for (int i = 0; i < 8; ++i) s = fmaf(o[i], d_o[i], s);
            const float zeros[8] = {};
            store8(dq_accum + 8 * u, zeros);
        }
        for (unsigned d = units / 2; d > 0; d >>= 1) s += __shfl_xor_sync(0xffffffffu, s, d);
        if (u < total && (lane & (units - 1)) == 0) delta[u >> log2_units] = s;
    }
}

extern "C" __global__ void attention_delta_zero_bf16(const bf16* out, const bf16* d_out, float* delta, float* dq_accum, u64 rows,
                                                     unsigned log2_units) {
    attention_delta_zero(out, d_out, delta, dq_accum, rows, log2_units);
}
extern "C" __global__ void attention_delta_zero_f16(const f16* out, const f16* d_out, float* delta, float* dq_accum, u64 rows,
                                                    unsigned log2_units) {
    attention_delta_zero(out, d_out, delta, dq_accum, rows, log2_units);
}

// dq_accum: [n] f32 → dq: [n], the flash backward's last step: 8 elements per thread and step (32 bytes read, 16
// written) where n % 8 == 0 and both are 16-byte aligned (`vector`), else one.
template <typename T> __device__ void attention_dq_convert(const float* dq_accum, T* dq, u64 n, int vector) {
    if (vector) {
        for (u64 i = thread_index(); i < n / 8; i += thread_count()) {
            float v[8];
            load8_f32(dq_accum + 8 * i, v);
            store8(dq + 8 * i, v);
        }
    } else {
        for (u64 i = thread_index(); i < n; i += thread_count()) dq[i] = from_f32<T>(dq_accum[i]);
    }
}

extern "C" __global__ void attention_dq_convert_bf16(const float* dq_accum, bf16* dq, u64 n, int vector) { attention_dq_convert(dq_accum, dq, n, vector); }
extern "C" __global__ void attention_dq_convert_f16(const float* dq_accum, f16* dq, u64 n, int vector) { attention_dq_convert(dq_accum, dq, n, vector); }

// qlora-rt: hot
extern "C" __global__ void attention_backward_dq_f32(const float* q, const float* k, const float* v, const float* lse, const float* delta,
                                                     const float* d_out, const int* cu_q, const int* cu_k, float* dq, Attn a) {
    attention_backward_dq(q, k, v, lse, delta, d_out, cu_q, cu_k, dq, a);
}

// qlora-rt: hot
extern "C" __global__ void attention_backward_dkdv_f32(const float* q, const float* k, const float* v, const float* lse, const float* delta,
                                                       const float* d_out, const int* cu_q, const int* cu_k, float* dk, float* dv, Attn a) {
    attention_backward_dkdv(q, k, v, lse, delta, d_out, cu_q, cu_k, dk, dv, a);
}
