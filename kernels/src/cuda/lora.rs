//! Launchers of `kernels/cuda/lora.cu`: LoRA's delta weight in the fixed order that makes a merge the same bytes on
//! the GPU as on the CPU (twin: [`crate::lora`]), and training's adapter products through a dropout mask, fused (twin:
//! dropout and the products as separate ops, `qlora_runtime::ops::lora`), and the adapter gradients dU and dB from one
//! read of a projection's output gradient (twin: the two GEMMs, `qlora_runtime::ops::lora::lora_grads`).

use super::source::Module;
use super::{
    allow_smem, kernel, launch, resident_blocks_with_smem, same_device, u32_arg, DeviceBuffer, GpuFloat, Result, BLOCK,
};
use cudarc::driver::LaunchConfig;
use half::bf16;

/// b: [rows, r], a: [r, cols] → out: [rows, cols] = s·(Σ_k b_ik·a_kj), summed from k = 0 with every operation
/// rounded
pub fn delta<T: GpuFloat>(
    b: &DeviceBuffer<T>,
    a: &DeviceBuffer<T>,
    r: usize,
    s: f32,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    let (rows, cols) = crate::lora::delta_dims(b.len(), a.len(), r, out.len());
    let dev = same_device("lora delta", &[b.device(), a.device(), out.device()]);
    if rows * cols == 0 {
        return Ok(());
    }
    let kernel = kernel!("lora_delta", T);
    let cfg = LaunchConfig {
        grid_dim: (u32_arg("lora delta: column tiles", cols.div_ceil(BLOCK as usize)), rows.min(65535) as u32, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let (pb, pa, po) = (b.ptr(), a.ptr(), out.ptr());
    let (rows32, cols32, r32) =
        (u32_arg("lora delta: rows", rows), u32_arg("lora delta: cols", cols), u32_arg("lora delta: r", r));
    // SAFETY: lora_delta_T(const T* b, const T* a, T* out, unsigned rows, unsigned cols, unsigned r, float s): b
    // holds rows·r elements, a r·cols and out rows·cols (asserted), on this device; threads past cols return, and
    // grid.y strides over rows.
    unsafe { launch!(dev, Module::Lora, kernel, cfg; pb, pa, po, rows32, cols32, r32, s) }
}

/// The largest rank [`dropout_down`] and [`dropout_up_add`] take (A's rows staged in shared memory).
pub const DROPOUT_MAX_R: usize = 64;

/// The mask of [`crate::elementwise::dropout`] over a row-major tensor: element i dropped when its draw
/// `Rng::uniform_at(seed, i)` is < p, kept ones multiplied by `keep` (1/(1 − p) in f32).
#[derive(Clone, Copy, Debug)]
pub struct DropoutMask {
    pub p: f64,
    pub seed: u64,
    pub keep: f32,
}

/// x: [rows, cols], a: [r, cols] (r ≤ [`DROPOUT_MAX_R`]) → u: [rows, r] = dropout(x)·Aᵀ with x's `mask`, in one
/// pass over x; f32 sums rounded once.
pub fn dropout_down(
    x: &DeviceBuffer<bf16>,
    a: &DeviceBuffer<bf16>,
    r: usize,
    mask: DropoutMask,
    u: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    let (rows, cols) = dropout_dims("lora dropout_down", x.len(), u.len(), a.len(), r);
    let dev = same_device("lora dropout_down", &[x.device(), a.device(), u.device()]);
    if u.is_empty() {
        return Ok(());
    }
    let (kernel, rows_per_warp) = match r {
        0..=16 => ("lora_dropout_down_r16_bf16", 2),
        17..=32 => ("lora_dropout_down_r32_bf16", 1),
        _ => ("lora_dropout_down_r64_bf16", 1),
    };
    let cfg = LaunchConfig {
        grid_dim: (u32_arg("lora dropout_down: row blocks", rows.div_ceil(8 * rows_per_warp)), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (px, pa, pu) = (x.ptr(), a.ptr(), u.ptr());
    let (rows32, cols32, r32) = (u32_arg("lora dropout_down: rows", rows), u32_arg("cols", cols), r as u32);
    let (seed, below, keep, vec) = (mask.seed, drop_below(mask.p), mask.keep, vectorized(cols));
    // SAFETY: lora_dropout_down_rR_bf16(const bf16* x, const bf16* a, bf16* u, unsigned rows, unsigned cols,
    // unsigned r, u64 seed, u64 drop_below, float keep, unsigned vec): x holds rows·cols elements, a r·cols and u
    // rows·r (asserted), on this device, each from the start of its allocation (16-byte aligned); r ≤ the kernel's
    // RT; 8 warps of 256 threads own 8·max(1, 32/RT) rows a block, the grid covers every row.
    unsafe { launch!(dev, Module::Lora, kernel, cfg; px, pa, pu, rows32, cols32, r32, seed, below, keep, vec) }
}

/// dx: [rows, cols] += dropout(du·A) in place with the `mask` over [rows, cols], du: [rows, r], a: [r, cols]
/// (r ≤ [`DROPOUT_MAX_R`]): one pass over dx where a product, a dropout and an add took six.
pub fn dropout_up_add(
    dx: &mut DeviceBuffer<bf16>,
    du: &DeviceBuffer<bf16>,
    a: &DeviceBuffer<bf16>,
    r: usize,
    mask: DropoutMask,
) -> Result<()> {
    let (rows, cols) = dropout_dims("lora dropout_up_add", dx.len(), du.len(), a.len(), r);
    let dev = same_device("lora dropout_up_add", &[dx.device(), du.device(), a.device()]);
    if dx.is_empty() {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (
            u32_arg("lora dropout_up_add: column blocks", cols.div_ceil(256)),
            rows.div_ceil(32).min(65535) as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (pdx, pdu, pa) = (dx.ptr(), du.ptr(), a.ptr());
    let (rows32, cols32, r32) = (u32_arg("lora dropout_up_add: rows", rows), u32_arg("cols", cols), r as u32);
    let (seed, below, keep, vec) = (mask.seed, drop_below(mask.p), mask.keep, vectorized(cols));
    // SAFETY: lora_dropout_up_add_bf16(bf16* dx, const bf16* du, const bf16* a, unsigned rows, unsigned cols,
    // unsigned r, u64 seed, u64 drop_below, float keep, unsigned vec): dx holds rows·cols elements, du rows·r and a
    // r·cols (asserted), on this device, each from the start of its allocation; r ≤ 64, the kernel's staging; the
    // grid covers every column, grid.y strides over the row tiles.
    unsafe {
        launch!(dev, Module::Lora, "lora_dropout_up_add_bf16", cfg; pdx, pdu, pa, rows32, cols32, r32, seed, below, keep, vec)
    }
}

/// A matrix's rows inside a buffer: the first at element `offset`, each `ld` elements after the one before (a column
/// block of a wider matrix).
pub struct Rows<B> {
    pub buf: B,
    pub offset: usize,
    pub ld: usize,
}

/// Whether [`grads`] takes rank `r`, `cols` output columns and U's and dU's rows at these (offset, ld): the ranks it
/// has kernels for, and every row 16-byte aligned (cp.async and ldmatrix move 8 bf16 at a time).
pub fn grads_fit(cols: usize, r: usize, rows_at: [(usize, usize); 2]) -> bool {
    matches!(r, 16 | 32 | 64) && cols % 8 == 0 && rows_at.iter().all(|&(offset, ld)| offset % 8 == 0 && ld % 8 == 0)
}

/// Rows of dy in a block's tile, and its columns ([`grads`]' kernel's LORA_GRADS_BM and _BN).
const GRADS_TILE: [usize; 2] = [64, 128];

/// [`grads`]' grid for `rows` rows of dy in `col_chunks` column chunks when `resident` blocks fit the GPU at once:
/// (column chunks, row chunks, row blocks per row chunk). One wave: the column chunks times as many row chunks as fit
/// beside them, each a whole number of row blocks (a second wave of a few blocks would take as long as the first).
fn grads_grid(rows: usize, col_chunks: usize, resident: usize) -> (usize, usize, usize) {
    let blocks = rows.div_ceil(GRADS_TILE[0]);
    let row_blocks = blocks.div_ceil((resident / col_chunks).clamp(1, blocks));
    (col_chunks, blocks.div_ceil(row_blocks), row_blocks)
}

/// dU = s·dy·B and dB = s·dyᵀ·U from one read of dy: dy [rows, cols], b [cols, r], u's rows (r values each) → du's rows
/// (r values each, written in place) and db [cols, r]. f32 sums in a fixed order rounded once, the same bits run to
/// run; for [`grads_fit`] shapes.
pub fn grads(
    dy: &DeviceBuffer<bf16>,
    b: &DeviceBuffer<bf16>,
    u: Rows<&DeviceBuffer<bf16>>,
    s: f32,
    du: Rows<&mut DeviceBuffer<bf16>>,
    db: &mut DeviceBuffer<bf16>,
    [rows, cols, r]: [usize; 3],
) -> Result<()> {
    assert!(grads_fit(cols, r, [(u.offset, u.ld), (du.offset, du.ld)]), "lora grads: rank {r}, {cols} columns");
    assert!(
        dy.len() == rows * cols && b.len() == cols * r && db.len() == cols * r,
        "lora grads: [{rows}, {cols}]·r {r}"
    );
    for (what, offset, ld, len) in [("u", u.offset, u.ld, u.buf.len()), ("du", du.offset, du.ld, du.buf.len())] {
        assert!(ld >= r && (rows == 0 || offset + (rows - 1) * ld + r <= len), "lora grads: {what}'s rows");
    }
    let dev = same_device("lora grads", &[dy.device(), b.device(), u.buf.device(), du.buf.device(), db.device()]);
    let kernel = match r {
        16 => "lora_grads_r16_bf16",
        32 => "lora_grads_r32_bf16",
        _ => "lora_grads_r64_bf16",
    };
    let [bm, bn] = GRADS_TILE;
    // Column tiles a block owns (CT), and its shared memory: B's rows for them, three stages of U's rows and of dy's
    // tile (rows padded by 8 elements against bank conflicts), dU's exchange between column halves.
    let tiles = 64 / r;
    let smem = 2 * (tiles * bn * (r + 8) + 3 * bm * (r + 8) + 3 * bm * (bn + 8)) + 4 * bm * r;
    let (col_chunks, row_chunks, row_blocks) = if rows * cols == 0 {
        (0, 0, 0)
    } else {
        allow_smem(dev, Module::Lora, kernel, smem as u32)?;
        let resident = resident_blocks_with_smem(dev, Module::Lora, kernel, 256, smem as u32)? as usize;
        grads_grid(rows, cols.div_ceil(tiles * bn), resident)
    };
    let pu = dev.alloc::<f32>(col_chunks * rows * r)?;
    let pb = dev.alloc::<f32>(row_chunks * cols * r)?;
    let (rows32, cols32, r32) = (u32_arg("lora grads: rows", rows), u32_arg("lora grads: cols", cols), r as u32);
    if rows * cols > 0 {
        let cfg = LaunchConfig {
            grid_dim: (col_chunks as u32, row_chunks as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (pdy, pbm, puu) = (dy.ptr(), b.ptr(), u.buf.ptr() + 2 * u.offset as u64);
        let (ppu, ppb, ldu, rb) = (pu.ptr(), pb.ptr(), u32_arg("lora grads: ldu", u.ld), row_blocks as u32);
        // SAFETY: lora_grads_rR_bf16(const bf16* dy, const bf16* b, const bf16* u, float* pu, float* pb, unsigned
        // rows, unsigned cols, unsigned ldu, unsigned row_blocks): dy holds rows·cols elements and b cols·r; u's rows
        // lie in its buffer (asserted) 16-byte aligned (grads_fit; allocations are aligned); pu holds col_chunks·
        // rows·r and pb row_chunks·cols·r f32, the grid's chunks; the dynamic shared memory is the kernel's layout.
        unsafe { launch!(dev, Module::Lora, kernel, cfg; pdy, pbm, puu, ppu, ppb, rows32, cols32, ldu, rb)? }
    }
    let n = (rows + cols) * r;
    if n == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (u32_arg("lora grads: finish blocks", n.div_ceil(BLOCK as usize)), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let (ppu, ppb, pdu, pdb) = (pu.ptr(), pb.ptr(), du.buf.ptr() + 2 * du.offset as u64, db.ptr());
    let (ld, nc, nr) = (u32_arg("lora grads: ld", du.ld), col_chunks as u32, row_chunks as u32);
    // SAFETY: lora_grads_finish_bf16(const float* pu, const float* pb, bf16* du, bf16* db, unsigned rows, unsigned
    // cols, unsigned r, unsigned ldu, unsigned nc, unsigned nr, float s): pu and pb hold nc and nr chunks (allocated
    // above), du's rows lie in its buffer (asserted), db holds cols·r; one thread per output element.
    unsafe {
        launch!(dev, Module::Lora, "lora_grads_finish_bf16", cfg; ppu, ppb, pdu, pdb, rows32, cols32, r32, ld, nc, nr, s)
    }
}

/// (rows, cols) of a dropout product between a [rows, cols] tensor of `big` elements, a [rows, r] one of `small`
/// and A of `a_len` = r·cols.
fn dropout_dims(op: &str, big: usize, small: usize, a_len: usize, r: usize) -> (usize, usize) {
    assert!((1..=DROPOUT_MAX_R).contains(&r), "{op}: rank {r} outside 1..={DROPOUT_MAX_R}");
    assert!(small % r == 0 && a_len % r == 0, "{op}: [rows, r] of {small} and A of {a_len} elements for r = {r}");
    let (rows, cols) = (small / r, a_len / r);
    assert_eq!(big, rows * cols, "{op}: {big} elements for [{rows}, {cols}]");
    (rows, cols)
}

/// Dropout's mask in integers: element i is dropped when its draw `Rng::uniform_at` = (z >> 11)·2⁻⁵³ is < p, i.e.
/// when z >> 11 < ⌈p·2⁵³⌉ (an integer below a real is below its ceiling; p·2⁵³ is exact in f64).
pub fn drop_below(p: f64) -> u64 {
    (p * (1u64 << 53) as f64).ceil() as u64
}

/// Whether every row of `cols` bf16 values starts 16-byte aligned (allocations are), for the kernels' vector loads.
fn vectorized(cols: usize) -> u32 {
    u32::from(cols % 8 == 0)
}

#[cfg(test)]
mod tests {
    use super::{drop_below, grads_grid};
    use crate::Rng;

    /// The grid fills one wave and no more: on an H100 (264 blocks resident) the 8B's gate/up (8192 rows, 28 column
    /// chunks) gets 9 row chunks of 15 row blocks (252 blocks; rounding the row chunks up ran 280, a second wave of
    /// 16), k/v (2 column chunks) one row block each; every row block is covered once, a chunk too wide for a wave
    /// still gets one row chunk, and a single row gets one block.
    #[test]
    fn the_lora_grads_grid_is_one_wave() {
        assert_eq!(grads_grid(8192, 28, 264), (28, 9, 15));
        assert_eq!(grads_grid(8192, 2, 264), (2, 128, 1));
        assert_eq!(grads_grid(1, 3, 264), (3, 1, 1));
        assert_eq!(grads_grid(8192, 400, 264), (400, 1, 128));
        for (rows, col_chunks, resident) in [(8192, 28, 264), (8192, 8, 264), (4099, 3, 132), (65, 1, 1000), (64, 7, 8)]
        {
            let (c, r, per) = grads_grid(rows, col_chunks, resident);
            let blocks = rows.div_ceil(64);
            assert!(c * r <= resident.max(c), "{rows} rows, {col_chunks} chunks: {c} x {r} blocks past {resident}");
            assert!(r * per >= blocks && (r - 1) * per < blocks, "{rows} rows: {r} chunks of {per} row blocks");
        }
    }

    /// The kernels' integer test drops exactly the elements whose draw is below p, at p on either side of a draw too
    /// (where ⌊·⌋ instead of ⌈·⌉, or ≤ instead of <, would disagree).
    #[test]
    fn drop_below_is_the_draw_test_in_integers() {
        for seed in [0, 7, u64::MAX] {
            for i in 0..2000u64 {
                let draw = Rng::uniform_at(seed, i);
                let z53 = (draw * (1u64 << 53) as f64) as u64;
                let ps = [
                    0.0,
                    0.05,
                    0.5,
                    0.9999,
                    draw,
                    f64::from_bits(draw.to_bits() + 1),
                    f64::from_bits(draw.to_bits().saturating_sub(1)),
                ];
                for p in ps.into_iter().filter(|p| (0.0..1.0).contains(p)) {
                    assert_eq!(z53 < drop_below(p), draw < p, "seed {seed}, draw {i} = {draw}, p = {p}");
                }
            }
        }
    }
}
