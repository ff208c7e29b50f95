//! Launchers of the attention kernels, twins of [`crate::attention`] with the same [`AttentionParams`]: bf16 and f16
//! run the tensor-core flash kernels, f32 the warp-per-row reference kernels of `kernels/cuda/attention.cu`. lse is
//! always f32 on the device: backward recomputes every probability as exp(s − lse), which a bf16 lse would skew.
//!
//! Two families of flash kernels, one module per padded head_dim each: the mma.sync ones
//! (`kernels/cuda/flash_attention.cuh`, table `FLASH`) run on every GPU from sm_80 on; on Hopper (target sm_90a)
//! the wgmma ones (`kernels/cuda/flash_attention_sm90*.cuh`, table `FLASH_SM90`) take the head dims they serve, and
//! the mma.sync ones the rest ([`flash_kernels`] decides). [`FlashPath::Portable`] forces the mma.sync kernels, so
//! that tests and benchmarks cover them on Hopper too.
//!
//! Decoding (at most [`DECODE_MAX_QUERIES`] queries per sequence against a KV cache) runs the split-KV kernels of
//! `kernels/cuda/decode_attention.cu` instead along [`FlashPath::Fastest`] (`decode.rs`): same semantics and outputs,
//! the keys split over enough blocks to fill the GPU. [`FlashPath::FastestFlash`] keeps the flash kernels there, for
//! comparison; [`ForwardKernels::Decode`] forces the decode kernels and their number of splits.
//!
//! The host passes the longest query and key sequence so that grids are sized without reading `cu_seqlens` back;
//! they must be at least every sequence's lengths, and `cu_seqlens` must be what the CPU twin asserts (starting at
//! 0, non-decreasing, ending at the token counts). A row that those miss is left unwritten; a sequence whose offsets
//! fall outside the buffers is skipped by the kernels rather than read or written out of bounds.
//!
//! The flash backward adds dQ from every key tile into an f32 accumulator with `red.global.add`, so the order of
//! those additions (and dQ's last bits) can differ run to run; dK and dV are summed in registers in a fixed order.

mod decode;
mod flash;
mod passes;
mod reference;
mod tables;

pub use decode::{decode_plan, DecodePlan, DECODE_MAX_QUERIES};
pub use tables::{flash_kernels, FlashKernel, FlashPath};

use super::{same_device, u32_arg, DeviceBuffer, DeviceCopy, Result};
use crate::attention::AttentionParams;
use cudarc::driver::LaunchConfig;
use flash::FlashParams;
use half::{bf16, f16};
use reference::Attn;

/// The largest head_dim the kernels take: the flash kernels' largest padded head_dim, and `MAX_HEAD_DIM` in
/// attention.cu (each lane keeps head_dim/32 elements of a few rows in registers).
pub const MAX_HEAD_DIM: usize = 256;

/// The element types attention takes, and which kernels they run.
pub trait AttentionFloat: DeviceCopy {
    /// Which kernels serve this type: f32 the reference ones, the 16-bit types the flash kernels (by name suffix).
    const KIND: Kind;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Reference,
    Flash(Half),
}

/// The 16-bit type of a flash launch: picks the `_bf16` or `_f16` entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    Bf16,
    F16,
}

impl Half {
    fn pick(self, bf16: &'static str, f16: &'static str) -> &'static str {
        match self {
            Half::Bf16 => bf16,
            Half::F16 => f16,
        }
    }
}

impl AttentionFloat for f32 {
    const KIND: Kind = Kind::Reference;
}
impl AttentionFloat for bf16 {
    const KIND: Kind = Kind::Flash(Half::Bf16);
}
impl AttentionFloat for f16 {
    const KIND: Kind = Kind::Flash(Half::F16);
}

/// Asserts what the CPU twin asserts of the parameters and the buffer sizes; returns the reference kernels' view,
/// the flash kernels' (addresses left 0) and the (query, key) token counts.
fn geometry(p: &AttentionParams, q_len: usize, k_len: usize, n_cu: usize, n_cu_k: usize) -> (Attn, FlashParams, usize) {
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
    let (tq32, tk32) = (u32_arg("attention: query tokens", tq), u32_arg("attention: key tokens", tk));
    // A window wider than any query-key distance hides nothing; clamping it keeps the kernels' int arithmetic exact.
    let window = p.sliding_window.map_or(0, |w| w.min(tq + tk + 1));
    let attn = Attn {
        n_heads: u32_arg("attention: n_heads", p.n_heads),
        n_kv_heads: u32_arg("attention: n_kv_heads", p.n_kv_heads),
        head_dim: p.head_dim as u32,
        window: u32_arg("attention: window", window),
        scale: p.scale as f32,
        softcap: p.softcap.map_or(0.0, |c| c as f32),
        causal: p.causal as i32,
        tq: tq32,
        tk: tk32,
    };
    let flash = FlashParams {
        n_heads: attn.n_heads,
        n_kv_heads: attn.n_kv_heads,
        head_dim: attn.head_dim,
        window: i32::try_from(window)
            .unwrap_or_else(|_| panic!("attention: window {window} exceeds the kernels' range")),
        scale: attn.scale,
        softcap: attn.softcap,
        causal: attn.causal,
        tq: tq32,
        tk: tk32,
        ..FlashParams::default()
    };
    (attn, flash, tq)
}

/// (⌈rows / per_block⌉, heads, sequences) blocks of `threads`, with `smem` bytes of dynamic shared memory.
fn grid(rows: usize, per_block: usize, heads: usize, n_seqs: usize, threads: usize, smem: usize) -> LaunchConfig {
    assert!(n_seqs <= 65_535 && heads <= 65_535, "attention: {n_seqs} sequences or {heads} heads exceed a grid");
    LaunchConfig {
        grid_dim: (u32_arg("attention: longest sequence", rows.div_ceil(per_block)), heads as u32, n_seqs as u32),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// q: [tq, n_heads, head_dim], k, v: [tk, n_kv_heads, head_dim], cu_seqlens: [n_seqs + 1] each and max_seqlen, of
/// (queries, keys) → out: [tq, n_heads, head_dim], lse: [tq, n_heads] f32 (−∞ with a zero row for a query that sees
/// no key)
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<T: AttentionFloat>(
    p: &AttentionParams,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    cu_seqlens: [&DeviceBuffer<i32>; 2],
    max_seqlen: [usize; 2],
    out: &mut DeviceBuffer<T>,
    lse: &mut DeviceBuffer<f32>,
) -> Result<()> {
    attention_forward_with(FlashPath::Fastest, p, q, k, v, cu_seqlens, max_seqlen, out, lse)
}

/// [`attention_forward`] on the kernels `kernels` picks (f32 ignores it; a [`FlashPath`] picks flash kernels):
/// cu_seqlens and max_seqlen are (queries, keys).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_with<T: AttentionFloat>(
    kernels: impl Into<ForwardKernels>,
    p: &AttentionParams,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    [cu_seqlens_q, cu_seqlens_k]: [&DeviceBuffer<i32>; 2],
    max_seqlen: [usize; 2],
    out: &mut DeviceBuffer<T>,
    lse: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let kernels = kernels.into().resolve(T::KIND, max_seqlen[0]);
    let (attn, mut flash, tq) = geometry(p, q.len(), k.len(), cu_seqlens_q.len(), cu_seqlens_k.len());
    assert_eq!(v.len(), k.len(), "attention_forward: v length vs k");
    assert_eq!(out.len(), q.len(), "attention_forward: out length vs q");
    assert_eq!(lse.len(), tq * p.n_heads, "attention_forward: lse length");
    let dev = same_device(
        "attention_forward",
        &[q.device(), k.device(), v.device(), cu_seqlens_q.device(), cu_seqlens_k.device(), out.device(), lse.device()],
    );
    let n_seqs = cu_seqlens_q.len() - 1;
    let max_seqlen_q = max_seqlen[0];
    if n_seqs == 0 || max_seqlen_q == 0 || out.is_empty() {
        return Ok(());
    }
    let half = match T::KIND {
        Kind::Reference => {
            let cu = [cu_seqlens_q, cu_seqlens_k];
            return reference::forward(dev, &attn, p, [q, k, v], cu, max_seqlen_q, n_seqs, out, lse);
        }
        Kind::Flash(half) => half,
    };
    (flash.q, flash.k, flash.v, flash.out, flash.lse) = (q.ptr(), k.ptr(), v.ptr(), out.ptr(), lse.ptr());
    (flash.cu_q, flash.cu_k) = (cu_seqlens_q.ptr(), cu_seqlens_k.ptr());
    match kernels {
        ForwardKernels::Decode(splits) => decode::launch(dev, flash, half, p, max_seqlen, n_seqs, splits),
        // Keys do not size the flash forward's grid: each query block walks its sequence's keys.
        ForwardKernels::Flash(path) => {
            let [kernel, _] = flash_kernels(dev.target(), path, p.head_dim, half);
            let (kernel, maps) = with_maps(kernel, &flash, half, || {
                flash_kernels(dev.target(), FlashPath::Portable, p.head_dim, half)[0]
            })?;
            flash::launch(dev, kernel, flash, maps, max_seqlen_q, p.n_heads, n_seqs)
        }
    }
}

/// `kernel` with the TMA descriptors of `flash`'s buffers where it loads by TMA, or `portable()` (its mma.sync twin)
/// where TMA cannot address them (misaligned rows or views).
fn with_maps(
    kernel: FlashKernel,
    flash: &FlashParams,
    half: Half,
    portable: impl FnOnce() -> FlashKernel,
) -> Result<(FlashKernel, Option<flash::FlashMaps>)> {
    let Some(boxes) = kernel.tma else { return Ok((kernel, None)) };
    Ok(match flash::tensor_maps(flash, half, boxes)? {
        Some(maps) => (kernel, Some(maps)),
        None => (portable(), None),
    })
}

/// Which kernels a bf16 or f16 forward runs (f32 runs the reference ones whatever this says).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardKernels {
    /// The flash kernels the path picks; [`FlashPath::Fastest`] runs the decode kernels where they serve.
    Flash(FlashPath),
    /// The split-KV decode kernels, which take bf16 and f16 sequences of at most [`DECODE_MAX_QUERIES`] queries
    /// (max_seqlen\[0\]): None lets the launcher choose the splits, as [`FlashPath::Fastest`] does; Some(n) makes n
    /// splits of every block's keys (Some(1): no combine pass), so that tests reach both.
    Decode(Option<usize>),
}

impl From<FlashPath> for ForwardKernels {
    fn from(path: FlashPath) -> ForwardKernels {
        ForwardKernels::Flash(path)
    }
}

impl ForwardKernels {
    /// The kernels a launch of `kind` with at most `max_seqlen_q` queries a sequence runs: Fastest's choice made,
    /// and decode kernels asked for by name checked against what they take.
    fn resolve(self, kind: Kind, max_seqlen_q: usize) -> ForwardKernels {
        match self {
            ForwardKernels::Flash(FlashPath::Fastest) if max_seqlen_q <= DECODE_MAX_QUERIES => {
                ForwardKernels::Decode(None)
            }
            ForwardKernels::Decode(splits) => {
                assert!(matches!(kind, Kind::Flash(_)), "attention_forward_with: the decode kernels take bf16 and f16");
                assert!(
                    max_seqlen_q <= DECODE_MAX_QUERIES,
                    "attention_forward_with: {max_seqlen_q} queries in a sequence, more than {DECODE_MAX_QUERIES}"
                );
                assert!(splits != Some(0), "attention_forward_with: zero splits");
                self
            }
            flash => flash,
        }
    }
}

/// Gradients of [`attention_forward`] from its out and lse and d_out: [tq, n_heads, head_dim], with cu_seqlens and
/// max_seqlen as there → dq: [tq, n_heads, head_dim], dk, dv: [tk, n_kv_heads, head_dim] (all written; GQA sums over
/// the query heads sharing a KV head)
pub fn attention_backward<T: AttentionFloat>(
    p: &AttentionParams,
    [q, k, v]: [&DeviceBuffer<T>; 3],
    [out, d_out]: [&DeviceBuffer<T>; 2],
    lse: &DeviceBuffer<f32>,
    cu_seqlens: [&DeviceBuffer<i32>; 2],
    max_seqlen: [usize; 2],
    grads: [&mut DeviceBuffer<T>; 3],
) -> Result<()> {
    attention_backward_with(FlashPath::Fastest, p, [q, k, v], [out, d_out], lse, cu_seqlens, max_seqlen, grads)
}

/// [`attention_backward`] on the flash kernels `path` picks (f32 ignores it): [q, k, v], [out, d_out], lse,
/// cu_seqlens and max_seqlen (queries, keys) → [dq, dk, dv].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_with<T: AttentionFloat>(
    path: FlashPath,
    p: &AttentionParams,
    [q, k, v]: [&DeviceBuffer<T>; 3],
    [out, d_out]: [&DeviceBuffer<T>; 2],
    lse: &DeviceBuffer<f32>,
    [cu_seqlens_q, cu_seqlens_k]: [&DeviceBuffer<i32>; 2],
    [max_seqlen_q, max_seqlen_k]: [usize; 2],
    [dq, dk, dv]: [&mut DeviceBuffer<T>; 3],
) -> Result<()> {
    let (attn, mut flash, tq) = geometry(p, q.len(), k.len(), cu_seqlens_q.len(), cu_seqlens_k.len());
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
    let half = match T::KIND {
        Kind::Reference => {
            if rows > 0 {
                reference::launch_delta(dev, out, d_out, &delta, attn.head_dim)?;
            }
            let (cu, max_seqlen) = ([cu_seqlens_q, cu_seqlens_k], [max_seqlen_q, max_seqlen_k]);
            return reference::backward(
                dev,
                &attn,
                p,
                [q, k, v, d_out],
                [lse, &delta],
                cu,
                max_seqlen,
                [dq, dk, dv],
                n_seqs,
            );
        }
        Kind::Flash(half) => half,
    };
    let [_, kernel] = flash_kernels(dev.target(), path, p.head_dim, half);
    let mut dq_accum = dev.alloc::<f32>(q.len())?;
    if rows > 0 {
        passes::delta_and_zero(dev, half, out, d_out, &delta, &mut dq_accum, attn.head_dim)?;
    }
    (flash.q, flash.k, flash.v, flash.out, flash.lse, flash.d_out) =
        (q.ptr(), k.ptr(), v.ptr(), out.ptr(), lse.ptr(), d_out.ptr());
    (flash.delta, flash.dq_accum, flash.dk, flash.dv) = (delta.ptr(), dq_accum.ptr(), dk.ptr(), dv.ptr());
    (flash.cu_q, flash.cu_k) = (cu_seqlens_q.ptr(), cu_seqlens_k.ptr());
    if max_seqlen_k > 0 && !dk.is_empty() {
        let (mut kernel, maps) =
            with_maps(kernel, &flash, half, || flash_kernels(dev.target(), FlashPath::Portable, p.head_dim, half)[1])?;
        // Every sequence at the longest lengths (the rows add up to n_seqs × the longest): decided here, as the
        // lengths themselves stay on the device.
        let equal = n_seqs * max_seqlen_q == flash.tq as usize && n_seqs * max_seqlen_k == flash.tk as usize;
        if equal {
            kernel = kernel.for_equal_sequences();
        }
        flash::launch(dev, kernel, flash, maps, max_seqlen_k, p.n_kv_heads, n_seqs)?;
    }
    // No key: every dq row is zero (the accumulator as zeroed); dk and dv are empty.
    if dq.is_empty() {
        return Ok(());
    }
    passes::convert_dq(dev, half, &dq_accum, &*dq)
}
