//! bitsandbytes' blockwise 8-bit quantization with a 256-entry code, and the double quantization of an NF4 absmax
//! vector built on it.

use super::{assert_blocksize, block_absmax, block_scale, ftz, scaled, DYNAMIC_MAP_SIGNED, NESTED_BLOCKSIZE};
use rayon::prelude::*;

/// The nearest entry of a sorted 256-value code: `dQuantize<0>` of `csrc/kernels.cu`, transcribed (a 7-step binary
/// search from pivot 127, then a midpoint test against the neighbour on the side of `x`; an exact midpoint stays on
/// the pivot where the search ended). NaN ends on index 0.
#[inline]
pub fn quantize_8bit_nearest(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot = 127usize;
    let mut upper_pivot = 255usize;
    let mut lower_pivot = 0usize;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut step = 64;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    let q = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    q as u8
}

fn code_256<'a>(what: &str, code: &'a [f32]) -> &'a [f32; 256] {
    code.try_into().unwrap_or_else(|_| panic!("{what}: the 8-bit code has {} entries, not 256", code.len()))
}

/// bnb's blockwise 8-bit quantization (`quantize_blockwise` on CUDA, `kQuantizeBlockwise<float, …, General8bit>`):
/// per block absmax = max |x|, then each `x · (1/absmax)` → its nearest `code` entry ([`quantize_8bit_nearest`]).
/// x: \[n\] f32, code: \[256\] sorted → q: \[n\] u8, absmax: [ceil(n / blocksize)] f32. blocksize: power of two in 64..=4096.
pub fn quantize_blockwise_8bit(x: &[f32], code: &[f32], blocksize: usize, q: &mut [u8], absmax: &mut [f32]) {
    assert_blocksize("quantize_blockwise_8bit", blocksize, 64);
    let code = code_256("quantize_blockwise_8bit", code);
    assert_eq!(q.len(), x.len(), "quantize_blockwise_8bit: q length vs x");
    assert_eq!(absmax.len(), x.len().div_ceil(blocksize), "quantize_blockwise_8bit: absmax length vs blocks");
    x.par_chunks(blocksize).zip(q.par_chunks_mut(blocksize)).zip(absmax.par_iter_mut()).for_each(|((x, q), a)| {
        *a = block_absmax(x.iter().copied());
        let scale = block_scale(*a);
        for (q, &v) in q.iter_mut().zip(x) {
            *q = quantize_8bit_nearest(code, scaled(v, scale));
        }
    });
}

/// `code[q] · absmax[i / blocksize]` in f32 (`kDequantizeBlockwise<float, …, General8bit>`).
/// q: \[n\] u8, absmax: [ceil(n / blocksize)] f32, code: \[256\] → out: \[n\] f32.
pub fn dequantize_blockwise_8bit(q: &[u8], absmax: &[f32], code: &[f32], blocksize: usize, out: &mut [f32]) {
    assert_blocksize("dequantize_blockwise_8bit", blocksize, 64);
    let code = code_256("dequantize_blockwise_8bit", code);
    assert_eq!(out.len(), q.len(), "dequantize_blockwise_8bit: out length vs q");
    assert_eq!(absmax.len(), q.len().div_ceil(blocksize), "dequantize_blockwise_8bit: absmax length vs blocks");
    out.par_chunks_mut(blocksize).zip(q.par_chunks(blocksize)).zip(absmax.par_iter()).for_each(|((out, q), &a)| {
        for (o, &q) in out.iter_mut().zip(q) {
            *o = ftz(code[q as usize] * a);
        }
    });
}

/// A double-quantized absmax vector, as bnb's `QuantState` holds it with `compress_statistics=True` and as
/// checkpoints store it: `qabsmax` → `weight.absmax` (u8), `absmax2` → `weight.nested_absmax` (f32), `offset` → JSON
/// `nested_offset`; the code is [`DYNAMIC_MAP_SIGNED`] (`weight.nested_quant_map`).
#[derive(Clone, Debug, PartialEq)]
pub struct NestedAbsmax {
    /// Mean of the absmax vector ([`absmax_mean`]).
    pub offset: f32,
    /// One byte per NF4 block: the index of `(absmax[i] − offset) / absmax2[i / 256]` in the dynamic map.
    pub qabsmax: Vec<u8>,
    /// max |absmax − offset| per run of [`NESTED_BLOCKSIZE`] NF4 blocks: [ceil(nb / 256)].
    pub absmax2: Vec<f32>,
}

/// The offset bnb subtracts before nested quantization: `torch.mean(absmax)` on the GPU, which is an f32 tree sum
/// times `(float)1/n` (PyTorch's CUDA `mean_kernel_impl`, `MeanOps::project` = `acc · factor`). The tree's order is
/// launch-dependent and not reproduced: the sum is taken in f64 (exact for any realistic absmax vector) and rounded once
/// to f32, which is what the f32 tree gives whenever it makes no rounding error, then multiplied by `1.0f32 / n` as torch
/// does. On the fixtures it equals bnb's offset in 10 of 13 tensors and is one ulp off in the others; readers must use
/// the stored offset. absmax: \[nb\], nb ≥ 1.
pub fn absmax_mean(absmax: &[f32]) -> f32 {
    assert!(!absmax.is_empty(), "absmax_mean: empty absmax (torch.mean would give NaN)");
    let sum = absmax.iter().map(|&a| a as f64).sum::<f64>() as f32;
    sum * (1.0f32 / absmax.len() as f32)
}

/// Double quantization of an NF4 absmax vector, as `quantize_4bit(..., compress_statistics=True)`: offset =
/// [`absmax_mean`], then `absmax − offset` (f32) quantized blockwise (block 256) with [`DYNAMIC_MAP_SIGNED`].
/// absmax: \[nb\] → qabsmax: \[nb\] u8, absmax2: [ceil(nb / 256)] f32.
pub fn quantize_absmax_nested(absmax: &[f32]) -> NestedAbsmax {
    quantize_absmax_nested_with_offset(absmax, absmax_mean(absmax))
}

/// [`quantize_absmax_nested`] with a given offset: reproduces bnb's bytes exactly from bnb's own offset, which
/// [`absmax_mean`] can miss by an ulp.
pub fn quantize_absmax_nested_with_offset(absmax: &[f32], offset: f32) -> NestedAbsmax {
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let mut qabsmax = vec![0u8; absmax.len()];
    let mut absmax2 = vec![0.0f32; absmax.len().div_ceil(NESTED_BLOCKSIZE)];
    quantize_blockwise_8bit(&centered, &DYNAMIC_MAP_SIGNED, NESTED_BLOCKSIZE, &mut qabsmax, &mut absmax2);
    NestedAbsmax { offset, qabsmax, absmax2 }
}

/// Rebuilds the f32 absmax of a double-quantized weight: `code2[q] · absmax2[i / 256]`, then `+ offset`, each step
/// rounded in f32 (bnb's `dequantize_blockwise` followed by `absmax += offset`; two kernels, so no fused multiply-add).
/// `code2` is the checkpoint's `nested_quant_map` (256 entries), normally equal to [`DYNAMIC_MAP_SIGNED`].
/// qabsmax: \[nb\] u8, absmax2: [ceil(nb / 256)] f32, code2: \[256\] → out: \[nb\] f32.
pub fn dequantize_absmax_nested(qabsmax: &[u8], absmax2: &[f32], offset: f32, code2: &[f32], out: &mut [f32]) {
    dequantize_blockwise_8bit(qabsmax, absmax2, code2, NESTED_BLOCKSIZE, out);
    // `+= offset` is a PyTorch op, IEEE (no flush-to-zero), unlike bnb's own kernels.
    out.par_iter_mut().for_each(|a| *a += offset);
}
