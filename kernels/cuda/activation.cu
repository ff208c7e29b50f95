// Twin of kernels/src/activation.rs: SiLU, tanh-GELU, SwiGLU, GeGLU, softcap, forward and backward. Same formulas
// in the same order as the CPU code, in 8-element chunks of 16-byte accesses (common.cuh's map).
#include "common.cuh"
#include "activation.cuh"

// x: [n] → y: [n]
template <Act A, typename T> __device__ void act_forward(const T* x, T* y, u64 n) {
    map<1, 1>({x}, {y}, n, [](const float (&a)[1], float (&b)[1]) { b[0] = act<A>(a[0]); });
}

// x, dy: [n] → dx: [n]
template <Act A, typename T> __device__ void act_backward(const T* x, const T* dy, T* dx, u64 n) {
    map<2, 1>({x, dy}, {dx}, n, [](const float (&a)[2], float (&b)[1]) { b[0] = a[1] * act_grad<A>(a[0]); });
}

// gate, up: [n] → out: [n] = act(gate) ⊙ up
template <Act A, typename T> __device__ void glu_forward(const T* gate, const T* up, T* out, u64 n) {
    map<2, 1>({gate, up}, {out}, n, [](const float (&a)[2], float (&b)[1]) { b[0] = glu_value<A>(a[0], a[1]); });
}

// One element's d_gate = (d_out ⊙ up) ⊙ act′(gate) and d_up = d_out ⊙ act(gate), given ag = act(gate).
template <Act A> __device__ __forceinline__ void glu_grads(float g, float u, float d, float ag, float& d_gate, float& d_up) {
    d_gate = d * u * act_grad<A>(g);
    d_up = d * ag;
}

// gate, up, d_out: [n] → d_gate, d_up (glu_grads)
template <Act A, typename T>
__device__ void glu_backward(const T* gate, const T* up, const T* d_out, T* d_gate, T* d_up, u64 n) {
    map<3, 2>({gate, up, d_out}, {d_gate, d_up}, n, [](const float (&a)[3], float (&b)[2]) {
        glu_grads<A>(a[0], a[1], a[2], act<A>(a[0]), b[0], b[1]);
    });
}

// gate, up, d_out: [n] → glu_backward's d_gate, d_up, and glu_forward's act(gate) ⊙ up (the forward's order) written
// over d_out: act(gate) is evaluated once for both, and the product takes d_out's place instead of a third buffer
// (each element is read before it is written, by the same thread, in map's one pass).
template <Act A, typename T>
__device__ void glu_backward_out(const T* gate, const T* up, T* d_out, T* d_gate, T* d_up, u64 n) {
    map<3, 3>({gate, up, d_out}, {d_gate, d_up, d_out}, n, [](const float (&a)[3], float (&b)[3]) {
        const float ag = act<A>(a[0]);
        glu_grads<A>(a[0], a[1], a[2], ag, b[0], b[1]);
        b[2] = ag * a[1];
    });
}

// x: [n] → y: [n] = cap·tanh(x/cap)
template <typename T> __device__ void softcap_forward(const T* x, float cap, T* y, u64 n) {
    map<1, 1>({x}, {y}, n, [cap](const float (&a)[1], float (&b)[1]) { b[0] = tanhf(a[0] / cap) * cap; });
}

// x, dy: [n] → dx: [n] = dy·(1 − tanh²(x/cap))
template <typename T> __device__ void softcap_backward(const T* x, float cap, const T* dy, T* dx, u64 n) {
    map<2, 1>({x, dy}, {dx}, n, [cap](const float (&a)[2], float (&b)[1]) {
        const float t = tanhf(a[0] / cap);
        b[0] = a[1] * (1.0f - t * t);
    });
}

extern "C" __global__ void silu_forward_f32(const float* x, float* y, u64 n) { act_forward<SILU>(x, y, n); }
extern "C" __global__ void silu_forward_bf16(const bf16* x, bf16* y, u64 n) { act_forward<SILU>(x, y, n); }
extern "C" __global__ void silu_backward_f32(const float* x, const float* dy, float* dx, u64 n) { act_backward<SILU>(x, dy, dx, n); }
extern "C" __global__ void silu_backward_bf16(const bf16* x, const bf16* dy, bf16* dx, u64 n) { act_backward<SILU>(x, dy, dx, n); }

extern "C" __global__ void gelu_tanh_forward_f32(const float* x, float* y, u64 n) { act_forward<GELU_TANH>(x, y, n); }
extern "C" __global__ void gelu_tanh_forward_bf16(const bf16* x, bf16* y, u64 n) { act_forward<GELU_TANH>(x, y, n); }
extern "C" __global__ void gelu_tanh_backward_f32(const float* x, const float* dy, float* dx, u64 n) { act_backward<GELU_TANH>(x, dy, dx, n); }
extern "C" __global__ void gelu_tanh_backward_bf16(const bf16* x, const bf16* dy, bf16* dx, u64 n) { act_backward<GELU_TANH>(x, dy, dx, n); }

// qlora-rt: hot
extern "C" __global__ void swiglu_forward_f32(const float* gate, const float* up, float* out, u64 n) { glu_forward<SILU>(gate, up, out, n); }
extern "C" __global__ void swiglu_forward_bf16(const bf16* gate, const bf16* up, bf16* out, u64 n) { glu_forward<SILU>(gate, up, out, n); }
extern "C" __global__ void swiglu_backward_f32(const float* gate, const float* up, const float* d_out, float* d_gate, float* d_up, u64 n) { glu_backward<SILU>(gate, up, d_out, d_gate, d_up, n); }
extern "C" __global__ void swiglu_backward_bf16(const bf16* gate, const bf16* up, const bf16* d_out, bf16* d_gate, bf16* d_up, u64 n) { glu_backward<SILU>(gate, up, d_out, d_gate, d_up, n); }
extern "C" __global__ void swiglu_backward_out_f32(const float* gate, const float* up, float* d_out, float* d_gate, float* d_up, u64 n) { glu_backward_out<SILU>(gate, up, d_out, d_gate, d_up, n); }
extern "C" __global__ void swiglu_backward_out_bf16(const bf16* gate, const bf16* up, bf16* d_out, bf16* d_gate, bf16* d_up, u64 n) { glu_backward_out<SILU>(gate, up, d_out, d_gate, d_up, n); }

// qlora-rt: hot
extern "C" __global__ void geglu_forward_f32(const float* gate, const float* up, float* out, u64 n) { glu_forward<GELU_TANH>(gate, up, out, n); }
extern "C" __global__ void geglu_forward_bf16(const bf16* gate, const bf16* up, bf16* out, u64 n) { glu_forward<GELU_TANH>(gate, up, out, n); }
extern "C" __global__ void geglu_backward_f32(const float* gate, const float* up, const float* d_out, float* d_gate, float* d_up, u64 n) { glu_backward<GELU_TANH>(gate, up, d_out, d_gate, d_up, n); }
extern "C" __global__ void geglu_backward_bf16(const bf16* gate, const bf16* up, const bf16* d_out, bf16* d_gate, bf16* d_up, u64 n) { glu_backward<GELU_TANH>(gate, up, d_out, d_gate, d_up, n); }
extern "C" __global__ void geglu_backward_out_f32(const float* gate, const float* up, float* d_out, float* d_gate, float* d_up, u64 n) { glu_backward_out<GELU_TANH>(gate, up, d_out, d_gate, d_up, n); }
extern "C" __global__ void geglu_backward_out_bf16(const bf16* gate, const bf16* up, bf16* d_out, bf16* d_gate, bf16* d_up, u64 n) { glu_backward_out<GELU_TANH>(gate, up, d_out, d_gate, d_up, n); }

extern "C" __global__ void softcap_forward_f32(const float* x, float cap, float* y, u64 n) { softcap_forward(x, cap, y, n); }
extern "C" __global__ void softcap_forward_bf16(const bf16* x, float cap, bf16* y, u64 n) { softcap_forward(x, cap, y, n); }
extern "C" __global__ void softcap_backward_f32(const float* x, float cap, const float* dy, float* dx, u64 n) { softcap_backward(x, cap, dy, dx, n); }
extern "C" __global__ void softcap_backward_bf16(const bf16* x, float cap, const bf16* dy, bf16* dx, u64 n) { softcap_backward(x, cap, dy, dx, n); }
