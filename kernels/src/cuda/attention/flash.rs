//! The flash kernels' parameters and their launch (which kernel serves a launch is `tables.rs`'s).

use super::FlashKernel;
use super::Half;
use crate::cuda::{allow_smem, launch, resident_blocks_with_smem, u32_arg, CudaDevice, Error, Result};
use cudarc::driver::sys::{
    cuTensorMapEncodeTiled, CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave,
    CUtensorMapL2promotion, CUtensorMapSwizzle,
};
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

/// flash_wgmma.cuh's `FlashMaps`: the TMA descriptors of Q, K, V, dO and dq_accum, passed by value after the
/// parameters.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct FlashMaps {
    q: CUtensorMap,
    k: CUtensorMap,
    v: CUtensorMap,
    d_out: CUtensorMap,
    dq_accum: CUtensorMap,
}

// SAFETY: `repr(C)` of five 128-byte, 128-aligned CUtensorMaps, as flash_wgmma.cuh's `FlashMaps` of five
// alignas(128) `TmaMap`s: 640 bytes, no padding.
unsafe impl DeviceRepr for FlashMaps {}

/// How many rows a TMA kernel's boxes take: its query tiles' (Q, dO) and its key tiles' (K, V).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TmaBoxes {
    pub(super) q_rows: usize,
    pub(super) kv_rows: usize,
}

/// The TMA descriptors of `params`' Q, K, V and (a backward's, `params.d_out` set) dO ([tokens, heads, head_dim],
/// 2-byte elements of `half`) in `boxes`: each a 3-D tensor (head_dim fastest, then heads, then tokens) boxed 64
/// columns × 1 head × rows, 128-byte swizzled, so a box lands as one column block of flash_wgmma.cuh's shared layout
/// and columns past head_dim as zeros. A backward's f32 dq_accum (`params.dq_accum` set; same shape) is boxed 32
/// columns × 1 head × the query rows, 128-byte swizzled: the staging tile its reduce-adds read. A forward's dO and
/// dq_accum maps are zeros, unread. None where TMA cannot address the buffers: rows not a multiple of 16 bytes
/// (head_dim % 8 ≠ 0), a buffer not 16-byte aligned, or no keys.
pub(super) fn tensor_maps(params: &FlashParams, half: Half, boxes: TmaBoxes) -> Result<Option<FlashMaps>> {
    let hd = u64::from(params.head_dim);
    let aligned = [params.q, params.k, params.v, params.d_out, params.dq_accum].iter().all(|&a| a % 16 == 0);
    if hd % 8 != 0 || !aligned || params.tk == 0 || params.tq == 0 {
        return Ok(None);
    }
    let half_type = match half {
        Half::Bf16 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        Half::F16 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let TmaBoxes { q_rows, kv_rows } = boxes;
    let map = |address: u64, heads: u32, tokens: u32, rows: usize| -> Result<CUtensorMap> {
        encode_map(
            address,
            half_type,
            2,
            [hd, u64::from(heads), u64::from(tokens)],
            [64, 1, u32_arg("attention: rows per TMA box", rows)],
        )
    };
    let unused = || CUtensorMap { opaque: [0; 16] };
    Ok(Some(FlashMaps {
        q: map(params.q, params.n_heads, params.tq, q_rows)?,
        k: map(params.k, params.n_kv_heads, params.tk, kv_rows)?,
        v: map(params.v, params.n_kv_heads, params.tk, kv_rows)?,
        d_out: match params.d_out {
            0 => unused(),
            d_out => map(d_out, params.n_heads, params.tq, q_rows)?,
        },
        dq_accum: match params.dq_accum {
            0 => unused(),
            dq_accum => encode_map(
                dq_accum,
                CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
                4,
                [hd, u64::from(params.n_heads), u64::from(params.tq)],
                [32, 1, u32_arg("attention: rows per TMA box", q_rows)],
            )?,
        },
    }))
}

/// A 3-D tensor map ([dims[2]][dims[1]][dims[0]], dims[0] fastest, elements of `bytes` bytes, dense) boxed `boxes`,
/// 128-byte swizzled.
fn encode_map(
    address: u64,
    dtype: CUtensorMapDataType,
    bytes: u64,
    dims: [u64; 3],
    boxes: [u32; 3],
) -> Result<CUtensorMap> {
    let strides = [dims[0] * bytes, dims[1] * dims[0] * bytes];
    let mut map = CUtensorMap { opaque: [0; 16] };
    // SAFETY: `map` is a writable CUtensorMap; dims, strides, boxes and element strides are arrays of the rank
    // (3) and rank − 1 entries the driver reads; the driver checks the values (alignment, box ≤ 256, strides a
    // multiple of 16) and returns an error for any it rejects, and only encodes the address (no access).
    unsafe {
        cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            3,
            address as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            [1u32; 3].as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .map_err(Error::driver("cuTensorMapEncodeTiled"))?;
    Ok(map)
}

/// One flash kernel launch over `rows` (query or key rows of the longest sequence) × `heads` × `n_seqs` work items of
/// `kernel.rows` rows each: a block per item, or for a persistent kernel one block per multiprocessor walking them
/// (flash_common.cuh `flash_block`, `flash_item`), with `params` by value (and `maps` after them for a kernel that
/// loads by TMA: [`FlashKernel::tma`]), the kernel's dynamic shared memory allowed past the 48 KiB default first.
pub(super) fn launch(
    dev: &CudaDevice,
    kernel: FlashKernel,
    mut params: FlashParams,
    maps: Option<FlashMaps>,
    rows: usize,
    heads: usize,
    n_seqs: usize,
) -> Result<()> {
    let tiles = rows.div_ceil(kernel.rows);
    let FlashKernel { module, name, threads, smem, persistent, tma, seq_major, .. } = kernel;
    assert_eq!(tma.is_some(), maps.is_some(), "attention: {name} takes TMA descriptors iff it loads by TMA");
    allow_smem(dev, module, name, smem as u32)?;
    params.n_seqs = u32_arg("attention: sequences", n_seqs);
    params.tiles = u32_arg("attention: tiles of the longest sequence", tiles);
    let grid_dim = if persistent {
        let items = tiles.saturating_mul(heads).saturating_mul(n_seqs);
        let blocks = resident_blocks_with_smem(dev, module, name, threads as u32, smem as u32)? as usize;
        (blocks.min(items).max(1) as u32, 1, 1)
    } else {
        flash_grid(tiles, heads, n_seqs, seq_major)
    };
    let cfg = LaunchConfig { grid_dim, block_dim: (threads as u32, 1, 1), shared_mem_bytes: smem as u32 };
    // SAFETY: flash_*(const FlashParams p): every address in `params` is a buffer of this device sized as the
    // callers assert (q, out, d_out, dq_accum: tq·n_heads·head_dim; k, v, dk, dv: tk·n_kv_heads·head_dim; lse, delta:
    // tq·n_heads; cu_q, cu_k: n_seqs + 1), and the kernels skip any sequence whose offsets leave 0..tq or 0..tk; the
    // block size and shared memory are what the kernel's template uses (FLASH and FLASH_SM90, checked against the .cu
    // files' template arguments), and an sm90 kernel is picked only on an sm_90a target. A TMA kernel's maps
    // describe q, k and v of these params with its box sizes (`tensor_maps`).
    match maps {
        Some(maps) => unsafe { launch!(dev, module, name, cfg; params, maps) },
        None => unsafe { launch!(dev, module, name, cfg; params) },
    }
}

/// The grid of a block per work item, (heads, sequences, tiles): the tile varies slowest in launch order, so the
/// heaviest causal tiles of every head start first; `seq_major`: (heads, tiles, sequences), the sequence slowest
/// (flash_common.cuh `flash_block`).
fn flash_grid(tiles: usize, heads: usize, n_seqs: usize, seq_major: bool) -> (u32, u32, u32) {
    assert!(
        tiles <= 65_535 && n_seqs <= 65_535,
        "attention: {tiles} tiles of the longest sequence or {n_seqs} sequences exceed a grid"
    );
    let heads = u32::try_from(heads).expect("attention: heads fit a grid's x");
    if seq_major {
        (heads, tiles as u32, n_seqs as u32)
    } else {
        (heads, n_seqs as u32, tiles as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::{tensor_maps, FlashParams, Half, TmaBoxes};

    /// Layouts TMA cannot address are refused before any driver call (so this runs without a GPU), which sends the
    /// launch to the mma.sync forward.
    #[test]
    fn tma_refuses_what_it_cannot_address() {
        let ok = FlashParams {
            q: 1 << 20,
            k: 2 << 20,
            v: 3 << 20,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            tq: 4096,
            tk: 4096,
            ..FlashParams::default()
        };
        let refused = [
            FlashParams { head_dim: 100, ..ok },
            FlashParams { k: (2 << 20) + 8, ..ok },
            FlashParams { d_out: (4 << 20) + 4, ..ok },
            FlashParams { dq_accum: (5 << 20) + 8, ..ok },
            FlashParams { tk: 0, ..ok },
            FlashParams { tq: 0, ..ok },
        ];
        for p in refused {
            let boxes = TmaBoxes { q_rows: 128, kv_rows: 128 };
            assert!(tensor_maps(&p, Half::Bf16, boxes).expect("no driver call").is_none());
        }
    }

    #[test]
    fn params_are_laid_out_as_the_kernels_read_them() {
        assert_eq!(std::mem::size_of::<super::FlashParams>(), 144, "flash_common.cuh's FlashParams is 144 bytes");
        assert_eq!(std::mem::size_of::<super::FlashMaps>(), 640, "flash_wgmma.cuh's FlashMaps is 640 bytes");
        assert_eq!(std::mem::align_of::<super::FlashMaps>(), 128, "and 128-aligned");
    }
}
