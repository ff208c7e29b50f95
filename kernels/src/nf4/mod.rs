//! bitsandbytes' blockwise 4-bit NormalFloat (NF4) quantization with optional double quantization: the CPU
//! specification of the format, bit-compatible with checkpoints written by bitsandbytes' CUDA kernels.
//!
//! This module owns the NF4 code and its rounding rule, nibble packing, per-block absmax, the nested ("double")
//! quantization of the absmax vector with the signed 8-bit dynamic map, and the memory accounting. It knows nothing of
//! checkpoint keys or JSON (that is `models`' business) and holds no tensor type.
//!
//! What decides every bit here is bitsandbytes' CUDA code, not its pure-PyTorch fallback (which gives an all-zero
//! block code 7 instead of 0 and divides by absmax in a partial last block): `kQuantizeBlockwise`,
//! `kQuantizeBlockwiseSmall` (block 32), `dQuantizeNF4`, `dQuantize<0>` and `kDequantizeBlockwise` in
//! `csrc/kernels.cu`, and `quantize_4bit` / `dequantize_4bit` / `quantize_blockwise` in `bitsandbytes/functional.py`
//! (design/REFERENCE.md §1). `tests/nf4_bitsandbytes.rs` checks this module against tensors dumped by bitsandbytes
//! itself (`scripts/reference/nf4_fixtures.py`).
//!
//! Layout, for a weight of n elements flattened row-major:
//! - block b covers elements `[b·blocksize, (b+1)·blocksize)`; `absmax[b]` = max |x| over it, in f32;
//! - each element becomes the 4-bit index of its nearest [`NF4_CODE`] value after scaling by `1/absmax`;
//! - byte j holds elements 2j (high nibble) and 2j+1 (low nibble): `(n + 1) / 2` bytes.
//!
//! Every block is computed by one task from its own inputs only, so results are bit-identical for any thread count.
//!
//! Floating-point environment. bitsandbytes builds its CUDA code with `--use_fast_math` (its `CMakeLists.txt`), and
//! the kernels' SASS shows what that means here (checked on an H100 with bnb 0.50.2's `libbitsandbytes_cuda130.so`):
//! - every f32 max, multiply, add and compare flushes subnormal inputs and results to zero (`FMNMX.FTZ`,
//!   `FMUL.FTZ`, `FADD.FTZ`, `FSETP.*.FTZ`). This module does the same ([`ftz`]), so subnormal weights quantize as
//!   bnb quantizes them (as zeros);
//! - `1.0f / absmax` is a bare `MUFU.RCP` (`rcp.approx.ftz.f32`), not an IEEE division. It is faithfully rounded
//!   (always IEEE's result or its neighbour) but differs from IEEE `1/x` in the last bit for 13.2 % of mantissas
//!   (measured over all 2^23 mantissas; the set does not depend on the exponent). Its rounding is hardware-internal, so
//!   this module uses the IEEE reciprocal. Consequence: a value whose scaled form lies within about an ulp of a
//!   threshold can land one code away from bnb's (both codes are then equally near). Random weights essentially never
//!   do (no such nibble in the fixtures' random cases); `tests/nf4_bitsandbytes.rs` probes it with values placed on
//!   thresholds. Dequantization involves no reciprocal and is bit-exact.
//!
//! Files: `quantize` (the rounding rule and packing), `dequantize`, `nested` (bnb's blockwise 8-bit code and the
//! double quantization of absmax built on it), `dynamic_map` (its 8-bit tables), `tests`.

mod dequantize;
mod dynamic_map;
mod gemv;
mod nested;
mod quantize;
#[cfg(test)]
mod tests;

pub use dequantize::{dequantize_nf4, dequantize_nf4_rows_scaled};
pub use dynamic_map::{DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED};
pub use gemv::{nf4_gemv, GemvLora};
pub use nested::{
    absmax_mean, dequantize_absmax_nested, dequantize_blockwise_8bit, quantize_8bit_nearest, quantize_absmax_nested,
    quantize_absmax_nested_with_offset, quantize_blockwise_8bit, NestedAbsmax,
};
pub use quantize::{nf4_code_index, quantize_nf4};

use half::{bf16, f16};

/// bitsandbytes' default 4-bit block (`Params4bit(blocksize=None)` → 64; transformers never changes it).
pub const DEFAULT_BLOCKSIZE: usize = 64;

/// Block of the nested absmax quantization; bitsandbytes hard-wires 256 (`quantize_4bit`, and its GEMM refuses others).
pub const NESTED_BLOCKSIZE: usize = 256;

/// The 16 NF4 values, index = the 4-bit code. Exactly bitsandbytes' `get_4bit_type("nf4")` / `_NF4_QUANT_TABLE` and
/// `dDequantizeNF4` (FORMATS.md, REFERENCE.md §1.1); each decimal is the shortest repr of the f32 value, so it parses
/// back to that f32. Checkpoints store the same table as `weight.quant_map`.
// The literals are bitsandbytes' own (greppable in its source); each parses to the intended f32.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// `NF4_THRESHOLDS[k]` separates code k from code k+1: the f32 literals of `dQuantizeNF4`'s decision tree in
/// `csrc/kernels.cu` (REFERENCE.md §1.3). A scaled value goes above threshold k only if strictly greater, so a value
/// exactly on a threshold takes the lower code.
// The literals are bitsandbytes' own (greppable in its source); each parses to the intended f32.
#[allow(clippy::excessive_precision)]
pub const NF4_THRESHOLDS: [f32; 15] = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
];

/// Element types a weight is quantized from or dequantized to. Widening to f32 is exact; narrowing rounds to nearest
/// even, as CUDA's `(T)float` conversions in `kDequantizeBlockwise` do.
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

/// The half crate's types convert with their own `to_f32` / `from_f32`.
macro_rules! half_weight_elem {
    ($($t:ty),+) => {$(
        impl WeightElem for $t {
            #[inline(always)]
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                <$t>::from_f32(v)
            }
        }
    )+};
}
half_weight_elem!(bf16, f16);

/// Bytes of packed nibbles for n elements: `(n + 1) / 2` (bnb's tensor shape is `[(n + 1) / 2, 1]`).
pub fn nf4_packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

/// Number of blocks (= absmax entries) for n elements.
pub fn nf4_num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// One weight of code index `q` (a nibble) in a block of scale `absmax`: `NF4_CODE[q] · absmax` in f32, flushed as
/// bnb's kernels flush it (`dequantize_one` in `kernels/cuda/nf4_common.cuh`).
#[inline(always)]
fn nf4_value(q: u8, absmax: f32) -> f32 {
    ftz(NF4_CODE[q as usize] * absmax)
}

/// Flush-to-zero, as every f32 operation of bnb's `--use_fast_math` kernels does to its inputs and results: a
/// subnormal becomes a zero of the same sign.
#[inline(always)]
pub fn ftz(v: f32) -> f32 {
    if v.is_subnormal() {
        0.0f32.copysign(v)
    } else {
        v
    }
}

fn assert_blocksize(what: &str, blocksize: usize, min: usize) {
    assert!(
        blocksize.is_power_of_two() && (min..=4096).contains(&blocksize),
        "{what}: blocksize {blocksize} is not a power of two in {min}..=4096"
    );
}

/// Blocks per rayon task: enough elements per task that scheduling is negligible, whatever the blocksize.
fn blocks_per_task(blocksize: usize) -> usize {
    (1usize << 14).div_ceil(blocksize)
}

/// max |x| with the kernel's flush-to-zero max (`FMNMX.FTZ`): a block of zeros and subnormals has absmax 0.
fn block_absmax(x: impl Iterator<Item = f32>) -> f32 {
    x.fold(0.0f32, |m, v| m.max(ftz(v.abs())))
}

/// The kernels' per-block scale: `1/absmax`, flushed (absmax ≥ 2^126 gives 0). IEEE here; bnb's `MUFU.RCP` can differ
/// in the last bit (module docs). absmax = 0 gives ∞, so every scaled value is NaN.
#[inline]
fn block_scale(absmax: f32) -> f32 {
    ftz(1.0f32 / absmax)
}

/// `x · scale` as `FMUL.FTZ` computes it.
#[inline(always)]
fn scaled(x: f32, scale: f32) -> f32 {
    ftz(ftz(x) * scale)
}

/// Storage bits per weight of an NF4 tensor of n elements: packed nibbles (`(n + 1) / 2` bytes) plus the absmax
/// statistics: f32 per block without double quantization; with it, a byte per block, an f32 per 256 blocks and the
/// one f32 offset. The code tables (`quant_map`, `nested_quant_map`) and the JSON quant state are not counted.
/// Block 64: 4.5 without, ≈ 4.127 with double quantization (QLoRA paper §3; FORMATS.md).
pub fn nf4_bits_per_param(n: usize, blocksize: usize, double_quant: bool) -> f64 {
    assert!(n > 0 && blocksize > 0, "nf4_bits_per_param: n and blocksize must be positive");
    let nb = nf4_num_blocks(n, blocksize);
    let packed_bits = 8 * nf4_packed_len(n);
    let stats_bits = if double_quant { 8 * nb + 32 * nb.div_ceil(NESTED_BLOCKSIZE) + 32 } else { 32 * nb };
    (packed_bits + stats_bits) as f64 / n as f64
}
