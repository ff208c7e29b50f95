//! Launchers of `kernels/cuda/attention.cu`, twins of [`crate::attention`] with the same [`AttentionParams`]. lse is
//! always f32 on the device: backward recomputes every probability as exp(s − lse), which a bf16 lse would skew.
//!
//! The host passes the longest query and key sequence so that grids are sized without reading `cu_seqlens` back;
//! they must be at least every sequence's lengths, and `cu_seqlens` must be what the CPU twin asserts (starting at
//! 0, non-decreasing, ending at the token counts). A row that those miss is left unwritten; a sequence whose offsets
//! fall outside the buffers is skipped by the kernels rather than read or written out of bounds.

use super::source::Module;
use super::{launched, same_device, u32_arg, DeviceBuffer, GpuFloat, Result};
use crate::attention::AttentionParams;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

/// The largest head_dim the kernels take (`MAX_HEAD_DIM` in attention.cu): each lane keeps head_dim/32 elements of a
/// few rows in registers.
pub const MAX_HEAD_DIM: usize = 256;
/// Warps per block, one row each (`WARPS` in attention.cu).
const WARPS: usize = 4;

/// attention.cu's `Attn`, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct Attn {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    window: u32,
    scale: f32,
    softcap: f32,
    causal: i32,
    tq: u32,
    tk: u32,
}

// SAFETY: `repr(C)` with only 4-byte fields, in the order of attention.cu's `struct Attn`, so no padding differs.
unsafe impl DeviceRepr for Attn {}

/// Asserts what the CPU twin asserts of the parameters and the buffer sizes; returns the kernel's view and the
/// (query, key) token counts.
fn geometry(p: &AttentionParams, q_len: usize, k_len: usize, n_cu: usize, n_cu_k: usize) -> (Attn, usize, usize) {
    assert!(
        p.n_kv_heads > 0 && p.n_heads > 0 && p.n_heads % p.n_kv_heads == 0,
        "n_heads {} must be a positive multiple of n_kv_heads {}",
        p.n_heads,
        p.n_kv_heads
    );
    assert!(p.head_dim > 0 && p.head_dim <= MAX_HEAD_DIM, "head_dim {} must be in 1..={MAX_HEAD_DIM}", p.head_dim);
    assert!(p.sliding_window != Some(0), "a sliding window of 0 hides every key");
    if let Some(cap) = p.softcap {
        assert!(cap > 0.0, "softcap {cap} must be positive");
    }
    assert_eq!(n_cu, n_cu_k, "cu_seqlens_q and cu_seqlens_k must describe the same number of sequences");
    assert!(n_cu >= 1, "cu_seqlens must hold at least the leading 0");
    let (q_row, k_row) = (p.n_heads * p.head_dim, p.n_kv_heads * p.head_dim);
    assert_eq!(q_len % q_row, 0, "q length {q_len} is not tokens·n_heads·head_dim");
    assert_eq!(k_len % k_row, 0, "k length {k_len} is not tokens·n_kv_heads·head_dim");
    let (tq, tk) = (q_len / q_row, k_len / k_row);
    let attn = Attn {
        n_heads: u32_arg("attention: n_heads", p.n_heads),
        n_kv_heads: u32_arg("attention: n_kv_heads", p.n_kv_heads),
        head_dim: p.head_dim as u32,
        window: p.sliding_window.map_or(0, |w| u32::try_from(w).unwrap_or(u32::MAX)),
        scale: p.scale as f32,
        softcap: p.softcap.map_or(0.0, |c| c as f32),
        causal: p.causal as i32,
        tq: u32_arg("attention: query tokens", tq),
        tk: u32_arg("attention: key tokens", tk),
    };
    (attn, tq, tk)
}

/// (⌈rows / WARPS⌉, heads, sequences) blocks of WARPS warps.
fn grid(max_rows: usize, heads: usize, n_seqs: usize) -> LaunchConfig {
    assert!(n_seqs <= 65_535 && heads <= 65_535, "attention: {n_seqs} sequences or {heads} heads exceed a grid");
    LaunchConfig {
        grid_dim: (u32_arg("attention: longest sequence", max_rows.div_ceil(WARPS)), heads as u32, n_seqs as u32),
        block_dim: (32 * WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// q: [tq, n_heads, head_dim], k, v: [tk, n_kv_heads, head_dim], cu_seqlens_q/k: [n_seqs + 1] → out: [tq, n_heads,
/// head_dim], lse: [tq, n_heads] f32 (−∞ with a zero row for a query that sees no key)
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<T: GpuFloat>(
    p: &AttentionParams,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    cu_seqlens_q: &DeviceBuffer<i32>,
    cu_seqlens_k: &DeviceBuffer<i32>,
    max_seqlen_q: usize,
    // Keys do not size the forward grid: each query's warp walks its sequence's keys.
    _max_seqlen_k: usize,
    out: &mut DeviceBuffer<T>,
    lse: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let (attn, tq, _) = geometry(p, q.len(), k.len(), cu_seqlens_q.len(), cu_seqlens_k.len());
    assert_eq!(v.len(), k.len(), "attention_forward: v length vs k");
    assert_eq!(out.len(), q.len(), "attention_forward: out length vs q");
    assert_eq!(lse.len(), tq * p.n_heads, "attention_forward: lse length");
    let dev = same_device(
        "attention_forward",
        &[q.device(), k.device(), v.device(), cu_seqlens_q.device(), cu_seqlens_k.device(), out.device(), lse.device()],
    );
    let n_seqs = cu_seqlens_q.len() - 1;
    if n_seqs == 0 || max_seqlen_q == 0 || out.is_empty() {
        return Ok(());
    }
    let kernel = T::pick("attention_forward_f32", "attention_forward_bf16");
    let f = dev.function(Module::Attention, kernel)?;
    let (pq, pk, pv, pcq, pck, po, pl) =
        (q.ptr(), k.ptr(), v.ptr(), cu_seqlens_q.ptr(), cu_seqlens_k.ptr(), out.ptr(), lse.ptr());
    // SAFETY: attention_forward_T(const T* q, const T* k, const T* v, const int* cu_q, const int* cu_k, T* out,
    // float* lse, Attn a): q and out hold tq·n_heads·head_dim elements, k and v tk·n_kv_heads·head_dim, lse
    // tq·n_heads (asserted), cu_q and cu_k n_seqs + 1 (the grid's z); the kernel skips any sequence whose offsets
    // leave 0..tq or 0..tk, so no access leaves the buffers; all on this device.
    launched(kernel, unsafe {
        dev.stream()
            .launch_builder(f)
            .arg(&pq)
            .arg(&pk)
            .arg(&pv)
            .arg(&pcq)
            .arg(&pck)
            .arg(&po)
            .arg(&pl)
            .arg(&attn)
            .launch(grid(max_seqlen_q, p.n_heads, n_seqs))
    })
}

/// Gradients of [`attention_forward`] from its out and lse and d_out: [tq, n_heads, head_dim] → dq: [tq, n_heads,
/// head_dim], dk, dv: [tk, n_kv_heads, head_dim] (all written; GQA sums over the query heads sharing a KV head)
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: GpuFloat>(
    p: &AttentionParams,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    out: &DeviceBuffer<T>,
    lse: &DeviceBuffer<f32>,
    d_out: &DeviceBuffer<T>,
    cu_seqlens_q: &DeviceBuffer<i32>,
    cu_seqlens_k: &DeviceBuffer<i32>,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    dq: &mut DeviceBuffer<T>,
    dk: &mut DeviceBuffer<T>,
    dv: &mut DeviceBuffer<T>,
) -> Result<()> {
    let (attn, tq, _) = geometry(p, q.len(), k.len(), cu_seqlens_q.len(), cu_seqlens_k.len());
    for (name, x) in [("out", out), ("d_out", d_out), ("dq", &*dq)] {
        assert_eq!(x.len(), q.len(), "attention_backward: {name} length vs q");
    }
    for (name, x) in [("v", v), ("dk", &*dk), ("dv", &*dv)] {
        assert_eq!(x.len(), k.len(), "attention_backward: {name} length vs k");
    }
    assert_eq!(lse.len(), tq * p.n_heads, "attention_backward: lse length");
    let dev = same_device(
        "attention_backward",
        &[
            q.device(),
            k.device(),
            v.device(),
            out.device(),
            lse.device(),
            d_out.device(),
            cu_seqlens_q.device(),
            cu_seqlens_k.device(),
            dq.device(),
            dk.device(),
            dv.device(),
        ],
    );
    let n_seqs = cu_seqlens_q.len() - 1;
    if n_seqs == 0 {
        return Ok(());
    }
    let rows = tq * p.n_heads;
    let delta = dev.alloc::<f32>(rows)?;
    let (pq, pk, pv, po, pl, pdo) = (q.ptr(), k.ptr(), v.ptr(), out.ptr(), lse.ptr(), d_out.ptr());
    let (pcq, pck, pdelta) = (cu_seqlens_q.ptr(), cu_seqlens_k.ptr(), delta.ptr());
    if rows > 0 {
        let kernel = T::pick("attention_delta_f32", "attention_delta_bf16");
        let f = dev.function(Module::Attention, kernel)?;
        let (rows64, hd) = (rows as u64, attn.head_dim);
        let cfg = LaunchConfig {
            grid_dim: (u32_arg("attention_backward: rows", rows.div_ceil(WARPS)), 1, 1),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: attention_delta_T(const T* out, const T* d_out, float* delta, u64 rows, unsigned hd): out and
        // d_out hold rows·hd elements (asserted), delta rows f32 (allocated above); on this device.
        launched(kernel, unsafe {
            dev.stream().launch_builder(f).arg(&po).arg(&pdo).arg(&pdelta).arg(&rows64).arg(&hd).launch(cfg)
        })?;
    }
    if max_seqlen_q > 0 && rows > 0 {
        let kernel = T::pick("attention_backward_dq_f32", "attention_backward_dq_bf16");
        let f = dev.function(Module::Attention, kernel)?;
        let pdq = dq.ptr();
        // SAFETY: attention_backward_dq_T(const T* q, const T* k, const T* v, const float* lse, const float* delta,
        // const T* d_out, const int* cu_q, const int* cu_k, T* dq, Attn a): q, d_out, dq hold tq·n_heads·head_dim
        // elements, k and v tk·n_kv_heads·head_dim, lse and delta tq·n_heads (asserted, allocated); sequences
        // outside the buffers are skipped by the kernel; on this device.
        launched(kernel, unsafe {
            dev.stream()
                .launch_builder(f)
                .arg(&pq)
                .arg(&pk)
                .arg(&pv)
                .arg(&pl)
                .arg(&pdelta)
                .arg(&pdo)
                .arg(&pcq)
                .arg(&pck)
                .arg(&pdq)
                .arg(&attn)
                .launch(grid(max_seqlen_q, p.n_heads, n_seqs))
        })?;
    }
    if max_seqlen_k > 0 && !dk.is_empty() {
        let kernel = T::pick("attention_backward_dkdv_f32", "attention_backward_dkdv_bf16");
        let f = dev.function(Module::Attention, kernel)?;
        let (pdk, pdv) = (dk.ptr(), dv.ptr());
        // SAFETY: attention_backward_dkdv_T(q, k, v, lse, delta, d_out, cu_q, cu_k, T* dk, T* dv, Attn a): as for
        // dq, with dk and dv holding tk·n_kv_heads·head_dim elements (asserted); on this device.
        launched(kernel, unsafe {
            dev.stream()
                .launch_builder(f)
                .arg(&pq)
                .arg(&pk)
                .arg(&pv)
                .arg(&pl)
                .arg(&pdelta)
                .arg(&pdo)
                .arg(&pcq)
                .arg(&pck)
                .arg(&pdk)
                .arg(&pdv)
                .arg(&attn)
                .launch(grid(max_seqlen_k, p.n_kv_heads, n_seqs))
        })?;
    }
    Ok(())
}
