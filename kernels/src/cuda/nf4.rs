//! Launchers of `kernels/cuda/nf4.cu`, twins of [`crate::nf4`]'s dequantization: [`dequantize_nf4_into`] (one launch
//! for plain or double-quantized scales, into any range of a buffer), its whole-buffer form [`dequantize_nf4`], and the
//! standalone rebuild of a double-quantized absmax, [`dequantize_absmax_nested`], all bit-exact with the CPU; and
//! decoding's product with a packed weight, [`nf4_gemv`].

use super::source::Module;
use super::{
    aligned16, allow_smem, config, grid_for, kernel, launch, same_device, u32_arg, CudaDevice, DeviceBuffer, DeviceCopy,
    GpuFloat, Result, BLOCK,
};
use crate::nf4::{nf4_num_blocks, nf4_packed_len, NESTED_BLOCKSIZE};
use cudarc::driver::DeviceRepr;
use cudarc::driver::LaunchConfig;
use half::f16;

/// Elements a warp dequantizes per step of the kernel's vector path (`TILE` in nf4.cu): 32 lanes × 16 packed bytes.
const TILE: usize = 1024;

/// The types NF4 dequantizes to on the GPU: f32 and bf16 (every [`GpuFloat`]), and f16.
pub trait Nf4Output: DeviceCopy {
    /// The kernels writing this type: (one f32 absmax per block, double-quantized absmax).
    fn kernels() -> (&'static str, &'static str);
}

impl<T: GpuFloat> Nf4Output for T {
    fn kernels() -> (&'static str, &'static str) {
        (kernel!("dequantize_nf4", T), kernel!("dequantize_nf4_nested", T))
    }
}

impl Nf4Output for f16 {
    fn kernels() -> (&'static str, &'static str) {
        ("dequantize_nf4_f16", "dequantize_nf4_nested_f16")
    }
}

/// An NF4 weight's per-block scales on the device.
#[derive(Clone, Copy, Debug)]
pub enum Nf4Scales<'a> {
    /// absmax: \[blocks\] f32, as bitsandbytes stores it without double quantization.
    Absmax(&'a DeviceBuffer<f32>),
    /// Double quantization ([`crate::nf4::NestedAbsmax`]): block b's absmax is `code2[qabsmax[b]]·absmax2[b / 256]`
    /// `+ offset`, rebuilt inside the dequantization kernel. qabsmax: \[blocks\] u8, absmax2: [ceil(blocks / 256)] f32,
    /// code2: \[256\] f32 (the checkpoint's `nested_quant_map`).
    Nested { qabsmax: &'a DeviceBuffer<u8>, absmax2: &'a DeviceBuffer<f32>, code2: &'a DeviceBuffer<f32>, offset: f32 },
}

/// packed: [(n + 1) / 2] u8, absmax: [ceil(n / blocksize)] f32 → out: \[n\] (f32, bf16 or f16). `blocksize`: a power of
/// two in 32..=4096. [`dequantize_nf4_into`] with the whole of `out`.
pub fn dequantize_nf4<T: Nf4Output>(
    packed: &DeviceBuffer<u8>,
    absmax: &DeviceBuffer<f32>,
    blocksize: usize,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    let n = out.len();
    dequantize_nf4_into(packed, Nf4Scales::Absmax(absmax), blocksize, n, out, 0)
}

/// packed: [(n + 1) / 2] u8, scales: [ceil(n / blocksize)] blocks → out[start..start + n] (f32, bf16 or f16), in one
/// launch whatever the scales: bit-identical to [`crate::nf4::dequantize_nf4`] (after
/// [`crate::nf4::dequantize_absmax_nested`] for nested scales). The rest of `out` is left as it was, so one scratch
/// buffer sized for the largest weight serves every weight, and weights that share an input can be written side by
/// side ([q; k; v] rows in one buffer). `blocksize`: a power of two in 32..=4096.
///
/// Speed: the vector path needs `out[start]` 16-byte aligned (`start · size_of::<T>()` a multiple of 16); from any
/// other start the kernel is as exact but goes element by element.
pub fn dequantize_nf4_into<T: Nf4Output>(
    packed: &DeviceBuffer<u8>,
    scales: Nf4Scales<'_>,
    blocksize: usize,
    n: usize,
    out: &mut DeviceBuffer<T>,
    start: usize,
) -> Result<()> {
    assert!(
        start.checked_add(n).is_some_and(|end| end <= out.len()),
        "dequantize_nf4: {n} elements from {start} overrun an output of {}",
        out.len()
    );
    let dev = weight_device("dequantize_nf4", packed, scales, blocksize, n);
    same_device("dequantize_nf4", &[dev, out.device()]);
    if n == 0 {
        return Ok(());
    }
    let po = out.ptr() + (start * size_of::<T>()) as u64;
    // Device buffers start 256-byte aligned, so only `start` can leave the vector path out.
    let n_vec = if (packed.ptr() | po) % 16 == 0 { n / TILE * TILE } else { 0 };
    let block = BLOCK as usize;
    let wanted = (n_vec / TILE).div_ceil(block / 32).max((n - n_vec).div_ceil(block));
    // One wave: more blocks would only queue behind the resident ones, each then looping over fewer tiles.
    let grid = wanted.clamp(1, (dev.resident_threads() / block).max(1)) as u32;
    let (pp, n64, nv64, log2) = (packed.ptr(), n as u64, n_vec as u64, blocksize.trailing_zeros());
    let (plain, nested) = T::kernels();
    match scales {
        Nf4Scales::Absmax(absmax) => {
            let pa = absmax.ptr();
            // SAFETY: dequantize_nf4_T(const unsigned char* packed, const float* absmax, T* out, u64 n, u64 n_vec,
            // unsigned log2_blocksize): packed holds (n + 1) / 2 bytes, absmax ceil(n / blocksize) f32 and out n
            // elements from po (asserted), on this device; n_vec is a multiple of TILE, nonzero only when packed
            // and po are 16-byte aligned; the block of BLOCK threads is the kernel's at most 256, a multiple of 32.
            unsafe { launch!(dev, Module::Nf4, plain, config(grid); pp, pa, po, n64, nv64, log2) }
        }
        Nf4Scales::Nested { qabsmax, absmax2, code2, offset } => {
            let (pq, p2, pc) = (qabsmax.ptr(), absmax2.ptr(), code2.ptr());
            // SAFETY: dequantize_nf4_nested_T(const unsigned char* packed, const unsigned char* qabsmax, const
            // float* absmax2, const float* code2, float offset, T* out, u64 n, u64 n_vec, unsigned log2_blocksize):
            // as above, with qabsmax ceil(n / blocksize) bytes, absmax2 one f32 per 256 of them and code2 256 f32
            // (asserted; every byte indexes code2 in range), on this device.
            unsafe { launch!(dev, Module::Nf4, nested, config(grid); pp, pq, p2, pc, offset, po, n64, nv64, log2) }
        }
    }
}

/// The device of an NF4 weight of `n` elements (packed bytes and scales), after asserting the blocksize, the lengths
/// and that every buffer is on it.
fn weight_device<'a>(
    op: &str,
    packed: &'a DeviceBuffer<u8>,
    scales: Nf4Scales<'_>,
    blocksize: usize,
    n: usize,
) -> &'a CudaDevice {
    assert!(
        blocksize.is_power_of_two() && (32..=4096).contains(&blocksize),
        "{op}: blocksize {blocksize} is not a power of two in 32..=4096"
    );
    assert_eq!(packed.len(), nf4_packed_len(n), "{op}: packed length vs (n + 1) / 2 for n = {n}");
    let blocks = nf4_num_blocks(n, blocksize);
    let dev = packed.device();
    match scales {
        Nf4Scales::Absmax(absmax) => {
            assert_eq!(absmax.len(), blocks, "{op}: absmax length vs blocks for n = {n}");
            same_device(op, &[dev, absmax.device()]);
        }
        Nf4Scales::Nested { qabsmax, absmax2, code2, .. } => {
            assert_eq!(qabsmax.len(), blocks, "{op}: nested absmax length vs blocks for n = {n}");
            assert_eq!(absmax2.len(), blocks.div_ceil(NESTED_BLOCKSIZE), "{op}: absmax2 length vs nested blocks");
            assert_eq!(code2.len(), 256, "{op}: the 8-bit code has {} entries, not 256", code2.len());
            same_device(op, &[dev, qabsmax.device(), absmax2.device(), code2.device()]);
        }
    }
    dev
}

/// Rows of x an [`nf4_gemv`] takes at once (`GEMV_MAX_ROWS` in nf4.cu): the sequences of one decoding step.
pub const GEMV_MAX_ROWS: usize = 8;

/// Weights one [`nf4_gemv`] launch takes at most (`GEMV_MEMBERS` in nf4.cu): a projection group (q/k/v).
const GEMV_MEMBERS: usize = 3;
/// Columns a warp of the vector kernels reads per step (`GEMV_STEP` in nf4.cu): 32 lanes × 16 packed bytes.
const GEMV_STEP: usize = 1024;
/// Warps a block of the vector kernels splits a row's steps over, at most (`GEMV_MAX_WARPS` in nf4.cu).
const GEMV_MAX_WARPS: usize = 8;

/// The vector kernels' rows of x, m rounded up to 1, 2, 4 or 8 (rows past m are computed and not written), and the
/// rows of W one block owns for them (`NF4_GEMV_ROWS` in nf4.cu).
fn gemv_rows(m: usize) -> (usize, usize) {
    let rows = m.next_power_of_two();
    (rows, if rows <= 2 { 4 } else { 2 })
}

/// Warps per block for rows of `in_f` columns: every warp gets the same number of 1024-column steps (14 steps → 7
/// warps of 2, 4 → 4 of 1), at most [`GEMV_MAX_WARPS`].
fn gemv_warps(in_f: usize) -> usize {
    let steps = in_f.div_ceil(GEMV_STEP);
    steps.div_ceil(steps.div_ceil(GEMV_MAX_WARPS))
}

/// Warps per block of the rows kernels (`GEMV_ROWS_WARPS` in nf4.cu).
const GEMV_ROWS_WARPS: usize = 8;

/// Which kernels an [`nf4_gemv_with`] call takes for rows of x the rows kernels serve (m ≤ 2); a test and
/// measurement hook: every other caller wants [`GemvKernel::Fastest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemvKernel {
    /// The rows kernels, with the rows of W per warp chosen by [`gemv_rows_per_warp`].
    Fastest,
    /// The rows kernels with this many rows of W per warp: 2, or 4 (one row of x only).
    Rows(usize),
    /// The blocks kernels, which split a row's steps over the warps of a block.
    Blocks,
}

/// Rows of W per warp of the rows kernels for `rows` rows of W in a launch (all its members) and m rows of x:
/// 4 when that still gives every multiprocessor ~16 warps (2 blocks of 8), else 2; 2 for two rows of x.
fn gemv_rows_per_warp(dev: &CudaDevice, m: usize, rows: usize) -> usize {
    let warps_at_four = rows.div_ceil(4);
    if m == 1 && warps_at_four * 4 >= dev.resident_threads() / 32 {
        4
    } else {
        2
    }
}

/// The rows kernels' names: (plain absmax, nested absmax) for m rows of x and `per_warp` rows of W per warp.
fn gemv_rows_kernels<T: GpuFloat>(m: usize, per_warp: usize) -> (&'static str, &'static str) {
    match (m, per_warp) {
        (1, 2) => (kernel!("nf4_gemv_rows2_m1", T), kernel!("nf4_gemv_rows2_nested_m1", T)),
        (1, 4) => (kernel!("nf4_gemv_rows4_m1", T), kernel!("nf4_gemv_rows4_nested_m1", T)),
        (2, 2) => (kernel!("nf4_gemv_rows2_m2", T), kernel!("nf4_gemv_rows2_nested_m2", T)),
        _ => panic!("nf4_gemv: no rows kernel for {m} rows of x and {per_warp} rows of W per warp"),
    }
}

/// The vector kernels' names: (plain absmax, nested absmax) for `rows` rows of x.
fn gemv_vector_kernels<T: GpuFloat>(rows: usize) -> (&'static str, &'static str) {
    match rows {
        1 => (kernel!("nf4_gemv_m1", T), kernel!("nf4_gemv_nested_m1", T)),
        2 => (kernel!("nf4_gemv_m2", T), kernel!("nf4_gemv_nested_m2", T)),
        4 => (kernel!("nf4_gemv_m4", T), kernel!("nf4_gemv_nested_m4", T)),
        8 => (kernel!("nf4_gemv_m8", T), kernel!("nf4_gemv_nested_m8", T)),
        _ => unreachable!("gemv_rows gives 1, 2, 4 or 8 rows, not {rows}"),
    }
}

/// LoRA's up-projection riding on [`nf4_gemv`]: y += alpha·U·Bᵀ before the one rounding, U: [m, rank] starting at
/// element `u_offset` of `u` with rows `ldu` apart (a projection's columns of its group's U), B: [out, rank].
#[derive(Clone, Copy)]
pub struct GemvLora<'a, T: GpuFloat> {
    pub u: &'a DeviceBuffer<T>,
    pub u_offset: usize,
    pub ldu: usize,
    pub b: &'a DeviceBuffer<T>,
    pub rank: usize,
    pub alpha: f32,
}

/// One weight of an [`nf4_gemv`] call: W [out, in] NF4 (packed, scales as in [`dequantize_nf4_into`]), its output
/// y: [m, out] and LoRA's up-projection riding on it, if any.
pub struct GemvWeight<'a, T: GpuFloat> {
    pub packed: &'a DeviceBuffer<u8>,
    pub scales: Nf4Scales<'a>,
    pub lora: Option<GemvLora<'a, T>>,
    pub y: &'a mut DeviceBuffer<T>,
}

/// One weight of a launch as the kernels read it (nf4.cu `struct GemvMember`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GemvMember {
    packed: u64,
    absmax: u64,
    absmax2: u64,
    code2: u64,
    y: u64,
    lora_u: u64,
    lora_b: u64,
    offset: f32,
    out_f: u32,
    lora_ldu: u32,
    lora_rank: u32,
    lora_alpha: f32,
    blocks_end: u32,
}

/// A launch's weights (nf4.cu `struct GemvMembers`); members past `count` are zeros, never read.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GemvMembers {
    w: [GemvMember; GEMV_MEMBERS],
    count: u32,
}

// SAFETY: `repr(C)` plain data with the field types and order of nf4.cu's `struct GemvMember` (seven 8-byte addresses,
// then six 4-byte fields: 80 bytes, no interior padding) and `struct GemvMembers` (three of them, then a 4-byte count,
// padded to 248 bytes by both compilers' alignment rules).
unsafe impl DeviceRepr for GemvMember {}
unsafe impl DeviceRepr for GemvMembers {}

/// x: [m, in] (1 ≤ m ≤ [`GEMV_MAX_ROWS`]) times each of `weights` (W [out, in] NF4) → its y: [m, out] = x·Wᵀ (+
/// alpha·U·Bᵀ with its `lora`: a LoRA projection of decoding in this launch and U's), reading W packed and never
/// writing it out: the product of decoding, whose cost at batch 1 is reading the 4-bit weights once. Weights that
/// read the same x (a projection group) run as one launch, up to three at a time, when their scales are of one kind
/// and the vector kernels take them. Twin of [`crate::nf4::nf4_gemv`] per weight (sums in f32 in another order: equal
/// within a reduction's rounding).
///
/// Speed: the vector kernels (kernels/NOTES.md "NF4 GEMV") need `in % 32 == 0` and 16-byte aligned packed bytes and
/// x (whole buffers always are); any other shape takes a kernel as exact that reads element by element.
pub fn nf4_gemv<T: GpuFloat>(
    weights: &mut [GemvWeight<'_, T>],
    blocksize: usize,
    x: &DeviceBuffer<T>,
    in_f: usize,
) -> Result<()> {
    nf4_gemv_with(weights, blocksize, x, in_f, GemvKernel::Fastest)
}

/// [`nf4_gemv`] on the kernels `kernel` names where the shape allows them.
pub fn nf4_gemv_with<T: GpuFloat>(
    weights: &mut [GemvWeight<'_, T>],
    blocksize: usize,
    x: &DeviceBuffer<T>,
    in_f: usize,
    kernel: GemvKernel,
) -> Result<()> {
    assert!(in_f > 0 && x.len() % in_f == 0, "nf4_gemv: x of {} values for rows of {in_f}", x.len());
    let m = x.len() / in_f;
    assert!((1..=GEMV_MAX_ROWS).contains(&m), "nf4_gemv: {m} rows of x (1 to {GEMV_MAX_ROWS})");
    let mut launches: Vec<GemvLaunch> = Vec::new();
    for w in weights.iter_mut() {
        assert_eq!(w.y.len() % m, 0, "nf4_gemv: y of {} values for {m} rows", w.y.len());
        let out_f = w.y.len() / m;
        let dev = weight_device("nf4_gemv", w.packed, w.scales, blocksize, out_f * in_f);
        same_device("nf4_gemv", &[dev, x.device(), w.y.device()]);
        if out_f == 0 {
            continue;
        }
        let vector = in_f % 32 == 0 && aligned16(&[w.packed.ptr(), x.ptr()]);
        let nested = matches!(w.scales, Nf4Scales::Nested { .. });
        let member = gemv_member(w, m, out_f);
        match launches.last_mut() {
            // The scalar kernels take each weight alone.
            Some(l) if vector && l.vector && l.nested == nested && l.members.len() < GEMV_MEMBERS => {
                l.members.push(member)
            }
            _ => launches.push(GemvLaunch { nested, vector, members: vec![member] }),
        }
    }
    for launch in launches {
        gemv_launch::<T>(x, launch, in_f, blocksize, kernel)?;
    }
    Ok(())
}

/// `w` as a launch member, its blocks not yet counted.
fn gemv_member<T: GpuFloat>(w: &mut GemvWeight<'_, T>, m: usize, out_f: usize) -> GemvMember {
    let (absmax, absmax2, code2, offset) = match w.scales {
        Nf4Scales::Absmax(absmax) => (absmax.ptr(), 0, 0, 0.0),
        Nf4Scales::Nested { qabsmax, absmax2, code2, offset } => (qabsmax.ptr(), absmax2.ptr(), code2.ptr(), offset),
    };
    let mut member = GemvMember {
        packed: w.packed.ptr(),
        absmax,
        absmax2,
        code2,
        y: w.y.ptr(),
        offset,
        out_f: u32_arg("nf4_gemv: out", out_f),
        ..GemvMember::default()
    };
    if let Some(l) = w.lora {
        same_device("nf4_gemv", &[w.y.device(), l.u.device(), l.b.device()]);
        assert!(l.rank > 0 && (l.rank <= l.ldu || m == 1), "nf4_gemv: U rows {} apart for rank {}", l.ldu, l.rank);
        let u_end = l.u_offset + (m - 1) * l.ldu + l.rank;
        assert!(u_end <= l.u.len(), "nf4_gemv: U of {} values for {m} rows from {}", l.u.len(), l.u_offset);
        assert_eq!(l.b.len(), out_f * l.rank, "nf4_gemv: B of {} values for [{out_f}, {}]", l.b.len(), l.rank);
        member.lora_u = l.u.ptr() + (l.u_offset * size_of::<T>()) as u64;
        member.lora_ldu = u32_arg("nf4_gemv: ldu", l.ldu);
        member.lora_b = l.b.ptr();
        member.lora_rank = u32_arg("nf4_gemv: rank", l.rank);
        member.lora_alpha = l.alpha;
    }
    member
}

/// The weights one launch of [`nf4_gemv`] takes: one kind of scales, on the vector kernels (up to [`GEMV_MEMBERS`])
/// or the scalar ones (one).
struct GemvLaunch {
    nested: bool,
    vector: bool,
    members: Vec<GemvMember>,
}

/// One launch over its members, their blocks laid end to end.
fn gemv_launch<T: GpuFloat>(
    x: &DeviceBuffer<T>,
    launch: GemvLaunch,
    in_f: usize,
    blocksize: usize,
    kernel: GemvKernel,
) -> Result<()> {
    let GemvLaunch { nested, vector, members } = launch;
    let (dev, m) = (x.device(), x.len() / in_f);
    let rows_kernels = vector && m <= 2 && kernel != GemvKernel::Blocks;
    // The rows kernels stage x in shared memory: 1024 values per row of x and step of the rows.
    let mut smem = 0u32;
    let (names, threads, rows_per_block) = if rows_kernels {
        let per_warp = match kernel {
            GemvKernel::Rows(r) => r,
            _ => gemv_rows_per_warp(dev, m, members.iter().map(|w| w.out_f as usize).sum()),
        };
        smem = u32_arg("nf4_gemv: staged x", m * in_f.div_ceil(GEMV_STEP) * GEMV_STEP * size_of::<T>());
        (gemv_rows_kernels::<T>(m, per_warp), 32 * GEMV_ROWS_WARPS as u32, per_warp * GEMV_ROWS_WARPS)
    } else if vector {
        let (rows, rows_per_block) = gemv_rows(m);
        (gemv_vector_kernels::<T>(rows), 32 * gemv_warps(in_f) as u32, rows_per_block)
    } else {
        ((kernel!("nf4_gemv_scalar", T), kernel!("nf4_gemv_scalar_nested", T)), BLOCK, BLOCK as usize / 32)
    };
    let mut g = GemvMembers { count: members.len() as u32, ..GemvMembers::default() };
    let mut blocks = 0usize;
    for (slot, member) in g.w.iter_mut().zip(members) {
        blocks += (member.out_f as usize).div_ceil(rows_per_block);
        *slot = GemvMember { blocks_end: u32_arg("nf4_gemv: blocks", blocks), ..member };
    }
    let grid = g.w[g.count as usize - 1].blocks_end;
    let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem };
    let kernel = if nested { names.1 } else { names.0 };
    if smem > 0 {
        allow_smem(dev, Module::Nf4, kernel, smem)?;
    }
    let (px, m32, in32, log2) = (x.ptr(), m as u32, u32_arg("nf4_gemv: in", in_f), blocksize.trailing_zeros());
    // SAFETY: nf4_gemv_{,nested_}{m1,m2,m4,m8}_T, nf4_gemv_rows{2,4}_{,nested_}m{1,2}_T and
    // nf4_gemv_scalar{,_nested}_T(GemvMembers g, const T* x, unsigned m, unsigned in, unsigned log2_blocksize): every
    // member's packed bytes, scales (plain: absmax f32 per block; nested: qabsmax, absmax2, code2) and y of m·out
    // elements were checked against its [out, in] (weight_device, nf4_gemv), on x's device, and its LoRA U and B
    // against m, out and rank (gemv_member); m ≤ GEMV_MAX_ROWS and ≤ the vector kernel's rows (gemv_rows) or the
    // rows kernel's (gemv_rows_kernels: m itself); the grid is the members' blocks end to end (blocks_end), each block
    // touching only its member's rows; the vector and rows kernels only when in % 32 == 0 and packed and x are
    // 16-byte aligned, the vector kernels with blocks of 32 to 32 · GEMV_MAX_WARPS threads (gemv_warps), the rows
    // kernels with blocks of 32 · GEMV_ROWS_WARPS and the shared memory their staged x takes (m rows of whole
    // steps, allowed above); the scalar kernels one member at a time with blocks of BLOCK threads, a warp per row.
    unsafe { launch!(dev, Module::Nf4, kernel, cfg; g, px, m32, in32, log2) }
}

/// qabsmax: \[nb\] u8, absmax2: [ceil(nb / 256)] f32, code2: \[256\] f32 → out: \[nb\] f32 = code2\[q\]·absmax2 + offset
pub fn dequantize_absmax_nested(
    qabsmax: &DeviceBuffer<u8>,
    absmax2: &DeviceBuffer<f32>,
    offset: f32,
    code2: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let nb = qabsmax.len();
    assert_eq!(code2.len(), 256, "dequantize_absmax_nested: the 8-bit code has {} entries, not 256", code2.len());
    assert_eq!(out.len(), nb, "dequantize_absmax_nested: out length vs qabsmax");
    assert_eq!(absmax2.len(), nb.div_ceil(NESTED_BLOCKSIZE), "dequantize_absmax_nested: absmax2 length vs blocks");
    let dev =
        same_device("dequantize_absmax_nested", &[qabsmax.device(), absmax2.device(), code2.device(), out.device()]);
    if nb == 0 {
        return Ok(());
    }
    let kernel = "dequantize_absmax_nested_f32";
    let (pq, pa, pc, po, nb64) = (qabsmax.ptr(), absmax2.ptr(), code2.ptr(), out.ptr(), nb as u64);
    // SAFETY: dequantize_absmax_nested_f32(const unsigned char* qabsmax, const float* absmax2, const float* code2,
    // float offset, float* out, u64 nb): qabsmax and out hold nb elements, absmax2 ceil(nb / 256), code2 256
    // (asserted; every byte indexes code2 in range), on this device.
    unsafe {
        launch!(dev, Module::Nf4, kernel, config(grid_for(u32_arg("dequantize_absmax_nested: blocks", nb) as usize)); pq, pa, pc, offset, po, nb64)
    }
}

#[cfg(test)]
mod tests {
    use super::super::source::Module;
    use crate::nf4::NF4_CODE;

    /// The `.cu` spells the code table out; it must be the Rust constant to the bit.
    #[test]
    fn cuda_code_table_is_the_rust_constant() {
        let src = Module::Nf4.file_text();
        let table = src.split("NF4_CODE[16] = {").nth(1).and_then(|rest| rest.split("};").next()).expect("table");
        let values: Vec<f32> = table
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| v.trim_end_matches('f').parse().expect("an f32 literal"))
            .collect();
        assert_eq!(values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), NF4_CODE.map(f32::to_bits));
    }
}
