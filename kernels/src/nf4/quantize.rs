//! NF4 quantization: `dQuantizeNF4`'s rounding rule and `kQuantizeBlockwise`'s per-block absmax and packing.

use super::{assert_blocksize, block_absmax, block_scale, blocks_per_task, nf4_num_blocks, nf4_packed_len, scaled};
use super::{WeightElem, NF4_THRESHOLDS};
use rayon::prelude::*;

/// The 4-bit code of one scaled value (`x = w · (1/absmax)`, nominally in [−1, 1]): `dQuantizeNF4`'s decision tree,
/// which is a binary search over the 15 thresholds, level by level (8, 4, 2, 1 codes up when x is above the
/// threshold in the middle). Ties go to the lower code; NaN (an all-zero block, `0 · ∞`) fails every comparison and
/// gives code 0.
#[inline]
pub fn nf4_code_index(x: f32) -> u8 {
    let mut code = 0;
    for step in [8, 4, 2, 1] {
        if x > NF4_THRESHOLDS[code + step - 1] {
            code += step;
        }
    }
    code as u8
}

/// Quantizes one block into `packed` (`len.div_ceil(2)` bytes) and returns its absmax.
fn quantize_nf4_block<T: WeightElem>(x: &[T], packed: &mut [u8]) -> f32 {
    let absmax = block_absmax(x.iter().map(|v| v.to_f32()));
    // Reciprocal-multiply, as the CUDA kernel: `x · (1/absmax)` can differ from `x / absmax` by an ulp, which moves
    // values sitting on a threshold. absmax = 0 makes the scale ∞ and every scaled value NaN → code 0.
    let scale = block_scale(absmax);
    for (byte, pair) in packed.iter_mut().zip(x.chunks(2)) {
        let hi = nf4_code_index(scaled(pair[0].to_f32(), scale));
        // An odd tail is padded, like the kernel's load, with the value 0.0, quantized with the block's scale: code 7
        // (the NF4 zero) in a non-zero block, code 0 in an all-zero one. The nibble is never read back.
        let lo = nf4_code_index(scaled(pair.get(1).map_or(0.0, |v| v.to_f32()), scale));
        *byte = (hi << 4) | lo;
    }
    absmax
}

/// NF4-quantizes a flat row-major weight, as `bitsandbytes.functional.quantize_4bit(w.cuda(), blocksize,
/// quant_type="nf4")` does on CUDA (without double quantization; see [`quantize_absmax_nested`](super::quantize_absmax_nested)).
/// x: \[n\] (f32, bf16 or f16) → packed: [(n + 1) / 2] u8, absmax: [ceil(n / blocksize)] f32.
/// `blocksize` is a power of two in 32..=4096 (bnb's CUDA set; 64 in practice).
pub fn quantize_nf4<T: WeightElem>(x: &[T], blocksize: usize, packed: &mut [u8], absmax: &mut [f32]) {
    assert_blocksize("quantize_nf4", blocksize, 32);
    let n = x.len();
    assert_eq!(packed.len(), nf4_packed_len(n), "quantize_nf4: packed length vs (n + 1) / 2 for n = {n}");
    assert_eq!(absmax.len(), nf4_num_blocks(n, blocksize), "quantize_nf4: absmax length vs blocks for n = {n}");
    let per_task = blocks_per_task(blocksize);
    x.par_chunks(per_task * blocksize)
        .zip(packed.par_chunks_mut(per_task * blocksize / 2))
        .zip(absmax.par_chunks_mut(per_task))
        .for_each(|((x, packed), absmax)| {
            for ((x, packed), a) in x.chunks(blocksize).zip(packed.chunks_mut(blocksize / 2)).zip(absmax) {
                *a = quantize_nf4_block(x, packed);
            }
        });
}
