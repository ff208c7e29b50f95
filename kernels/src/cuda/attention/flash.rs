//! The flash kernels' parameters and their launch (which kernel serves a launch is `tables.rs`'s).

use super::FlashKernel;
use crate::cuda::{allow_smem, launch, resident_blocks_with_smem, u32_arg, CudaDevice, Result};
use cudarc::driver::{DeviceRepr, LaunchConfig};

/// flash_common.cuh's `FlashParams`, passed by value: the buffers' device addresses and the geometry.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct FlashParams {
    pub(super) q: u64,
    pub(super) k: u64,
    pub(super) v: u64,
    pub(super) out: u64,
    pub(super) lse: u64,
    pub(super) d_out: u64,
    pub(super) delta: u64,
    pub(super) dq_accum: u64,
    pub(super) dk: u64,
    pub(super) dv: u64,
    pub(super) cu_q: u64,
    pub(super) cu_k: u64,
    pub(super) n_heads: u32,
    pub(super) n_kv_heads: u32,
    pub(super) head_dim: u32,
    pub(super) window: i32,
    pub(super) scale: f32,
    pub(super) softcap: f32,
    pub(super) causal: i32,
    pub(super) tq: u32,
    pub(super) tk: u32,
    pub(super) n_seqs: u32,
    pub(super) tiles: u32,
    pub(super) pad: u32,
}

// SAFETY: `repr(C)`: twelve 8-byte addresses then twelve 4-byte fields, in the order of flash_common.cuh's
// `struct FlashParams`, whose natural layout is the same (144 bytes, no interior padding).
unsafe impl DeviceRepr for FlashParams {}

/// One flash kernel launch over `rows` (query or key rows of the longest sequence) × `heads` × `n_seqs` work items of
/// `kernel.rows` rows each: a block per item, or for a persistent kernel one block per multiprocessor walking them
/// (flash_common.cuh `flash_block`, `flash_item`), with `params` by value, the kernel's dynamic shared memory allowed
/// past the 48 KiB default first.
pub(super) fn launch(
    dev: &CudaDevice,
    kernel: FlashKernel,
    mut params: FlashParams,
    rows: usize,
    heads: usize,
    n_seqs: usize,
) -> Result<()> {
    let tiles = rows.div_ceil(kernel.rows);
    let FlashKernel { module, name, threads, smem, persistent, .. } = kernel;
    allow_smem(dev, module, name, smem as u32)?;
    params.n_seqs = u32_arg("attention: sequences", n_seqs);
    params.tiles = u32_arg("attention: tiles of the longest sequence", tiles);
    let grid_dim = if persistent {
        let items = tiles.saturating_mul(heads).saturating_mul(n_seqs);
        let blocks = resident_blocks_with_smem(dev, module, name, threads as u32, smem as u32)? as usize;
        (blocks.min(items).max(1) as u32, 1, 1)
    } else {
        flash_grid(tiles, heads, n_seqs)
    };
    let cfg = LaunchConfig { grid_dim, block_dim: (threads as u32, 1, 1), shared_mem_bytes: smem as u32 };
    // SAFETY: flash_*(const FlashParams p): every address in `params` is a buffer of this device sized as the
    // callers assert (q, out, d_out, dq_accum: tq·n_heads·head_dim; k, v, dk, dv: tk·n_kv_heads·head_dim; lse, delta:
    // tq·n_heads; cu_q, cu_k: n_seqs + 1), and the kernels skip any sequence whose offsets leave 0..tq or 0..tk; the
    // block size and shared memory are what the kernel's template uses (FLASH and FLASH_SM90, checked against the .cu
    // files' template arguments), and an sm90 kernel is picked only on an sm_90a target.
    unsafe { launch!(dev, module, name, cfg; params) }
}

/// The grid of a block per work item, (heads, sequences, tiles): the tile varies slowest in launch order, so the
/// heaviest causal tiles of every head start first (flash_common.cuh `flash_block`).
fn flash_grid(tiles: usize, heads: usize, n_seqs: usize) -> (u32, u32, u32) {
    assert!(
        tiles <= 65_535 && n_seqs <= 65_535,
        "attention: {tiles} tiles of the longest sequence or {n_seqs} sequences exceed a grid"
    );
    (u32::try_from(heads).expect("attention: heads fit a grid's x"), n_seqs as u32, tiles as u32)
}

#[cfg(test)]
mod tests {
    #[test]
    fn params_are_laid_out_as_the_kernels_read_them() {
        assert_eq!(std::mem::size_of::<super::FlashParams>(), 144, "flash_common.cuh's FlashParams is 144 bytes");
    }
}
