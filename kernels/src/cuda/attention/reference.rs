//! The f32 reference kernels of `kernels/cuda/attention.cu` (one warp per row) and the delta pass the flash backward
//! shares with them.

use super::{grid, AttentionFloat, Kind};
use crate::attention::AttentionParams;
use crate::cuda::source::Module;
use crate::cuda::{launch, u32_arg, CudaDevice, DeviceBuffer, Result};
use cudarc::driver::{DeviceRepr, LaunchConfig};

/// Warps per block of the reference kernels, one row each (`WARPS` in attention.cu).
const WARPS: usize = 4;

/// attention.cu's `Attn` (reference kernels), passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct Attn {
    pub(super) n_heads: u32,
    pub(super) n_kv_heads: u32,
    pub(super) head_dim: u32,
    pub(super) window: u32,
    pub(super) scale: f32,
    pub(super) softcap: f32,
    pub(super) causal: i32,
    pub(super) tq: u32,
    pub(super) tk: u32,
}

// SAFETY: `repr(C)` with only 4-byte fields, in the order of attention.cu's `struct Attn`, so no padding differs.
unsafe impl DeviceRepr for Attn {}

/// The f32 reference forward: one warp per query row.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward<T: AttentionFloat>(
    dev: &CudaDevice,
    attn: &Attn,
    p: &AttentionParams,
    [q, k, v]: [&DeviceBuffer<T>; 3],
    [cu_q, cu_k]: [&DeviceBuffer<i32>; 2],
    max_seqlen_q: usize,
    n_seqs: usize,
    // Written by the kernel through their addresses (the caller holds them mutably).
    out: &DeviceBuffer<T>,
    lse: &DeviceBuffer<f32>,
) -> Result<()> {
    let (pq, pk, pv, pcq, pck, po, pl) = (q.ptr(), k.ptr(), v.ptr(), cu_q.ptr(), cu_k.ptr(), out.ptr(), lse.ptr());
    let cfg = grid(max_seqlen_q, WARPS, p.n_heads, n_seqs, 32 * WARPS, 0);
    // SAFETY: attention_forward_f32(const float* q, const float* k, const float* v, const int* cu_q, const int* cu_k,
    // float* out, float* lse, Attn a): q and out hold tq·n_heads·head_dim elements, k and v tk·n_kv_heads·head_dim,
    // lse tq·n_heads (asserted by the caller), cu_q and cu_k n_seqs + 1 (the grid's z); the kernel skips any sequence
    // whose offsets leave 0..tq or 0..tk, so no access leaves the buffers.
    unsafe { launch!(dev, Module::Attention, "attention_forward_f32", cfg; pq, pk, pv, pcq, pck, po, pl, *attn) }
}

/// delta = rowsum(dO ⊙ O) per (token, head): [rows] f32.
pub(super) fn launch_delta<T: AttentionFloat>(
    dev: &CudaDevice,
    out: &DeviceBuffer<T>,
    d_out: &DeviceBuffer<T>,
    delta: &DeviceBuffer<f32>,
    hd: u32,
) -> Result<()> {
    let kernel = match T::KIND {
        Kind::Reference => "attention_delta_f32",
        Kind::Flash(half) => half.pick("attention_delta_bf16", "attention_delta_f16"),
    };
    let rows = delta.len();
    let (po, pdo, pdelta, rows64) = (out.ptr(), d_out.ptr(), delta.ptr(), rows as u64);
    let cfg = LaunchConfig {
        grid_dim: (u32_arg("attention_backward: rows", rows.div_ceil(WARPS)), 1, 1),
        block_dim: (32 * WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: attention_delta_T(const T* out, const T* d_out, float* delta, u64 rows, unsigned hd): out and d_out
    // hold rows·hd elements (asserted by the caller), delta rows f32; on this device.
    unsafe { launch!(dev, Module::Attention, kernel, cfg; po, pdo, pdelta, rows64, hd) }
}

/// The f32 reference backward: dQ with one warp per query row, dK and dV with one per key row.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<T: AttentionFloat>(
    dev: &CudaDevice,
    attn: &Attn,
    p: &AttentionParams,
    [q, k, v, d_out]: [&DeviceBuffer<T>; 4],
    [lse, delta]: [&DeviceBuffer<f32>; 2],
    [cu_q, cu_k]: [&DeviceBuffer<i32>; 2],
    [max_seqlen_q, max_seqlen_k]: [usize; 2],
    // Written by the kernels through their addresses (the caller holds them mutably).
    [dq, dk, dv]: [&DeviceBuffer<T>; 3],
    n_seqs: usize,
) -> Result<()> {
    let (pq, pk, pv, pl, pdelta, pdo) = (q.ptr(), k.ptr(), v.ptr(), lse.ptr(), delta.ptr(), d_out.ptr());
    let (pcq, pck) = (cu_q.ptr(), cu_k.ptr());
    if max_seqlen_q > 0 && !dq.is_empty() {
        let (pdq, cfg) = (dq.ptr(), grid(max_seqlen_q, WARPS, p.n_heads, n_seqs, 32 * WARPS, 0));
        // SAFETY: attention_backward_dq_f32(q, k, v, lse, delta, d_out, cu_q, cu_k, float* dq, Attn a): q, d_out, dq
        // hold tq·n_heads·head_dim elements, k and v tk·n_kv_heads·head_dim, lse and delta tq·n_heads (asserted,
        // allocated); sequences outside the buffers are skipped by the kernel; on this device.
        unsafe {
            launch!(dev, Module::Attention, "attention_backward_dq_f32", cfg; pq, pk, pv, pl, pdelta, pdo, pcq, pck, pdq, *attn)
        }?;
    }
    if max_seqlen_k > 0 && !dk.is_empty() {
        let (pdk, pdv, cfg) = (dk.ptr(), dv.ptr(), grid(max_seqlen_k, WARPS, p.n_kv_heads, n_seqs, 32 * WARPS, 0));
        // SAFETY: attention_backward_dkdv_f32(q, k, v, lse, delta, d_out, cu_q, cu_k, float* dk, float* dv, Attn a):
        // as for dq, with dk and dv holding tk·n_kv_heads·head_dim elements (asserted); on this device.
        unsafe {
            launch!(dev, Module::Attention, "attention_backward_dkdv_f32", cfg; pq, pk, pv, pl, pdelta, pdo, pcq, pck, pdk, pdv, *attn)
        }?;
    }
    Ok(())
}
