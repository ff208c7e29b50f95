//! Launchers of `kernels/cuda/rope.cu`: twins of [`crate::rope`]'s `rope` and the fused `rope_qk`, each forward or
//! backward, and `rope_qkv` (q and k rotated, v copied beside k: a KV cache's new rows). The cos/sin tables are f32
//! ([`crate::rope::rope_tables`] builds them; they are small and shared by every layer). Grids are one wave of blocks
//! looping over 8-pair chunks.

pub use crate::rope::Direction;

use super::source::Module;
use super::{
    aligned16, config, kernel, launch, resident_blocks, same_device, u32_arg, CudaDevice, DeviceBuffer, GpuFloat,
    Result, BLOCK,
};

/// x: [tokens, heads, head_dim], cos/sin: [tokens, head_dim/2] f32 → y: [tokens, heads, head_dim] (dy → dx backward)
pub fn rope<T: GpuFloat>(
    dir: Direction,
    x: &DeviceBuffer<T>,
    [cos, sin]: [&DeviceBuffer<f32>; 2],
    heads: usize,
    head_dim: usize,
    y: &mut DeviceBuffer<T>,
) -> Result<()> {
    let kernels = match dir {
        Direction::Forward => (kernel!("rope_forward", T), kernel!("rope_forward_scalar", T)),
        Direction::Backward => (kernel!("rope_backward", T), kernel!("rope_backward_scalar", T)),
    };
    rotate(kernels, x, cos, sin, heads, head_dim, y)
}

/// q: [tokens, q_heads, head_dim], k: [tokens, k_heads, head_dim], cos/sin: [tokens, head_dim/2] f32 → yq, yk: q
/// and k rotated, in one launch
pub fn rope_qk<T: GpuFloat>(
    dir: Direction,
    [q, k]: [&DeviceBuffer<T>; 2],
    [cos, sin]: [&DeviceBuffer<f32>; 2],
    [q_heads, k_heads]: [usize; 2],
    head_dim: usize,
    [yq, yk]: [&mut DeviceBuffer<T>; 2],
) -> Result<()> {
    let kernels = match dir {
        Direction::Forward => (kernel!("rope_qk_forward", T), kernel!("rope_qk_forward_scalar", T)),
        Direction::Backward => (kernel!("rope_qk_backward", T), kernel!("rope_qk_backward_scalar", T)),
    };
    rotate_qk(kernels, [q, k], [cos, sin], [q_heads, k_heads], head_dim, [yq, yk])
}

/// q: [tokens, q_heads, head_dim], k and v: [tokens, k_heads, head_dim], cos/sin: [tokens, head_dim/2] f32 → yq: q
/// rotated; k rotated into `k_dst` and v copied into `v_dst`, from element `at` of each (a KV cache's spare rows), in
/// one launch
pub fn rope_qkv<T: GpuFloat>(
    [q, k, v]: [&DeviceBuffer<T>; 3],
    [cos, sin]: [&DeviceBuffer<f32>; 2],
    [q_heads, k_heads]: [usize; 2],
    head_dim: usize,
    yq: &mut DeviceBuffer<T>,
    ([k_dst, v_dst], at): ([&mut DeviceBuffer<T>; 2], usize),
) -> Result<()> {
    let tokens = crate::rope::check_lengths(q.len(), cos.len(), sin.len(), yq.len(), q_heads, head_dim);
    crate::rope::check_lengths(k.len(), cos.len(), sin.len(), v.len(), k_heads, head_dim);
    let fits = |dst: &DeviceBuffer<T>| at.checked_add(k.len()).is_some_and(|end| end <= dst.len());
    assert!(
        fits(k_dst) && fits(v_dst),
        "rope_qkv: {} elements at {at} into {} and {}",
        k.len(),
        k_dst.len(),
        v_dst.len()
    );
    let devices =
        [q.device(), k.device(), v.device(), cos.device(), sin.device(), yq.device(), k_dst.device(), v_dst.device()];
    let dev = same_device("rope_qkv_forward", &devices);
    if tokens == 0 {
        return Ok(());
    }
    let bytes = (at * std::mem::size_of::<T>()) as u64;
    let (pq, pk, pv, pyq, pc, ps) = (q.ptr(), k.ptr(), v.ptr(), yq.ptr(), cos.ptr(), sin.ptr());
    let (pyk, pyv) = (k_dst.ptr() + bytes, v_dst.ptr() + bytes);
    let kernels = (kernel!("rope_qkv_forward", T), kernel!("rope_qkv_forward_scalar", T));
    let pairs = (q.len() + 2 * k.len()) / 2;
    let plan = Plan::new(dev, kernels, head_dim, pairs, &[pq, pk, pv, pyq, pyk, pyv, pc, ps])?;
    let Plan { kernel, chunks, half, grid, .. } = plan;
    let q_chunks = chunk_count(q.len() / 2 / plan.w);
    let k_chunks = chunk_count((q.len() + k.len()) / 2 / plan.w);
    let (qh32, kh32) = (u32_arg("rope: heads", q_heads), u32_arg("rope: heads", k_heads));
    // SAFETY: kernel(const T* q, const T* k, const T* v, T* yq, T* yk, T* yv, const float* cos, const float* sin,
    // unsigned q_chunks, unsigned k_chunks, unsigned chunks, unsigned q_heads, unsigned k_heads, unsigned half), each of
    // `chunks` steps w pairs of one head: q and yq hold 2·w·q_chunks = tokens·q_heads·head_dim elements, k and v
    // 2·w·(k_chunks − q_chunks) = tokens·k_heads·head_dim each, and k_dst and v_dst that many from `at` (asserted);
    // cos and sin tokens·half; yq, k_dst and v_dst are distinct buffers (&mut borrows), none of them an input (shared
    // borrows); with w = 8, half is a multiple of 8 and every base, the offset ones included, is 16-byte aligned
    // (Plan::new). All on this device.
    unsafe {
        launch!(dev, Module::Rope, kernel, config(grid);
            pq, pk, pv, pyq, pyk, pyv, pc, ps, q_chunks, k_chunks, chunks, qh32, kh32, half)
    }
}

/// The kernels' 32-bit chunk index, below 2³¹ so that a grid-stride step past the last chunk cannot wrap.
fn chunk_count(chunks: usize) -> u32 {
    i32::try_from(chunks).unwrap_or_else(|_| panic!("rope: {chunks} chunks of pairs exceed the kernel's index")) as u32
}

/// (vector kernel, scalar kernel) of one direction.
type Kernels = (&'static str, &'static str);

/// How a launch covers its pairs, the same for both launchers.
struct Plan {
    kernel: &'static str,
    /// Pairs a thread rotates: 8 (16-byte accesses, the vector kernel) when every head's halves and every table row
    /// start 16-byte aligned, else 1 (the scalar kernel).
    w: usize,
    /// Steps of w pairs over all the buffers.
    chunks: u32,
    half: u32,
    /// At most one wave of blocks, looping over the chunks.
    grid: u32,
}

impl Plan {
    /// For `pairs` pairs of `head_dim`-wide heads in buffers based at `ptrs`.
    fn new(dev: &CudaDevice, kernels: Kernels, head_dim: usize, pairs: usize, ptrs: &[u64]) -> Result<Plan> {
        let half = head_dim / 2;
        let w = if half % 8 == 0 && aligned16(ptrs) { 8 } else { 1 };
        let kernel = if w == 8 { kernels.0 } else { kernels.1 };
        let chunks = chunk_count(pairs / w);
        let grid = resident_blocks(dev, Module::Rope, kernel, BLOCK)?.min(chunks.div_ceil(BLOCK));
        Ok(Plan { kernel, w, chunks, half: u32_arg("rope: head_dim", half), grid })
    }
}

fn rotate<T: GpuFloat>(
    kernels: Kernels,
    x: &DeviceBuffer<T>,
    cos: &DeviceBuffer<f32>,
    sin: &DeviceBuffer<f32>,
    heads: usize,
    head_dim: usize,
    y: &mut DeviceBuffer<T>,
) -> Result<()> {
    let tokens = crate::rope::check_lengths(x.len(), cos.len(), sin.len(), y.len(), heads, head_dim);
    let dev = same_device(kernels.0, &[x.device(), cos.device(), sin.device(), y.device()]);
    if tokens == 0 {
        return Ok(());
    }
    let (px, pc, ps, py) = (x.ptr(), cos.ptr(), sin.ptr(), y.ptr());
    let Plan { kernel, chunks, half, grid, .. } = Plan::new(dev, kernels, head_dim, x.len() / 2, &[px, pc, ps, py])?;
    let heads32 = u32_arg("rope: heads", heads);
    // SAFETY: kernel(const T* x, const float* cos, const float* sin, T* y, unsigned chunks, unsigned heads,
    // unsigned half), each of `chunks` steps rotating w pairs of one head: x and y hold 2·w·chunks = tokens·heads·
    // head_dim elements, cos and sin tokens·half (asserted); with w = 8, half is a multiple of 8 and the bases are
    // 16-byte aligned (Plan::new). All on this device.
    unsafe { launch!(dev, Module::Rope, kernel, config(grid); px, pc, ps, py, chunks, heads32, half) }
}

fn rotate_qk<T: GpuFloat>(
    kernels: Kernels,
    [q, k]: [&DeviceBuffer<T>; 2],
    [cos, sin]: [&DeviceBuffer<f32>; 2],
    [q_heads, k_heads]: [usize; 2],
    head_dim: usize,
    [yq, yk]: [&mut DeviceBuffer<T>; 2],
) -> Result<()> {
    let tokens = crate::rope::check_lengths(q.len(), cos.len(), sin.len(), yq.len(), q_heads, head_dim);
    // The tables' lengths tie k's token count to q's.
    crate::rope::check_lengths(k.len(), cos.len(), sin.len(), yk.len(), k_heads, head_dim);
    let dev = same_device(kernels.0, &[q.device(), k.device(), cos.device(), sin.device(), yq.device(), yk.device()]);
    if tokens == 0 {
        return Ok(());
    }
    let (pq, pk, pyq, pyk, pc, ps) = (q.ptr(), k.ptr(), yq.ptr(), yk.ptr(), cos.ptr(), sin.ptr());
    let plan = Plan::new(dev, kernels, head_dim, (q.len() + k.len()) / 2, &[pq, pk, pyq, pyk, pc, ps])?;
    let Plan { kernel, chunks, half, grid, .. } = plan;
    let q_chunks = chunk_count(q.len() / 2 / plan.w);
    let (qh32, kh32) = (u32_arg("rope: heads", q_heads), u32_arg("rope: heads", k_heads));
    // SAFETY: kernel(const T* q, const T* k, T* yq, T* yk, const float* cos, const float* sin, unsigned q_chunks,
    // unsigned chunks, unsigned q_heads, unsigned k_heads, unsigned half), each of `chunks` steps rotating w pairs of
    // one head: q and yq hold 2·w·q_chunks = tokens·q_heads·head_dim elements, k and yk 2·w·(chunks − q_chunks) =
    // tokens·k_heads·head_dim, cos and sin tokens·half (asserted); yq and yk are distinct buffers (two &mut borrows),
    // and neither is q or k (shared borrows); with w = 8, half is a multiple of 8 and the bases are 16-byte aligned
    // (Plan::new). All on this device.
    unsafe {
        launch!(dev, Module::Rope, kernel, config(grid); pq, pk, pyq, pyk, pc, ps, q_chunks, chunks, qh32, kh32, half)
    }
}
