//! Launchers of the attention kernels, twins of [`crate::attention`] with the same [`AttentionParams`]: bf16 and f16
//! run the tensor-core flash kernels, f32 the warp-per-row reference kernels of `kernels/cuda/attention.cu`. lse is
//! always f32 on the device: backward recomputes every probability as exp(s − lse), which a bf16 lse would skew.
//!
//! Two families of flash kernels, one module per padded head_dim each: the mma.sync ones
//! (`kernels/cuda/flash_attention.cuh`, table `FLASH`) run on every GPU from sm_80 on; on Hopper (target sm_90a)
//! the wgmma ones (`kernels/cuda/flash_attention_sm90.cuh`, table `FLASH_SM90`) take the head dims they serve, and
//! the mma.sync ones the rest ([`flash_kernels`] decides). [`FlashPath::Portable`] forces the mma.sync kernels, so
//! that tests and benchmarks cover them on Hopper too.
//!
//! The host passes the longest query and key sequence so that grids are sized without reading `cu_seqlens` back;
//! they must be at least every sequence's lengths, and `cu_seqlens` must be what the CPU twin asserts (starting at
//! 0, non-decreasing, ending at the token counts). A row that those miss is left unwritten; a sequence whose offsets
//! fall outside the buffers is skipped by the kernels rather than read or written out of bounds.
//!
//! The flash backward adds dQ from every key tile into an f32 accumulator with `red.global.add`, so the order of
//! those additions (and dQ's last bits) can differ run to run; dK and dV are summed in registers in a fixed order.

use super::compile::Target;
use super::source::Module;
use super::{config, grid_for, launch, same_device, u32_arg, CudaDevice, DeviceBuffer, DeviceCopy, Result};
use crate::attention::AttentionParams;
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{DeviceRepr, LaunchConfig};
use half::{bf16, f16};

/// The largest head_dim the kernels take: the flash kernels' largest padded head_dim, and `MAX_HEAD_DIM` in
/// attention.cu (each lane keeps head_dim/32 elements of a few rows in registers).
pub const MAX_HEAD_DIM: usize = 256;
/// Warps per block of the reference kernels, one row each (`WARPS` in attention.cu).
const WARPS: usize = 4;

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

/// attention.cu's `Attn` (reference kernels), passed by value.
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

/// flash_attention.cuh's `FlashParams`, passed by value: the buffers' device addresses and the geometry.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FlashParams {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    lse: u64,
    d_out: u64,
    delta: u64,
    dq_accum: u64,
    dk: u64,
    dv: u64,
    cu_q: u64,
    cu_k: u64,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    window: i32,
    scale: f32,
    softcap: f32,
    causal: i32,
    tq: u32,
    tk: u32,
    pad: u32,
}

// SAFETY: `repr(C)`: twelve 8-byte addresses then ten 4-byte fields, in the order of flash_attention.cuh's
// `struct FlashParams`, whose natural layout is the same (136 bytes, no interior padding).
unsafe impl DeviceRepr for FlashParams {}

/// Which flash kernels serve a bf16 or f16 launch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlashPath {
    /// The fastest the device has for the head_dim: on an sm_90a target the wgmma kernel of `FLASH_SM90` where one
    /// serves it, else the mma.sync kernel of `FLASH`.
    #[default]
    Fastest,
    /// The mma.sync kernels of `FLASH` on every device (what GPUs other than Hopper run).
    Portable,
}

/// One flash kernel as launched: its entry point, the rows of the grid's x dimension each block takes (query rows
/// in the forward, keys in the backward), and its block size and dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashKernel {
    pub module: Module,
    pub name: &'static str,
    rows: usize,
    threads: usize,
    smem: usize,
}

/// The forward and backward kernels of a bf16 (`half` Bf16) or f16 launch at `head_dim` (checked against
/// [`MAX_HEAD_DIM`] by the launchers) on a device compiled for `target`.
pub fn flash_kernels(target: Target, path: FlashPath, head_dim: usize, half: Half) -> [FlashKernel; 2] {
    let portable = Flash::for_head_dim(head_dim);
    let fastest = path == FlashPath::Fastest;
    match FLASH_SM90.iter().find(|f| fastest && f.module.compiles_for(target) && f.serves(head_dim)) {
        Some(f) => [f.forward_kernel(half), f.backward_kernel(half).unwrap_or_else(|| portable.backward_kernel(half))],
        None => [portable.forward_kernel(half), portable.backward_kernel(half)],
    }
}

/// A block shape: query rows × key rows per block, and warps.
#[derive(Clone, Copy, Debug)]
struct Tile {
    bm: usize,
    bn: usize,
    warps: usize,
}

/// The mma.sync kernels of one padded head_dim (the tiles written in `kernels/cuda/flash_attention_d<D>.cu`).
struct Flash {
    d: usize,
    module: Module,
    forward: [&'static str; 2],
    backward: [&'static str; 2],
    fwd: Tile,
    bwd: Tile,
}

impl Flash {
    /// The smallest padded head_dim that holds `head_dim`.
    fn for_head_dim(head_dim: usize) -> &'static Flash {
        FLASH.iter().find(|f| head_dim <= f.d).expect("head_dim checked against MAX_HEAD_DIM")
    }

    /// flash_forward's dynamic shared memory: Q, K and V tiles of rows D + 8 elements.
    fn forward_smem(&self) -> usize {
        (self.fwd.bm + 2 * self.fwd.bn) * (self.d + 8) * 2
    }

    /// flash_backward's: K, V, two stages of Q and dO, P and dS [BN][BM + 8], two stages of lse and delta.
    fn backward_smem(&self) -> usize {
        let Tile { bm, bn, .. } = self.bwd;
        (2 * bn + 4 * bm) * (self.d + 8) * 2 + 2 * bn * (bm + 8) * 2 + 4 * bm * 4
    }

    fn forward_kernel(&self, half: Half) -> FlashKernel {
        let (name, rows, threads) = (half.pick(self.forward[0], self.forward[1]), self.fwd.bm, 32 * self.fwd.warps);
        FlashKernel { module: self.module, name, rows, threads, smem: self.forward_smem() }
    }

    fn backward_kernel(&self, half: Half) -> FlashKernel {
        let (name, rows, threads) = (half.pick(self.backward[0], self.backward[1]), self.bwd.bn, 32 * self.bwd.warps);
        FlashKernel { module: self.module, name, rows, threads, smem: self.backward_smem() }
    }
}

const fn tile(bm: usize, bn: usize, warps: usize) -> Tile {
    Tile { bm, bn, warps }
}

static FLASH: [Flash; 6] = [
    Flash {
        d: 32,
        module: Module::FlashD32,
        forward: ["flash_forward_d32_bf16", "flash_forward_d32_f16"],
        backward: ["flash_backward_d32_bf16", "flash_backward_d32_f16"],
        fwd: tile(128, 64, 4),
        bwd: tile(64, 64, 4),
    },
    Flash {
        d: 64,
        module: Module::FlashD64,
        forward: ["flash_forward_d64_bf16", "flash_forward_d64_f16"],
        backward: ["flash_backward_d64_bf16", "flash_backward_d64_f16"],
        fwd: tile(128, 64, 4),
        bwd: tile(64, 64, 4),
    },
    Flash {
        d: 80,
        module: Module::FlashD80,
        forward: ["flash_forward_d80_bf16", "flash_forward_d80_f16"],
        backward: ["flash_backward_d80_bf16", "flash_backward_d80_f16"],
        fwd: tile(64, 64, 4),
        bwd: tile(64, 128, 8),
    },
    Flash {
        d: 96,
        module: Module::FlashD96,
        forward: ["flash_forward_d96_bf16", "flash_forward_d96_f16"],
        backward: ["flash_backward_d96_bf16", "flash_backward_d96_f16"],
        fwd: tile(64, 64, 4),
        bwd: tile(64, 128, 8),
    },
    Flash {
        d: 128,
        module: Module::FlashD128,
        forward: ["flash_forward_d128_bf16", "flash_forward_d128_f16"],
        backward: ["flash_backward_d128_bf16", "flash_backward_d128_f16"],
        fwd: tile(64, 64, 4),
        bwd: tile(64, 64, 8),
    },
    Flash {
        d: 256,
        module: Module::FlashD256,
        forward: ["flash_forward_d256_bf16", "flash_forward_d256_f16"],
        backward: ["flash_backward_d256_bf16", "flash_backward_d256_f16"],
        fwd: tile(64, 64, 4),
        bwd: tile(64, 64, 8),
    },
];

/// A Hopper forward's block: NWG warpgroups of 64 query rows over tiles of BN keys, as one of
/// flash_attention_sm90.cuh's two templates lays it out.
#[derive(Clone, Copy, Debug)]
enum Sm90Forward {
    /// `flash_forward_sm90_ws<T, D, BN, NWG, PING_PONG, 48>`: NWG consumer warpgroups fed by one producer warpgroup
    /// that keeps 48 registers; shared memory `Sm90ForwardWsSmem` (Q, two K and two V stages, 1 KB of alignment
    /// slack, the mbarriers).
    WarpSpecialized { bn: usize, nwg: usize, ping_pong: bool },
    /// `flash_forward_sm90<T, D, BN, NWG, OVERLAP>`: every thread loads; shared memory `Sm90ForwardSmem` (the same
    /// tiles, no mbarriers).
    AllLoad { bn: usize, nwg: usize, overlap: bool },
}

impl Sm90Forward {
    /// (the template call the .cu writes, `{T}` standing for the element type; threads; shared memory) at head_dim `d`.
    fn shape(self, d: usize) -> (String, usize, usize) {
        match self {
            Sm90Forward::WarpSpecialized { bn, nwg, ping_pong } => (
                format!("flash_forward_sm90_ws<{{T}}, {d}, {bn}, {nwg}, {ping_pong}, 48>"),
                128 * (nwg + 1),
                (64 * nwg + 4 * bn) * d * 2 + 1024 + 128,
            ),
            Sm90Forward::AllLoad { bn, nwg, overlap } => (
                format!("flash_forward_sm90<{{T}}, {d}, {bn}, {nwg}, {overlap}>"),
                128 * nwg,
                (64 * nwg + 4 * bn) * d * 2 + 1024,
            ),
        }
    }

    fn rows(self) -> usize {
        match self {
            Sm90Forward::WarpSpecialized { nwg, .. } | Sm90Forward::AllLoad { nwg, .. } => 64 * nwg,
        }
    }
}

/// The wgmma kernels of one padded head_dim (`kernels/cuda/flash_attention_sm90_d<D>.cu`, sm_90a only).
struct FlashSm90 {
    d: usize,
    /// The smallest head_dim served: below it the mma.sync table pads to a smaller D than this one, so its kernel
    /// does less work (80 and 96 stay there until padding them to 128 is measured to win).
    min_head_dim: usize,
    module: Module,
    forward: [&'static str; 2],
    fwd: Sm90Forward,
    /// The entry points of `flash_backward_sm90<T, D, NWG>` and NWG (warpgroups of 64 keys each); None where the
    /// mma.sync backward of `FLASH` serves this head_dim.
    backward: Option<([&'static str; 2], usize)>,
}

impl FlashSm90 {
    fn serves(&self, head_dim: usize) -> bool {
        (self.min_head_dim..=self.d).contains(&head_dim)
    }

    fn forward_kernel(&self, half: Half) -> FlashKernel {
        let (_, threads, smem) = self.fwd.shape(self.d);
        let name = half.pick(self.forward[0], self.forward[1]);
        FlashKernel { module: self.module, name, rows: self.fwd.rows(), threads, smem }
    }

    /// `Sm90BackwardSmem<D, NWG>`: K and V [BN][D], two stages of Q and dO [64][D], dSᵀ [BN][64], two stages of lse
    /// and delta, 1 KB of alignment slack.
    fn backward_kernel(&self, half: Half) -> Option<FlashKernel> {
        let (names, nwg) = self.backward?;
        let (d, bn) = (self.d, 64 * nwg);
        let smem = 2 * bn * d * 2 + 4 * 64 * d * 2 + bn * 64 * 2 + 4 * 64 * 4 + 1024;
        Some(FlashKernel {
            module: self.module,
            name: half.pick(names[0], names[1]),
            rows: bn,
            threads: 128 * nwg,
            smem,
        })
    }
}

/// The Hopper kernels (variants measured on the H200 in `scripts/flash/variants.py`; kernels/NOTES.md has the
/// numbers): the warp-specialized ping-pong forward with 128-key tiles at 64 and 128, the all-load forward without
/// overlap at 256; the wgmma backward at 64 and 128 (at 256 its dK and dV would not fit the registers).
static FLASH_SM90: [FlashSm90; 3] = [
    FlashSm90 {
        d: 64,
        min_head_dim: 33,
        module: Module::FlashSm90D64,
        forward: ["flash_forward_sm90_d64_bf16", "flash_forward_sm90_d64_f16"],
        fwd: Sm90Forward::WarpSpecialized { bn: 128, nwg: 2, ping_pong: true },
        backward: Some((["flash_backward_sm90_d64_bf16", "flash_backward_sm90_d64_f16"], 2)),
    },
    FlashSm90 {
        d: 128,
        min_head_dim: 97,
        module: Module::FlashSm90D128,
        forward: ["flash_forward_sm90_d128_bf16", "flash_forward_sm90_d128_f16"],
        fwd: Sm90Forward::WarpSpecialized { bn: 128, nwg: 2, ping_pong: true },
        backward: Some((["flash_backward_sm90_d128_bf16", "flash_backward_sm90_d128_f16"], 2)),
    },
    FlashSm90 {
        d: 256,
        min_head_dim: 129,
        module: Module::FlashSm90D256,
        forward: ["flash_forward_sm90_d256_bf16", "flash_forward_sm90_d256_f16"],
        fwd: Sm90Forward::AllLoad { bn: 64, nwg: 2, overlap: false },
        backward: None,
    },
];

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

/// One flash kernel launch over `rows` (query or key rows of the longest sequence) × `heads` × `n_seqs` blocks:
/// `params` by value, the kernel's dynamic shared memory allowed past the 48 KiB default first.
fn launch_flash(
    dev: &CudaDevice,
    kernel: FlashKernel,
    params: FlashParams,
    rows: usize,
    heads: usize,
    n_seqs: usize,
) -> Result<()> {
    let cfg = grid(rows, kernel.rows, heads, n_seqs, kernel.threads, kernel.smem);
    let FlashKernel { module, name, .. } = kernel;
    dev.function(module, name)?
        .set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            cfg.shared_mem_bytes as i32,
        )
        .map_err(super::Error::driver("cuFuncSetAttribute"))?;
    // SAFETY: flash_*(const FlashParams p): every address in `params` is a buffer of this device sized as the
    // callers assert (q, out, d_out, dq_accum: tq·n_heads·head_dim; k, v, dk, dv: tk·n_kv_heads·head_dim; lse, delta:
    // tq·n_heads; cu_q, cu_k: the grid's z + 1), and the kernels skip any sequence whose offsets leave 0..tq or
    // 0..tk; the block size and shared memory are what the kernel's template uses (FLASH and FLASH_SM90, checked
    // against the .cu files' template arguments), and an sm90 kernel is picked only on an sm_90a target.
    unsafe { launch!(dev, module, name, cfg; params) }
}

/// q: [tq, n_heads, head_dim], k, v: [tk, n_kv_heads, head_dim], cu_seqlens_q/k: [n_seqs + 1] → out: [tq, n_heads,
/// head_dim], lse: [tq, n_heads] f32 (−∞ with a zero row for a query that sees no key)
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<T: AttentionFloat>(
    p: &AttentionParams,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    cu_seqlens_q: &DeviceBuffer<i32>,
    cu_seqlens_k: &DeviceBuffer<i32>,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    out: &mut DeviceBuffer<T>,
    lse: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let (cu, max_seqlen) = ([cu_seqlens_q, cu_seqlens_k], [max_seqlen_q, max_seqlen_k]);
    attention_forward_with(FlashPath::Fastest, p, q, k, v, cu, max_seqlen, out, lse)
}

/// [`attention_forward`] on the flash kernels `path` picks (f32 ignores it): cu_seqlens and max_seqlen are
/// (queries, keys).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_with<T: AttentionFloat>(
    path: FlashPath,
    p: &AttentionParams,
    q: &DeviceBuffer<T>,
    k: &DeviceBuffer<T>,
    v: &DeviceBuffer<T>,
    [cu_seqlens_q, cu_seqlens_k]: [&DeviceBuffer<i32>; 2],
    // Keys do not size the forward grid: each query block walks its sequence's keys.
    [max_seqlen_q, _]: [usize; 2],
    out: &mut DeviceBuffer<T>,
    lse: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let (attn, mut flash, tq) = geometry(p, q.len(), k.len(), cu_seqlens_q.len(), cu_seqlens_k.len());
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
    let half = match T::KIND {
        Kind::Reference => {
            let (pq, pk, pv, pcq, pck, po, pl) =
                (q.ptr(), k.ptr(), v.ptr(), cu_seqlens_q.ptr(), cu_seqlens_k.ptr(), out.ptr(), lse.ptr());
            let cfg = grid(max_seqlen_q, WARPS, p.n_heads, n_seqs, 32 * WARPS, 0);
            // SAFETY: attention_forward_f32(const float* q, const float* k, const float* v, const int* cu_q,
            // const int* cu_k, float* out, float* lse, Attn a): q and out hold tq·n_heads·head_dim elements, k and v
            // tk·n_kv_heads·head_dim, lse tq·n_heads (asserted), cu_q and cu_k n_seqs + 1 (the grid's z); the kernel
            // skips any sequence whose offsets leave 0..tq or 0..tk, so no access leaves the buffers.
            return unsafe {
                launch!(dev, Module::Attention, "attention_forward_f32", cfg; pq, pk, pv, pcq, pck, po, pl, attn)
            };
        }
        Kind::Flash(half) => half,
    };
    let [kernel, _] = flash_kernels(dev.target(), path, p.head_dim, half);
    (flash.q, flash.k, flash.v, flash.out, flash.lse) = (q.ptr(), k.ptr(), v.ptr(), out.ptr(), lse.ptr());
    (flash.cu_q, flash.cu_k) = (cu_seqlens_q.ptr(), cu_seqlens_k.ptr());
    launch_flash(dev, kernel, flash, max_seqlen_q, p.n_heads, n_seqs)
}

/// Gradients of [`attention_forward`] from its out and lse and d_out: [tq, n_heads, head_dim] → dq: [tq, n_heads,
/// head_dim], dk, dv: [tk, n_kv_heads, head_dim] (all written; GQA sums over the query heads sharing a KV head)
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: AttentionFloat>(
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
    let (cu, max_seqlen) = ([cu_seqlens_q, cu_seqlens_k], [max_seqlen_q, max_seqlen_k]);
    attention_backward_with(FlashPath::Fastest, p, [q, k, v], [out, d_out], lse, cu, max_seqlen, [dq, dk, dv])
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
    if rows > 0 {
        launch_delta(dev, out, d_out, &delta, attn.head_dim)?;
    }
    let half = match T::KIND {
        Kind::Reference => {
            let (cu, max_seqlen) = ([cu_seqlens_q, cu_seqlens_k], [max_seqlen_q, max_seqlen_k]);
            return reference_backward(
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
    let mut dq_accum = dev.zeros::<f32>(q.len())?;
    (flash.q, flash.k, flash.v, flash.out, flash.lse, flash.d_out) =
        (q.ptr(), k.ptr(), v.ptr(), out.ptr(), lse.ptr(), d_out.ptr());
    (flash.delta, flash.dq_accum, flash.dk, flash.dv) = (delta.ptr(), dq_accum.ptr(), dk.ptr(), dv.ptr());
    (flash.cu_q, flash.cu_k) = (cu_seqlens_q.ptr(), cu_seqlens_k.ptr());
    if max_seqlen_k > 0 && !dk.is_empty() {
        launch_flash(dev, kernel, flash, max_seqlen_k, p.n_kv_heads, n_seqs)?;
    } else {
        // No key: every dq row is zero (the accumulator as allocated); dk and dv are empty.
        dq_accum.zero()?;
    }
    if dq.is_empty() {
        return Ok(());
    }
    let kernel = half.pick("attention_dq_convert_bf16", "attention_dq_convert_f16");
    let (pa, pd, n) = (dq_accum.ptr(), dq.ptr(), dq.len() as u64);
    // SAFETY: attention_dq_convert_T(const float* dq_accum, T* dq, u64 n): both hold n elements, on this device.
    unsafe { launch!(dev, Module::Attention, kernel, config(grid_for(dq.len())); pa, pd, n) }
}

/// delta = rowsum(dO ⊙ O) per (token, head): [rows] f32.
fn launch_delta<T: AttentionFloat>(
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
fn reference_backward<T: AttentionFloat>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::compile::Output;

    const SM_90A: Target = Target { arch: 90, arch_specific: true, output: Output::Cubin };
    const SM_80: Target = Target { arch: 80, arch_specific: false, output: Output::Cubin };

    /// The line of `module`'s file that defines entry point `name`.
    fn entry_line(module: Module, name: &str) -> &'static str {
        let text = module.file_text();
        text.lines().find(|l| l.contains(&format!(" {name}("))).unwrap_or_else(|| panic!("{name}: no entry point"))
    }

    /// The tiles must match the template arguments written in each flash_attention_d<D>.cu, and fit a Hopper SM's
    /// 227 KiB of shared memory per block.
    #[test]
    fn flash_table_matches_the_sources() {
        for f in &FLASH {
            for (kernels, t) in [(f.forward, f.fwd), (f.backward, f.bwd)] {
                for (name, ty) in kernels.iter().zip(["bf16", "f16"]) {
                    let line = entry_line(f.module, name);
                    let args = format!("<{ty}, {}, {}, {}, {}", f.d, t.bm, t.bn, t.warps);
                    assert!(line.contains(&args), "{name}: expected template arguments {args} in {line}");
                    assert!(line.contains(&format!("__launch_bounds__({})", 32 * t.warps)), "{name}: block size");
                }
            }
            assert!(f.forward_smem() <= 227 * 1024 && f.backward_smem() <= 227 * 1024, "d{}: shared memory", f.d);
        }
        assert_eq!(FLASH.last().map(|f| f.d), Some(MAX_HEAD_DIM));
        assert_eq!(std::mem::size_of::<FlashParams>(), 136, "flash_attention.cuh's FlashParams is 136 bytes");
    }

    /// The same for the Hopper kernels: template, block size (one block per multiprocessor) and shared memory.
    #[test]
    fn flash_sm90_table_matches_the_sources() {
        for f in &FLASH_SM90 {
            assert_eq!(f.module.arch_specific_only(), Some(90), "{}", f.module.name());
            let (forward, _, _) = f.fwd.shape(f.d);
            let backward = f.backward.map(|(_, nwg)| format!("flash_backward_sm90<{{T}}, {}, {nwg}>", f.d));
            for half in [Half::Bf16, Half::F16] {
                let ty = half.pick("bf16", "f16");
                let kernels =
                    [Some((f.forward_kernel(half), &forward)), f.backward_kernel(half).zip(backward.as_ref())];
                for (k, template) in kernels.into_iter().flatten() {
                    let line = entry_line(f.module, k.name);
                    let call = template.replace("{T}", ty);
                    assert!(line.contains(&call), "{}: expected {call} in {line}", k.name);
                    assert!(line.contains(&format!("__launch_bounds__({}, 1)", k.threads)), "{}: block size", k.name);
                    assert!(k.smem <= 227 * 1024, "{}: shared memory", k.name);
                }
            }
            let entries = f.module.entry_points().len();
            assert_eq!(entries, if f.backward.is_some() { 4 } else { 2 }, "{}: entry points", f.module.name());
        }
    }

    #[test]
    fn head_dims_map_to_the_smallest_padded_kernel() {
        let d = |hd| Flash::for_head_dim(hd).d;
        assert_eq!(
            [d(1), d(32), d(33), d(64), d(72), d(80), d(96), d(100), d(128), d(129), d(256)],
            [32, 32, 64, 64, 80, 80, 96, 128, 128, 256, 256]
        );
    }

    /// Hopper takes the wgmma kernel where one pads no further than the mma.sync table; other targets, and the
    /// portable path, never do.
    #[test]
    fn hopper_picks_wgmma_where_it_serves() {
        let names = |target, path, hd| flash_kernels(target, path, hd, Half::Bf16).map(|k| k.name);
        assert_eq!(
            names(SM_90A, FlashPath::Fastest, 64),
            ["flash_forward_sm90_d64_bf16", "flash_backward_sm90_d64_bf16"]
        );
        assert_eq!(
            names(SM_90A, FlashPath::Fastest, 40),
            ["flash_forward_sm90_d64_bf16", "flash_backward_sm90_d64_bf16"]
        );
        assert_eq!(
            names(SM_90A, FlashPath::Fastest, 100),
            ["flash_forward_sm90_d128_bf16", "flash_backward_sm90_d128_bf16"]
        );
        assert_eq!(
            names(SM_90A, FlashPath::Fastest, 256),
            ["flash_forward_sm90_d256_bf16", "flash_backward_d256_bf16"]
        );
        assert_eq!(names(SM_90A, FlashPath::Fastest, 32), ["flash_forward_d32_bf16", "flash_backward_d32_bf16"]);
        assert_eq!(names(SM_90A, FlashPath::Fastest, 72), ["flash_forward_d80_bf16", "flash_backward_d80_bf16"]);
        assert_eq!(names(SM_90A, FlashPath::Portable, 64), ["flash_forward_d64_bf16", "flash_backward_d64_bf16"]);
        assert_eq!(names(SM_80, FlashPath::Fastest, 128), ["flash_forward_d128_bf16", "flash_backward_d128_bf16"]);
        let f16 = flash_kernels(SM_90A, FlashPath::Fastest, 128, Half::F16).map(|k| k.name);
        assert_eq!(f16, ["flash_forward_sm90_d128_f16", "flash_backward_sm90_d128_f16"]);
        // Every head_dim gets a kernel on every path, and only Hopper loads a Hopper module.
        for hd in 1..=MAX_HEAD_DIM {
            for (target, path) in
                [(SM_90A, FlashPath::Fastest), (SM_90A, FlashPath::Portable), (SM_80, FlashPath::Fastest)]
            {
                let wgmma = target == SM_90A && path == FlashPath::Fastest && hd > 32 && (hd <= 64 || hd > 96);
                let [fwd, bwd] = flash_kernels(target, path, hd, Half::Bf16);
                for (k, sm90) in [(fwd, wgmma), (bwd, wgmma && hd <= 128)] {
                    assert!(k.module.compiles_for(target), "{hd}: {} on {target}", k.name);
                    assert_eq!(k.module.arch_specific_only().is_some(), sm90, "{hd}: {} on {target}", k.name);
                }
            }
        }
    }
}
