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
//! (design/REFERENCE.md §1). `tests/nf4_bitsandbytes.rs` checks this file against tensors dumped by bitsandbytes
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

use half::{bf16, f16};
use rayon::prelude::*;

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

/// bitsandbytes' signed 8-bit dynamic map, `create_dynamic_map(signed=True)`: the code of the nested absmax (and of
/// 8-bit Adam's first moment). Bit patterns copied from design/REFERENCE.md Appendix A.1, which was produced by running
/// bnb's construction under torch 2.11 on CPU. The table cannot be recomputed in f64: torch builds it in f32 with a
/// fused multiply-add inside `linspace` (the `dynamic_map_is_torch_f32_construction` test replays that construction).
/// Sorted; no −1.0 (`[0]` = −0.99296875); 0 at index 127; 1.0 at index 255. Loading a checkpoint must use the
/// file's `nested_quant_map`, not this constant.
pub const DYNAMIC_MAP_SIGNED: [f32; 256] = f32_table(&DYNAMIC_MAP_SIGNED_BITS);

/// bitsandbytes' unsigned 8-bit dynamic map, `create_dynamic_map(signed=False)` (8-bit Adam's second moment):
/// REFERENCE.md Appendix A.2. 0 at index 0, 1.0 at index 255.
pub const DYNAMIC_MAP_UNSIGNED: [f32; 256] = f32_table(&DYNAMIC_MAP_UNSIGNED_BITS);

const DYNAMIC_MAP_SIGNED_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000, 0xbf616666,
    0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000,
    0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a,
    0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333,
    0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, 0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a,
    0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999,
    0xbe6f3333, 0xbe60cccd, 0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000,
    0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d, 0xbd5b851f,
    0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15,
    0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418, 0xbc0ccccd,
    0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a,
    0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d, 0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01,
    0xb9c7e283, 0xb98ce705, 0xb923d70b, 0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94,
    0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b,
    0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b,
    0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3, 0x3c8b851f,
    0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148, 0x3d166667, 0x3d21eb85, 0x3d2d70a3,
    0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d,
    0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667,
    0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000,
    0x3e526666, 0x3e60cccd, 0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc,
    0x3eaa0000, 0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a, 0x3f123334,
    0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666, 0x3f2f0000, 0x3f32999a,
    0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000,
    0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666,
    0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

const DYNAMIC_MAP_UNSIGNED_BITS: [u32; 256] = [
    0x00000000, 0x34ae7baa, 0x35500998, 0x360e9b38, 0x3692ccf6, 0x36de4c51, 0x3714e5d5, 0x3783126e, 0x37e171a0,
    0x381fe868, 0x384f1800, 0x387e479a, 0x3896bb99, 0x38ae5364, 0x38c5eb31, 0x3906594b, 0x394154ca, 0x397c5049,
    0x399ba5e4, 0x39b923a2, 0x39d6a163, 0x39f41f22, 0x3a08ce71, 0x3a178d50, 0x3a264c30, 0x3a350b10, 0x3a43c9ef,
    0x3a5288d0, 0x3a6147af, 0x3a70068e, 0x3a7ec56e, 0x3a958106, 0x3aba5e35, 0x3adf3b64, 0x3b020c4a, 0x3b147ae1,
    0x3b26e978, 0x3b395810, 0x3b4bc6a7, 0x3b5e3540, 0x3b70a3d7, 0x3b818937, 0x3b8ac082, 0x3b93f7cf, 0x3b9d2f1a,
    0x3ba66666, 0x3baf9db2, 0x3bb8d4fd, 0x3bc20c4a, 0x3bcb4395, 0x3bd47ae1, 0x3bddb22e, 0x3be6e978, 0x3bf020c5,
    0x3bf9580f, 0x3c0147ae, 0x3c05e354, 0x3c0a7ef9, 0x3c0f1aa0, 0x3c13b645, 0x3c1851eb, 0x3c1ced92, 0x3c218937,
    0x3c2f5c2a, 0x3c466667, 0x3c5d70a3, 0x3c747ae2, 0x3c85c28f, 0x3c9147af, 0x3c9ccccd, 0x3ca851eb, 0x3cb3d70b,
    0x3cbf5c29, 0x3ccae147, 0x3cd66667, 0x3ce1eb87, 0x3ced70a3, 0x3cf8f5c3, 0x3d023d70, 0x3d080000, 0x3d0dc28f,
    0x3d13851f, 0x3d1947af, 0x3d1f0a3d, 0x3d24cccd, 0x3d2a8f5c, 0x3d3051eb, 0x3d36147b, 0x3d3bd70a, 0x3d41999a,
    0x3d475c28, 0x3d4d1eb8, 0x3d52e147, 0x3d58a3d7, 0x3d5e6667, 0x3d6428f7, 0x3d69eb87, 0x3d6fae15, 0x3d7570a3,
    0x3d7b3333, 0x3d807ae2, 0x3d835c2a, 0x3d863d71, 0x3d891eb8, 0x3d8c0000, 0x3d8ee148, 0x3d91c290, 0x3d94a3d7,
    0x3d97851f, 0x3d9a6667, 0x3d9d47af, 0x3da028f6, 0x3da30a3e, 0x3da5eb85, 0x3da8cccd, 0x3dabae15, 0x3dae8f5c,
    0x3db170a4, 0x3db451eb, 0x3db73333, 0x3dba147b, 0x3dbcf5c3, 0x3dbfd70b, 0x3dc2b852, 0x3dc5999a, 0x3dc87ae2,
    0x3dcb5c29, 0x3dd40000, 0x3de26666, 0x3df0cccd, 0x3dff3333, 0x3e06cccc, 0x3e0e0000, 0x3e153334, 0x3e1c6666,
    0x3e23999a, 0x3e2acccc, 0x3e320000, 0x3e393334, 0x3e406666, 0x3e47999a, 0x3e4ecccc, 0x3e560000, 0x3e5d3334,
    0x3e646666, 0x3e6b999a, 0x3e72cccc, 0x3e7a0000, 0x3e809999, 0x3e843333, 0x3e87cccd, 0x3e8b6666, 0x3e8f0000,
    0x3e92999a, 0x3e963333, 0x3e99cccc, 0x3e9d6666, 0x3ea10000, 0x3ea4999a, 0x3ea83333, 0x3eabcccc, 0x3eaf6666,
    0x3eb30000, 0x3eb6999a, 0x3eba3333, 0x3ebdcccc, 0x3ec16666, 0x3ec50000, 0x3ec8999a, 0x3ecc3333, 0x3ecfcccc,
    0x3ed36666, 0x3ed70000, 0x3eda999a, 0x3ede3333, 0x3ee1cccc, 0x3ee56666, 0x3ee90000, 0x3eec999a, 0x3ef03333,
    0x3ef3cccc, 0x3ef76666, 0x3efb0000, 0x3efe9999, 0x3f01199a, 0x3f02e666, 0x3f04b333, 0x3f068000, 0x3f084ccc,
    0x3f0a199a, 0x3f0be666, 0x3f0db334, 0x3f0f8000, 0x3f114ccd, 0x3f13199a, 0x3f14e666, 0x3f16b334, 0x3f188000,
    0x3f1a4ccd, 0x3f1c199a, 0x3f1de666, 0x3f1fb334, 0x3f218000, 0x3f234ccd, 0x3f25199a, 0x3f26e666, 0x3f28b334,
    0x3f2a8000, 0x3f2c4ccd, 0x3f2e199a, 0x3f2fe666, 0x3f31b334, 0x3f338000, 0x3f354ccd, 0x3f37199a, 0x3f38e666,
    0x3f3ab334, 0x3f3c8000, 0x3f3e4ccd, 0x3f40199a, 0x3f41e666, 0x3f43b334, 0x3f458000, 0x3f474ccc, 0x3f49199a,
    0x3f4ae666, 0x3f4cb334, 0x3f4e8000, 0x3f504ccc, 0x3f52199a, 0x3f53e666, 0x3f55b334, 0x3f578000, 0x3f594ccc,
    0x3f5b199a, 0x3f5ce666, 0x3f5eb334, 0x3f608000, 0x3f624ccc, 0x3f64199a, 0x3f65e666, 0x3f67b334, 0x3f698000,
    0x3f6b4ccc, 0x3f6d199a, 0x3f6ee666, 0x3f70b334, 0x3f728000, 0x3f744ccc, 0x3f76199a, 0x3f77e666, 0x3f79b334,
    0x3f7b8000, 0x3f7d4ccc, 0x3f7f199a, 0x3f800000,
];

const fn f32_table(bits: &[u32; 256]) -> [f32; 256] {
    let mut out = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        out[i] = f32::from_bits(bits[i]);
        i += 1;
    }
    out
}

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

impl WeightElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl WeightElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Bytes of packed nibbles for n elements: `(n + 1) / 2` (bnb's tensor shape is `[(n + 1) / 2, 1]`).
pub fn nf4_packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

/// Number of blocks (= absmax entries) for n elements.
pub fn nf4_num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
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

/// The 4-bit code of one scaled value (`x = w · (1/absmax)`, nominally in [−1, 1]): `dQuantizeNF4`'s decision tree,
/// transcribed. Ties go to the lower code; NaN (an all-zero block, `0 · ∞`) fails every comparison and gives code 0.
#[inline]
pub fn nf4_code_index(x: f32) -> u8 {
    let t = &NF4_THRESHOLDS;
    if x > t[7] {
        if x > t[11] {
            if x > t[13] {
                if x > t[14] {
                    15
                } else {
                    14
                }
            } else if x > t[12] {
                13
            } else {
                12
            }
        } else if x > t[9] {
            if x > t[10] {
                11
            } else {
                10
            }
        } else if x > t[8] {
            9
        } else {
            8
        }
    } else if x > t[3] {
        if x > t[5] {
            if x > t[6] {
                7
            } else {
                6
            }
        } else if x > t[4] {
            5
        } else {
            4
        }
    } else if x > t[1] {
        if x > t[2] {
            3
        } else {
            2
        }
    } else if x > t[0] {
        1
    } else {
        0
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
/// quant_type="nf4")` does on CUDA (without double quantization; see [`quantize_absmax_nested`]).
/// x: [n] (f32, bf16 or f16) → packed: [(n + 1) / 2] u8, absmax: [ceil(n / blocksize)] f32.
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

/// `NF4_CODE[q] · absmax` in f32, rounded once to `T`: bnb's `kDequantizeBlockwise` (and `dequantize_4bit` with
/// `quant_state.dtype = T`). For a double-quantized weight, first rebuild absmax with [`dequantize_absmax_nested`].
/// packed: [(n + 1) / 2] u8, absmax: [ceil(n / blocksize)] f32 → out: [n] (f32, bf16 or f16).
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
                    pair[0] = T::from_f32(ftz(NF4_CODE[(byte >> 4) as usize] * a));
                    if let Some(second) = pair.get_mut(1) {
                        *second = T::from_f32(ftz(NF4_CODE[(byte & 0x0F) as usize] * a));
                    }
                }
            }
        });
}

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
/// x: [n] f32, code: [256] sorted → q: [n] u8, absmax: [ceil(n / blocksize)] f32. blocksize: power of two in 64..=4096.
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
/// q: [n] u8, absmax: [ceil(n / blocksize)] f32, code: [256] → out: [n] f32.
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
/// the stored offset. absmax: [nb], nb ≥ 1.
pub fn absmax_mean(absmax: &[f32]) -> f32 {
    assert!(!absmax.is_empty(), "absmax_mean: empty absmax (torch.mean would give NaN)");
    let sum = absmax.iter().map(|&a| a as f64).sum::<f64>() as f32;
    sum * (1.0f32 / absmax.len() as f32)
}

/// Double quantization of an NF4 absmax vector, as `quantize_4bit(..., compress_statistics=True)`: offset =
/// [`absmax_mean`], then `absmax − offset` (f32) quantized blockwise (block 256) with [`DYNAMIC_MAP_SIGNED`].
/// absmax: [nb] → qabsmax: [nb] u8, absmax2: [ceil(nb / 256)] f32.
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
/// qabsmax: [nb] u8, absmax2: [ceil(nb / 256)] f32, code2: [256] → out: [nb] f32.
pub fn dequantize_absmax_nested(qabsmax: &[u8], absmax2: &[f32], offset: f32, code2: &[f32], out: &mut [f32]) {
    dequantize_blockwise_8bit(qabsmax, absmax2, code2, NESTED_BLOCKSIZE, out);
    // `+= offset` is a PyTorch op, IEEE (no flush-to-zero), unlike bnb's own kernels.
    out.par_iter_mut().for_each(|a| *a += offset);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn randn_f32(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (rng.normal() * scale) as f32).collect()
    }

    fn quantize(x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
        let mut packed = vec![0u8; nf4_packed_len(x.len())];
        let mut absmax = vec![0.0f32; nf4_num_blocks(x.len(), blocksize)];
        quantize_nf4(x, blocksize, &mut packed, &mut absmax);
        (packed, absmax)
    }

    fn dequantize(packed: &[u8], absmax: &[f32], blocksize: usize, n: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; n];
        dequantize_nf4(packed, absmax, blocksize, &mut out);
        out
    }

    fn nibble(packed: &[u8], k: usize) -> u8 {
        if k % 2 == 0 {
            packed[k / 2] >> 4
        } else {
            packed[k / 2] & 0x0F
        }
    }

    /// The next f32 towards +∞ (f32::next_up needs Rust 1.86; the workspace supports 1.85). Finite, non-zero x only.
    fn next_up(x: f32) -> f32 {
        if x > 0.0 {
            f32::from_bits(x.to_bits() + 1)
        } else {
            f32::from_bits(x.to_bits() - 1)
        }
    }

    fn max_gap(code: &[f32]) -> f32 {
        code.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max)
    }

    #[test]
    fn code_and_thresholds_are_consistent() {
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]), "NF4 code sorted");
        assert_eq!((NF4_CODE[0], NF4_CODE[7], NF4_CODE[15]), (-1.0, 0.0, 1.0));
        for (k, &t) in NF4_THRESHOLDS.iter().enumerate() {
            // The kernel's literals are the midpoints of adjacent codes, to f32 precision.
            let mid = (NF4_CODE[k] as f64 + NF4_CODE[k + 1] as f64) / 2.0;
            assert!((t as f64 - mid).abs() < 1e-7, "threshold {k}: {t} vs midpoint {mid}");
        }
    }

    #[test]
    fn decision_tree_counts_thresholds_below() {
        // The tree is a binary search: its code must be the number of thresholds strictly below x.
        let mut rng = Rng::new(11);
        let mut xs: Vec<f32> = (0..100_000).map(|_| rng.uniform_range(-1.2, 1.2) as f32).collect();
        for &t in &NF4_THRESHOLDS {
            xs.extend([t, next_up(t), -next_up(-t)]);
        }
        for x in xs {
            let below = NF4_THRESHOLDS.iter().filter(|&&t| x > t).count() as u8;
            assert_eq!(nf4_code_index(x), below, "x = {x:e}");
        }
        assert_eq!(nf4_code_index(f32::NAN), 0, "NaN (all-zero block) takes code 0");
    }

    #[test]
    fn tie_at_a_threshold_goes_to_the_lower_code() {
        for (k, &t) in NF4_THRESHOLDS.iter().enumerate() {
            assert_eq!(nf4_code_index(t), k as u8, "exactly on threshold {k}");
            assert_eq!(nf4_code_index(next_up(t)), k as u8 + 1, "one ulp above threshold {k}");
        }
        // Through the kernel: with 1.0 in the block, the scale is exactly 1 and each threshold stays a tie.
        let mut x = vec![1.0f32];
        x.extend(NF4_THRESHOLDS);
        x.extend(NF4_THRESHOLDS.iter().map(|&t| next_up(t)));
        x.resize(64, 0.0);
        let (packed, absmax) = quantize(&x, 64);
        assert_eq!(absmax, [1.0]);
        for k in 0..15 {
            assert_eq!(nibble(&packed, 1 + k), k as u8, "tie {k} through quantize_nf4");
            assert_eq!(nibble(&packed, 16 + k), k as u8 + 1, "above tie {k} through quantize_nf4");
        }
    }

    #[test]
    fn every_code_value_round_trips_exactly() {
        for scale in [1.0f32, 2.5, 0.0173, 3.0e-5, 117.0] {
            let x: Vec<f32> = NF4_CODE.iter().map(|&c| c * scale).collect();
            let (packed, absmax) = quantize(&x, 32);
            assert_eq!(absmax, [scale]);
            for k in 0..16 {
                assert_eq!(nibble(&packed, k), k as u8, "scale {scale}: code {k}");
            }
            let back = dequantize(&packed, &absmax, 32, x.len());
            assert_eq!(
                back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                x.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn round_trip_error_is_at_most_half_the_largest_code_gap() {
        let half_gap = 0.5 * max_gap(&NF4_CODE) as f64;
        let mut rng = Rng::new(5);
        for (n, blocksize) in [(4096, 64), (1000, 32), (777, 128), (5000, 4096), (1, 64), (63, 64)] {
            let x = randn_f32(&mut rng, n, 0.02);
            let (packed, absmax) = quantize(&x, blocksize);
            let back = dequantize(&packed, &absmax, blocksize, n);
            for (i, (&v, &w)) in x.iter().zip(&back).enumerate() {
                let a = absmax[i / blocksize] as f64;
                assert!(a >= v.abs() as f64, "absmax below |x| at {i}");
                let err = (v as f64 - w as f64).abs();
                assert!(err <= half_gap * a * (1.0 + 1e-6), "n {n}, block {blocksize}, [{i}]: {v} → {w}, absmax {a}");
            }
            // Each block's largest element comes back exactly (its code is ±1).
            for (b, chunk) in x.chunks(blocksize).enumerate() {
                let i = b * blocksize
                    + chunk.iter().enumerate().fold(0, |m, (j, v)| if v.abs() > chunk[m].abs() { j } else { m });
                assert_eq!(back[i], x[i], "block {b} max element");
            }
        }
    }

    #[test]
    fn all_zero_block_stores_code_zero_like_the_cuda_kernel() {
        let mut x = vec![0.0f32; 3 * 64];
        x[64 + 5] = -0.25; // only the middle block is non-zero
        let (packed, absmax) = quantize(&x, 64);
        assert_eq!(absmax, [0.0, 0.25, 0.0]);
        assert!(packed[..32].iter().chain(&packed[64..]).all(|&b| b == 0x00), "0·(1/0) = NaN → code 0, not 7");
        assert!(packed[32..64].iter().enumerate().all(|(j, &b)| b == if j == 2 { 0x70 } else { 0x77 }));
        let back = dequantize(&packed, &absmax, 64, x.len());
        assert!(back.iter().zip(&x).all(|(a, b)| a == b), "values come back (zeros as −1.0 · 0)");
        // −1.0 · 0 = −0.0: the sign bnb's kernel produces for an all-zero block.
        assert_eq!(back[0].to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn subnormals_flush_to_zero_like_the_fast_math_kernels() {
        let sub = f32::MIN_POSITIVE / 4.0; // subnormal
        assert_eq!(
            (ftz(sub), ftz(-sub).to_bits(), ftz(1.5), ftz(-0.0).to_bits()),
            (0.0, (-0.0f32).to_bits(), 1.5, (-0.0f32).to_bits())
        );
        let mut x = vec![0.0f32; 3 * 64];
        // Block 0: subnormals only → absmax 0 (FMNMX.FTZ) → code 0 everywhere.
        x[..64].iter_mut().enumerate().for_each(|(i, v)| *v = sub * (i % 3) as f32);
        // Block 1: a tiny normal absmax; its subnormal neighbour scales to 0 → code 7 (IEEE arithmetic: code 5).
        let tiny = 3.5 * f32::MIN_POSITIVE;
        x[64] = tiny;
        x[65] = -0.75 * f32::MIN_POSITIVE;
        x[66] = 0.75 * tiny;
        // Normal, but its code (10) times tiny is subnormal.
        x[67] = 0.29 * tiny;
        // Block 2: absmax ≥ 2^126 makes 1/absmax subnormal → scale 0 → every code 7, the maximum's too.
        x[128] = 2.0e38;
        x[129] = -1.0e38;
        let (packed, absmax) = quantize(&x, 64);
        assert_eq!(absmax, [0.0, tiny, 2.0e38]);
        assert!(packed[..32].iter().all(|&b| b == 0x00));
        assert_eq!(packed[32], 0xF7, "max → 15, flushed subnormal → 7");
        assert_eq!(packed[33], (14 << 4) | 10, "0.75·tiny and 0.29·tiny are normal");
        assert!(packed[64..].iter().all(|&b| b == 0x77));
        // Dequantization flushes subnormal products: code 10 (0.246) · tiny is subnormal → 0.
        let back = dequantize(&packed, &absmax, 64, x.len());
        assert_eq!((back[64], back[65], back[66], back[67]), (tiny, 0.0, NF4_CODE[14] * tiny, 0.0));
        assert!(back[128..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn odd_length_pads_the_last_low_nibble_with_a_quantized_zero() {
        let mut rng = Rng::new(8);
        let x = randn_f32(&mut rng, 65, 1.0);
        let (packed, absmax) = quantize(&x, 64);
        assert_eq!((packed.len(), absmax.len()), (33, 2));
        assert_eq!(absmax[1], x[64].abs());
        assert_eq!(packed[32], (nf4_code_index(x[64] / absmax[1]) << 4) | 7, "pad nibble = code of 0.0 = 7");
        let back = dequantize(&packed, &absmax, 64, 65);
        assert_eq!(back[64], NF4_CODE[(packed[32] >> 4) as usize] * absmax[1]);
        // A last block that is all zero pads with code 0 instead (its scale is ∞).
        let mut z = x.clone();
        z[64] = 0.0;
        let (packed, _) = quantize(&z, 64);
        assert_eq!(packed[32], 0x00);
        // Odd n inside one block (n = 7): 4 bytes, the pad is the low nibble of the last.
        let (packed, absmax) = quantize(&x[..7], 32);
        assert_eq!((packed.len(), absmax.len()), (4, 1));
        assert_eq!(packed[3] & 0x0F, 7);
    }

    #[test]
    fn nibble_order_high_is_the_earlier_element() {
        // Hand-made bytes: 0x0F = (code 0, code 15), 0x7A = (code 7, code 10); 0xD3 = (13, 3) in block 2.
        let packed = [0x0F, 0x7A, 0xD3];
        let absmax = [2.0f32];
        let out = dequantize(&packed, &absmax, 64, 6);
        assert_eq!(out, [-2.0, 2.0, 0.0, NF4_CODE[10] * 2.0, NF4_CODE[13] * 2.0, NF4_CODE[3] * 2.0]);
        let x = [-1.0f32, 1.0, 0.0, NF4_CODE[10], NF4_CODE[13], NF4_CODE[3]];
        let (q, a) = quantize(&x, 64);
        assert_eq!((q.as_slice(), a.as_slice()), (&packed[..], &[1.0f32][..]));
    }

    #[test]
    fn bf16_and_f16_paths_match_f32() {
        let mut rng = Rng::new(21);
        let x16: Vec<bf16> = randn_f32(&mut rng, 1001, 0.05).into_iter().map(bf16::from_f32).collect();
        let x32: Vec<f32> = x16.iter().map(|v| v.to_f32()).collect();
        let (packed, absmax) = quantize(&x32, 64);
        let mut packed16 = vec![0u8; packed.len()];
        let mut absmax16 = vec![0.0f32; absmax.len()];
        quantize_nf4(&x16, 64, &mut packed16, &mut absmax16);
        assert_eq!((packed16, absmax16), (packed.clone(), absmax.clone()));
        let f32_out = dequantize(&packed, &absmax, 64, x32.len());
        let mut bf_out = vec![bf16::ZERO; x32.len()];
        dequantize_nf4(&packed, &absmax, 64, &mut bf_out);
        assert!(bf_out.iter().zip(&f32_out).all(|(b, &f)| b.to_bits() == bf16::from_f32(f).to_bits()), "one rounding");
        let mut h_out = vec![f16::ZERO; x32.len()];
        dequantize_nf4(&packed, &absmax, 64, &mut h_out);
        assert!(h_out.iter().zip(&f32_out).all(|(h, &f)| h.to_bits() == f16::from_f32(f).to_bits()));
    }

    #[test]
    #[should_panic(expected = "not a power of two")]
    fn rejects_a_blocksize_bnb_does_not_have() {
        quantize(&[1.0; 96], 48);
    }

    /// bnb's `create_dynamic_map` as torch 2.11 evaluates it on CPU: float32 `linspace(0.1, 1, f)` whose elements are
    /// `start + step·i` for the first half and `end − step·(f−1−i)` for the rest, each a fused multiply-add (ATen's
    /// scalar linspace loop compiled with FMA contraction); float32 midpoints; times `(float)10^(i−6)`.
    fn torch_dynamic_map(signed: bool) -> Vec<f32> {
        let linspace = |start: f32, end: f32, steps: usize| -> Vec<f32> {
            let step = (end - start) / (steps - 1) as f32;
            (0..steps)
                .map(|i| {
                    if i < steps / 2 {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((steps - 1 - i) as f32, end)
                    }
                })
                .collect()
        };
        let mut data = Vec::new();
        for (i, scale) in [1e-6f64, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0].into_iter().enumerate() {
            let items = if signed { (1 << i) + 1 } else { (1 << (i + 1)) + 1 };
            let b = linspace(0.1, 1.0, items);
            let means: Vec<f32> = b.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
            data.extend(means.iter().map(|&m| scale as f32 * m));
            if signed {
                data.extend(means.iter().map(|&m| -(scale as f32) * m));
            }
        }
        data.extend([0.0, 1.0]);
        data.sort_by(f32::total_cmp);
        data
    }

    #[test]
    fn dynamic_map_properties() {
        let s = &DYNAMIC_MAP_SIGNED;
        assert!(s.windows(2).all(|w| w[0] < w[1]), "signed map strictly increasing");
        assert_eq!((s[0], s[127], s[255]), (-0.99296875f32, 0.0, 1.0));
        // Decimal anchors of REFERENCE.md §1.7 (the f32 values widened to f64).
        let anchors = [
            (0, -0.992968738079071),
            (63, -0.10703125596046448),
            (64, -0.09859374910593033),
            (126, -5.500000384017767e-07),
            (128, 5.500000384017767e-07),
            (254, 0.992968738079071),
        ];
        for (i, v) in anchors {
            assert_eq!(s[i] as f64, v, "signed[{i}]");
        }
        assert!((0..127).all(|i| s[i] == -s[254 - i]), "negative half mirrors the positive half");
        let u = &DYNAMIC_MAP_UNSIGNED;
        assert!(u.windows(2).all(|w| w[0] < w[1]), "unsigned map strictly increasing");
        assert_eq!((u[0], u[255]), (0.0, 1.0));
    }

    #[test]
    fn dynamic_map_is_torch_f32_construction() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&torch_dynamic_map(true)), bits(&DYNAMIC_MAP_SIGNED));
        assert_eq!(bits(&torch_dynamic_map(false)), bits(&DYNAMIC_MAP_UNSIGNED));
    }

    #[test]
    fn eight_bit_search_finds_the_nearest_entry() {
        let mut rng = Rng::new(13);
        for code in [&DYNAMIC_MAP_SIGNED, &DYNAMIC_MAP_UNSIGNED] {
            let lo = if code[0] < 0.0 { -1.05 } else { 0.0 };
            let mut xs: Vec<f32> = (0..50_000).map(|_| rng.uniform_range(lo, 1.05) as f32).collect();
            xs.extend((0..20_000).map(|_| (rng.uniform_range(lo, 1.0) * 10f64.powi(-(rng.below(7) as i32))) as f32));
            xs.extend(code.iter().copied());
            for x in xs {
                let q = quantize_8bit_nearest(code, x) as usize;
                let d = |i: usize| (code[i] as f64 - x as f64).abs();
                let best = (0..256).map(d).fold(f64::INFINITY, f64::min);
                // The kernel's midpoint is computed in f32, so within an ulp of a midpoint either neighbour is right.
                assert!(
                    d(q) <= best + 1e-7 * (1.0 + x.abs() as f64),
                    "x = {x:e}: got {q} ({}), best distance {best:e}",
                    code[q]
                );
            }
            for (i, &c) in code.iter().enumerate() {
                assert_eq!(quantize_8bit_nearest(code, c) as usize, i, "entry {i} maps to itself");
            }
        }
        assert_eq!(quantize_8bit_nearest(&DYNAMIC_MAP_SIGNED, f32::NAN), 0);
    }

    #[test]
    fn nested_absmax_round_trip() {
        let mut rng = Rng::new(17);
        // absmax of 64-blocks of N(0, 0.02) weights: about 0.05 ± 0.01; 600 blocks = 3 nested blocks, the last partial.
        let absmax: Vec<f32> = (0..600).map(|_| (0.05 + 0.01 * rng.normal()).abs() as f32).collect();
        let nested = quantize_absmax_nested(&absmax);
        assert_eq!((nested.qabsmax.len(), nested.absmax2.len()), (600, 3));
        let mean = absmax.iter().map(|&a| a as f64).sum::<f64>() / 600.0;
        assert!((nested.offset as f64 - mean).abs() <= 2.0 * f32::EPSILON as f64 * mean, "offset is the mean");
        for (j, chunk) in absmax.chunks(NESTED_BLOCKSIZE).enumerate() {
            let m = chunk.iter().fold(0.0f32, |m, &a| m.max((a - nested.offset).abs()));
            assert_eq!(nested.absmax2[j], m, "absmax2[{j}]");
        }
        let mut back = vec![0.0f32; 600];
        dequantize_absmax_nested(&nested.qabsmax, &nested.absmax2, nested.offset, &DYNAMIC_MAP_SIGNED, &mut back);
        let half_gap = 0.5 * max_gap(&DYNAMIC_MAP_SIGNED) as f64;
        for (i, (&a, &b)) in absmax.iter().zip(&back).enumerate() {
            let bound = half_gap * nested.absmax2[i / NESTED_BLOCKSIZE] as f64 * (1.0 + 1e-6) + 1e-7 * a as f64;
            assert!(((a - b) as f64).abs() <= bound, "[{i}]: {a} → {b}, bound {bound:e}");
        }
        // The exact arithmetic: code · absmax2 rounded, then + offset rounded (no fused multiply-add).
        let q = nested.qabsmax[10] as usize;
        assert_eq!(back[10], DYNAMIC_MAP_SIGNED[q] * nested.absmax2[0] + nested.offset);
    }

    #[test]
    fn nested_single_block_has_zero_scale() {
        // One NF4 block: absmax − mean = 0, so absmax2 = 0, and 0·(1/0) = NaN lands on index 0, like the kernel.
        let nested = quantize_absmax_nested(&[0.75]);
        assert_eq!(nested, NestedAbsmax { offset: 0.75, qabsmax: vec![0], absmax2: vec![0.0] });
        let mut back = [0.0f32];
        dequantize_absmax_nested(&nested.qabsmax, &nested.absmax2, nested.offset, &DYNAMIC_MAP_SIGNED, &mut back);
        assert_eq!(back, [0.75]);
    }

    #[test]
    fn mean_multiplies_by_the_f32_reciprocal() {
        assert_eq!(absmax_mean(&[1.0, 2.0, 3.0, 4.0]), 2.5);
        // n = 3: torch's CUDA mean is sum · (1.0f / 3), not sum / 3.
        let a = [0.1f32, 0.2, 0.35];
        let sum = (a.iter().map(|&v| v as f64).sum::<f64>()) as f32;
        assert_eq!(absmax_mean(&a).to_bits(), (sum * (1.0f32 / 3.0)).to_bits());
    }

    #[test]
    fn bits_per_param() {
        let round3 = |v: f64| (v * 1000.0).round() / 1000.0;
        let n = 4096 * 4096;
        assert_eq!(nf4_bits_per_param(n, 64, false), 4.5);
        assert_eq!(round3(nf4_bits_per_param(n, 64, true)), 4.127);
        assert_eq!(nf4_bits_per_param(n, 128, false), 4.25);
        // Small tensors pay for the offset and the padding: 7 elements = 4 bytes + one f32 absmax.
        assert_eq!(nf4_bits_per_param(7, 64, false), (32.0 + 32.0) / 7.0);
    }

    #[test]
    fn bit_identical_across_thread_counts() {
        let mut rng = Rng::new(23);
        let n = (1 << 17) + 37;
        let x = randn_f32(&mut rng, n, 0.02);
        let run = |threads| {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool").install(|| {
                let (packed, absmax) = quantize(&x, 64);
                let nested = quantize_absmax_nested(&absmax);
                let mut rebuilt = vec![0.0f32; absmax.len()];
                dequantize_absmax_nested(
                    &nested.qabsmax,
                    &nested.absmax2,
                    nested.offset,
                    &DYNAMIC_MAP_SIGNED,
                    &mut rebuilt,
                );
                let out = dequantize(&packed, &rebuilt, 64, n);
                (
                    packed,
                    absmax.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    nested,
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                )
            })
        };
        let one = run(1);
        for threads in [2, 4] {
            assert!(run(threads) == one, "{threads} threads vs 1");
        }
    }
}
