//! NF4 dequantization: `kDequantizeBlockwise`, the specification `kernels/cuda/nf4.cu` is tested against.

use super::{assert_blocksize, blocks_per_task, nf4_num_blocks, nf4_packed_len, nf4_value, WeightElem};
use rayon::prelude::*;

/// `NF4_CODE[q] · absmax` in f32, rounded once to `T`: bnb's `kDequantizeBlockwise` (and `dequantize_4bit` with
/// `quant_state.dtype = T`). For a double-quantized weight, first rebuild absmax with [`dequantize_absmax_nested`](super::dequantize_absmax_nested).
/// packed: [(n + 1) / 2] u8, absmax: [ceil(n / blocksize)] f32 → out: \[n\] (f32, bf16 or f16).
pub fn dequantize_nf4<T: WeightElem>(packed: &[u8], absmax: &[f32], blocksize: usize, out: &mut [T]) {
    assert_blocksize("dequantize_nf4", blocksize, 32);
    let n = out.len();
    assert_eq!(packed.len(), nf4_packed_len(n), "dequantize_nf4: packed length vs (n + 1) / 2 for n = {n}");
    assert_eq!(absmax.len(), nf4_num_blocks(n, blocksize), "dequantize_nf4: absmax length vs blocks for n = {n}");
    let per_task = blocks_per_task(blocksize);
    out.par_chunks_mut(per_task * blocksize)
        .zip(packed.par_chunks(per_task * blocksize / 2))
        .zip(absmax.par_chunks(per_task))
        .for_each(|((out, packed), absmax)| {
            for ((out, packed), &a) in out.chunks_mut(blocksize).zip(packed.chunks(blocksize / 2)).zip(absmax) {
                for (pair, &byte) in out.chunks_mut(2).zip(packed) {
                    pair[0] = T::from_f32(nf4_value(byte >> 4, a));
                    if let Some(second) = pair.get_mut(1) {
                        *second = T::from_f32(nf4_value(byte & 0x0F, a));
                    }
                }
            }
        });
}

/// [`dequantize_nf4`] of W' = diag(row_scale)·W for W [rows, row_len] (`row_len` a multiple of `blocksize`): every
/// block's absmax is first multiplied by its row's factor, one f32 rounding, so the scaled weight comes out of the
/// dequantization itself (DoRA folds its m/n into W this way). row_scale: \[rows\].
pub fn dequantize_nf4_rows_scaled<T: WeightElem>(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    row_scale: &[f32],
    row_len: usize,
    out: &mut [T],
) {
    assert!(
        row_len > 0 && row_len % blocksize == 0 && row_scale.len() * row_len == out.len(),
        "dequantize_nf4_rows_scaled: {} row factors for rows of {row_len} (whole blocks of {blocksize}) over {}",
        row_scale.len(),
        out.len()
    );
    let row_blocks = row_len / blocksize;
    let scaled: Vec<f32> = absmax.iter().enumerate().map(|(b, &a)| a * row_scale[b / row_blocks]).collect();
    dequantize_nf4(packed, &scaled, blocksize, out);
}
