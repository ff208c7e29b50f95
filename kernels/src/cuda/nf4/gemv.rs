//! Launchers of `kernels/cuda/nf4_gemv.cu`: decoding's product of a few rows of x with packed NF4 weights,
//! [`nf4_gemv`], twin of [`crate::nf4::nf4_gemv`].

use super::{weight_device, Nf4Scales};
use crate::cuda::source::Module;
use crate::cuda::{aligned16, allow_smem, kernel, launch, same_device, u32_arg, DeviceBuffer, GpuFloat, Result, BLOCK};
use cudarc::driver::{DeviceRepr, LaunchConfig};

/// Rows of x an [`nf4_gemv`] takes at once (`GEMV_MAX_ROWS` in nf4_gemv.cu): the sequences of one decoding step.
pub const GEMV_MAX_ROWS: usize = 8;

/// Weights one [`nf4_gemv`] launch takes at most (`GEMV_MEMBERS` in nf4_gemv.cu): a projection group (q/k/v).
const GEMV_MEMBERS: usize = 3;
/// Columns a warp reads per step (`GEMV_STEP` in nf4_gemv.cu): 32 lanes × 16 packed bytes.
const GEMV_STEP: usize = 1024;
/// Warps a block of the blocks kernels splits a row's steps over, at most (`GEMV_MAX_WARPS` in nf4_gemv.cu).
const GEMV_MAX_WARPS: usize = 8;
/// Rows of W a block of the blocks kernels owns (`NF4_GEMV_VECTOR` in nf4_gemv.cu).
const GEMV_BLOCK_ROWS: usize = 2;
/// Warps per block of the rows kernels, and rows of W per warp (`GEMV_ROWS_WARPS`, `NF4_GEMV_ROWS_PATH`).
const GEMV_ROWS_WARPS: usize = 8;
const GEMV_WARP_ROWS: usize = 2;
/// The most shared memory the rows kernels' staged x may take, so that with their 33 KB of tables two blocks still
/// fit a multiprocessor (2 × 97 of its 228 KB). Wider rows take the blocks kernels: f32 x past 16,384 columns (8,192
/// at two rows of x), bf16 past 32,768 (16,384), e.g. a 70B's down_proj at two rows.
const GEMV_MAX_STAGED_X: usize = 64 << 10;

/// Warps per block of the blocks kernels for rows of `in_f` columns: every warp gets the same number of 1024-column
/// steps (14 steps → 7 warps of 2, 4 → 4 of 1), at most [`GEMV_MAX_WARPS`].
fn gemv_warps(in_f: usize) -> usize {
    let steps = in_f.div_ceil(GEMV_STEP);
    steps.div_ceil(steps.div_ceil(GEMV_MAX_WARPS))
}

/// The kernels for m rows of x on the vector path: (plain absmax, nested absmax) — the rows kernels for 1 and 2
/// (`rows`), else the blocks kernels for 4 and 8 rows (fewer run the next of them, its extra rows not written).
fn gemv_vector_kernels<T: GpuFloat>(m: usize, rows: bool) -> (&'static str, &'static str) {
    match (m, rows) {
        (1, true) => (kernel!("nf4_gemv_rows_m1", T), kernel!("nf4_gemv_rows_nested_m1", T)),
        (2, true) => (kernel!("nf4_gemv_rows_m2", T), kernel!("nf4_gemv_rows_nested_m2", T)),
        (1..=4, _) => (kernel!("nf4_gemv_m4", T), kernel!("nf4_gemv_nested_m4", T)),
        _ => (kernel!("nf4_gemv_m8", T), kernel!("nf4_gemv_nested_m8", T)),
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

/// One weight of an [`nf4_gemv`] call: W [out, in] NF4 (packed, scales as in [`super::dequantize_nf4_into`]), its
/// output y: [m, out] and LoRA's up-projection riding on it, if any.
pub struct GemvWeight<'a, T: GpuFloat> {
    pub packed: &'a DeviceBuffer<u8>,
    pub scales: Nf4Scales<'a>,
    pub lora: Option<GemvLora<'a, T>>,
    pub y: &'a mut DeviceBuffer<T>,
}

/// One weight of a launch as the kernels read it (nf4_gemv.cu `struct GemvMember`).
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

/// A launch's weights (nf4_gemv.cu `struct GemvMembers`); members past `count` are zeros, never read.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GemvMembers {
    w: [GemvMember; GEMV_MEMBERS],
    count: u32,
}

// SAFETY: `repr(C)` plain data with the field types and order of nf4_gemv.cu's `struct GemvMember` (seven 8-byte
// addresses, then six 4-byte fields: 80 bytes, no interior padding) and `struct GemvMembers` (three of them, then a
// 4-byte count, padded to 248 bytes by both compilers' alignment rules).
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
        gemv_launch::<T>(x, launch, in_f, blocksize)?;
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
fn gemv_launch<T: GpuFloat>(x: &DeviceBuffer<T>, launch: GemvLaunch, in_f: usize, blocksize: usize) -> Result<()> {
    let GemvLaunch { nested, vector, members } = launch;
    let (dev, m) = (x.device(), x.len() / in_f);
    // The rows kernels stage x in shared memory: 1024 values per row of x and step of a row of W.
    let staged_x = m * in_f.div_ceil(GEMV_STEP) * GEMV_STEP * size_of::<T>();
    let rows = vector && m <= 2 && staged_x <= GEMV_MAX_STAGED_X;
    let smem = if rows { staged_x } else { 0 };
    let (names, threads, rows_per_block) = match (vector, rows) {
        (true, true) => {
            (gemv_vector_kernels::<T>(m, true), 32 * GEMV_ROWS_WARPS as u32, GEMV_WARP_ROWS * GEMV_ROWS_WARPS)
        }
        (true, false) => (gemv_vector_kernels::<T>(m, false), 32 * gemv_warps(in_f) as u32, GEMV_BLOCK_ROWS),
        (false, _) => {
            ((kernel!("nf4_gemv_scalar", T), kernel!("nf4_gemv_scalar_nested", T)), BLOCK, BLOCK as usize / 32)
        }
    };
    let mut g = GemvMembers { count: members.len() as u32, ..GemvMembers::default() };
    let mut blocks = 0usize;
    for (slot, member) in g.w.iter_mut().zip(members) {
        blocks += (member.out_f as usize).div_ceil(rows_per_block);
        *slot = GemvMember { blocks_end: u32_arg("nf4_gemv: blocks", blocks), ..member };
    }
    let grid = g.w[g.count as usize - 1].blocks_end;
    let smem = u32_arg("nf4_gemv: staged x", smem);
    let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem };
    let kernel = if nested { names.1 } else { names.0 };
    if smem > 0 {
        allow_smem(dev, Module::Nf4Gemv, kernel, smem)?;
    }
    let (px, m32, in32, log2) = (x.ptr(), m as u32, u32_arg("nf4_gemv: in", in_f), blocksize.trailing_zeros());
    // SAFETY: nf4_gemv_rows_{,nested_}m{1,2}_T, nf4_gemv_{,nested_}m{4,8}_T and nf4_gemv_scalar{,_nested}_T(GemvMembers
    // g, const T* x, unsigned m, unsigned in, unsigned log2_blocksize): every member's packed bytes, scales (plain:
    // absmax f32 per block; nested: qabsmax, absmax2, code2) and y of m·out elements were checked against its [out,
    // in] (weight_device, nf4_gemv), on x's device, and its LoRA U and B against m, out and rank (gemv_member); m ≤
    // GEMV_MAX_ROWS and ≤ the kernel's rows of x (gemv_vector_kernels); the grid is the members' blocks end to end
    // (blocks_end), each block touching only its member's rows; the rows and blocks kernels only when in % 32 == 0
    // and packed and x are 16-byte aligned, the rows kernels with blocks of 32 · GEMV_ROWS_WARPS threads and the
    // shared memory their staged x takes (m rows of whole steps, allowed above), the blocks kernels with blocks of
    // 32 to 32 · GEMV_MAX_WARPS threads (gemv_warps); the scalar kernels one member at a time with blocks of BLOCK
    // threads, a warp per row.
    unsafe { launch!(dev, Module::Nf4Gemv, kernel, cfg; g, px, m32, in32, log2) }
}
