//! The split-KV decode kernels of `kernels/cuda/decode_attention.cu` (flash-decoding): the forward of a batch whose
//! sequences have at most [`DECODE_MAX_QUERIES`] queries each, against keys of any length, with the flash forward's
//! semantics and outputs. A block takes 16 query rows (tokens × the query heads of one KV head's group) of a sequence
//! and one split of their keys; here the number of splits is chosen and the scratch for their partial results
//! allocated.

use super::flash::FlashParams;
use super::Half;
use crate::attention::AttentionParams;
use crate::cuda::source::Module;
use crate::cuda::{allow_smem, launch, u32_arg, CudaDevice, Result};
use cudarc::driver::{DeviceRepr, LaunchConfig};

/// The most queries per sequence the decode kernels take; [`FlashPath::Fastest`](super::FlashPath::Fastest) runs them
/// for a forward whose sequences have no more. Decoding has 1, speculative or batched prompts a few; at 16 a GQA
/// group of 8 heads gives 8 blocks of rows per KV head, which read the cache as often as the flash kernels' one block
/// per query head, but spread over the splits.
pub const DECODE_MAX_QUERIES: usize = 16;

/// Query rows per block (`DECODE_ROWS`): one m16n8k16 tile.
const ROWS: usize = 16;
/// Warps per block (`DECODE_WARPS`), each taking 16 keys of a stage.
const WARPS: usize = 4;
/// Keys per stage (`DECODE_BN`) and stages in shared memory (`DECODE_STAGES`).
const BN: usize = 16 * WARPS;
const STAGES: usize = 2;
/// The fewest keys the launcher gives a split (two stages): below it a block's pipeline start, and the write and
/// re-read of its partial result, weigh too much against the keys it streams (kernels/NOTES.md "Split-KV decode
/// attention": a 512-key cache at batch 1 ran 9.0 µs in 4 splits, 9.3 in 8, 10.8 in 2).
const MIN_KEYS_PER_SPLIT: usize = 128;

/// (padded head_dim, [bf16, f16] entry points) as decode_attention.cu instantiates them; a head runs zero-padded in
/// the smallest that holds it (the flash kernels' padded head_dims).
const KERNELS: [(usize, [&str; 2]); 6] = [
    (32, ["decode_attention_d32_bf16", "decode_attention_d32_f16"]),
    (64, ["decode_attention_d64_bf16", "decode_attention_d64_f16"]),
    (80, ["decode_attention_d80_bf16", "decode_attention_d80_f16"]),
    (96, ["decode_attention_d96_bf16", "decode_attention_d96_f16"]),
    (128, ["decode_attention_d128_bf16", "decode_attention_d128_f16"]),
    (256, ["decode_attention_d256_bf16", "decode_attention_d256_f16"]),
];

/// decode_attention's dynamic shared memory at padded head_dim `d`: the query tile and the stages of K and V, rows
/// of d + 8 elements.
fn smem(d: usize) -> usize {
    (ROWS + 2 * STAGES * BN) * (d + 8) * 2
}

/// decode_attention.cu's `DecodeSplits`, passed by value after the [`FlashParams`].
#[repr(C)]
#[derive(Clone, Copy)]
struct DecodeSplits {
    o_part: u64,
    lse_part: u64,
    keys_per_split: i32,
    n_splits: i32,
    chunks: i32,
    pad: i32,
}

// SAFETY: `repr(C)`: two 8-byte addresses then four 4-byte fields, in the order of decode_attention.cu's
// `struct DecodeSplits`, whose natural layout is the same (32 bytes, no padding).
unsafe impl DeviceRepr for DecodeSplits {}

/// How a decode launch divides its work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    /// The entry point.
    pub kernel: &'static str,
    /// The padded head_dim it serves.
    pub d: usize,
    /// Blocks of 16 query rows per KV head and sequence.
    pub chunks: usize,
    /// Splits of each block's keys (1: the blocks write out and lse, no scratch and no combine pass).
    pub splits: usize,
    /// Keys per split, counted from the first key a block's rows see; the last split takes whatever is left.
    pub keys_per_split: usize,
}

/// The plan of a `half` decode launch of `p` over `n_seqs` sequences of at most `max_seqlen` (queries, keys) on `dev`,
/// whose kernel it allows its shared memory; `splits` None sizes the splits to the device, Some(n) makes n.
pub fn decode_plan(
    dev: &CudaDevice,
    half: Half,
    p: &AttentionParams,
    [max_seqlen_q, max_seqlen_k]: [usize; 2],
    n_seqs: usize,
    splits: Option<usize>,
) -> Result<DecodePlan> {
    let &(d, names) = KERNELS.iter().find(|(d, _)| p.head_dim <= *d).expect("head_dim checked against MAX_HEAD_DIM");
    let kernel = half.pick(names[0], names[1]);
    allow_smem(dev, Module::DecodeAttention, kernel, smem(d) as u32)?;
    let chunks = (max_seqlen_q * (p.n_heads / p.n_kv_heads)).div_ceil(ROWS);
    // The most keys a block's rows see: a window bounds them by itself plus the spread of the rows' positions.
    let span = p.sliding_window.map_or(max_seqlen_k, |w| max_seqlen_k.min(w.saturating_add(max_seqlen_q)));
    let span = span.min(i32::MAX as usize - BN);
    let (splits, keys_per_split) = match splits {
        Some(n) => (n, span.div_ceil(n).max(1)),
        None => split_keys(span, n_seqs * p.n_kv_heads * chunks, dev.multiprocessors()),
    };
    Ok(DecodePlan { kernel, d, chunks, splits, keys_per_split })
}

/// (splits, keys per split) of `span` keys for `blocks` blocks per split on a GPU of `multiprocessors`: as many
/// splits as keep the blocks within one per multiprocessor (at least one), but no split of fewer than
/// [`MIN_KEYS_PER_SPLIT`] keys unless there is one, and whole stages per split. One block a multiprocessor, not the
/// waves its occupancy allows: Llama-3-8B's batch 1 over 32,768 keys ran 57.5 µs in 16 splits (128 blocks) against
/// 94.1 in 86 (two waves of three blocks a multiprocessor), batch 8 over 4,096 keys 54.6 in 2 against 63.1 in 13
/// (H100, kernels/NOTES.md): more blocks than multiprocessors only add pipeline starts and partial results to merge.
fn split_keys(span: usize, blocks: usize, multiprocessors: usize) -> (usize, usize) {
    let wanted = (multiprocessors / blocks.max(1)).max(1);
    let n = wanted.clamp(1, (span / MIN_KEYS_PER_SPLIT).max(1));
    let per = span.div_ceil(n).next_multiple_of(BN).max(BN);
    (span.div_ceil(per).max(1), per)
}

/// The decode kernel over (splits, n_kv_heads·chunks, n_seqs) blocks and, with more than one split, the combine over
/// (⌈max_seqlen_q·n_heads / 4⌉, n_seqs): `flash` holds every address and the geometry, as the flash forward takes it.
pub(super) fn launch(
    dev: &CudaDevice,
    flash: FlashParams,
    half: Half,
    p: &AttentionParams,
    max_seqlen: [usize; 2],
    n_seqs: usize,
    splits: Option<usize>,
) -> Result<()> {
    let plan = decode_plan(dev, half, p, max_seqlen, n_seqs, splits)?;
    let rows = flash.tq as usize * p.n_heads;
    // Each split's O and lse; dropped on return, which is safe because the stream runs the next owner's work after
    // the combine.
    let scratch = match plan.splits {
        1 => None,
        n => Some((dev.alloc::<f32>(n * rows * p.head_dim)?, dev.alloc::<f32>(n * rows)?)),
    };
    let (o_part, lse_part) = scratch.as_ref().map_or((0, 0), |(o, l)| (o.ptr(), l.ptr()));
    let int = |what: &str, v: usize| i32::try_from(v).unwrap_or_else(|_| panic!("decode attention: {what} = {v}"));
    let ds = DecodeSplits {
        o_part,
        lse_part,
        keys_per_split: int("keys per split", plan.keys_per_split),
        n_splits: int("splits", plan.splits),
        chunks: int("row blocks", plan.chunks),
        pad: 0,
    };
    let y = p.n_kv_heads * plan.chunks;
    assert!(y <= 65_535 && n_seqs <= 65_535, "decode attention: {y} row blocks or {n_seqs} sequences exceed a grid");
    let cfg = LaunchConfig {
        grid_dim: (plan.splits as u32, y as u32, n_seqs as u32),
        block_dim: (32 * WARPS as u32, 1, 1),
        shared_mem_bytes: smem(plan.d) as u32,
    };
    // SAFETY: decode_attention_d<D>_T(const FlashParams p, const DecodeSplits ds): the addresses in `flash` are
    // buffers of this device sized as the caller asserts (q, out: tq·n_heads·head_dim; k, v: tk·n_kv_heads·head_dim;
    // lse: tq·n_heads; cu_q, cu_k: the grid's z + 1), and the kernel skips any sequence whose offsets leave 0..tq or
    // 0..tk and any row past its sequence's queries; o_part and lse_part hold splits·tq·n_heads rows of head_dim and
    // of one f32, of which block x writes split x < splits (and none when splits is 1, where they are 0); head_dim ≤
    // D (the kernel is the smallest D that holds it) and the block size and shared memory are the template's (tested
    // against the .cu below).
    unsafe { launch!(dev, Module::DecodeAttention, plan.kernel, cfg; flash, ds) }?;
    if plan.splits == 1 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (u32_arg("decode attention: rows", (max_seqlen[0] * p.n_heads).div_ceil(WARPS)), n_seqs as u32, 1),
        block_dim: (32 * WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let combine = half.pick("decode_combine_bf16", "decode_combine_f16");
    // SAFETY: decode_combine_T(const FlashParams p, const DecodeSplits ds): as above; a warp reads the splits' rows
    // of one (token, head) row that the decode kernel wrote for every split (rows of sequences it skipped, or past
    // the blocks of rows it launched, are skipped here too) and writes that row of out and lse.
    unsafe { launch!(dev, Module::DecodeAttention, combine, cfg; flash, ds) }
}

#[cfg(test)]
mod tests {
    use super::super::MAX_HEAD_DIM;
    use super::*;

    /// The table, the constants and the block size must be what decode_attention.cu defines, and the shared memory
    /// must fit a Hopper SM's 227 KiB per block.
    #[test]
    fn kernels_match_the_source() {
        let module = Module::DecodeAttention;
        let text = module.file_text();
        for define in [
            format!("#define DECODE_WARPS {WARPS}\n"),
            format!("#define DECODE_ROWS {ROWS}\n"),
            "#define DECODE_BN (16 * DECODE_WARPS)\n".to_string(),
            format!("#define DECODE_STAGES {STAGES}\n"),
        ] {
            assert!(text.contains(&define), "decode_attention.cu lacks {define:?}");
        }
        let mut entries = Vec::new();
        for (d, names) in KERNELS {
            for (name, ty) in names.iter().zip(["bf16", "f16"]) {
                let line = text.lines().find(|l| l.contains(&format!(" {name}("))).expect("entry point");
                assert!(line.contains(&format!("decode_attention<{ty}, {d}>(p, ds)")), "{name}: template in {line}");
                assert!(line.contains(&format!("__launch_bounds__({})", 32 * WARPS)), "{name}: block size");
                entries.push(*name);
            }
            assert!(smem(d) <= 227 * 1024, "d{d}: shared memory");
        }
        entries.extend(["decode_combine_bf16", "decode_combine_f16"]);
        assert_eq!(module.entry_points(), entries);
        assert_eq!(module.hot_entry_points(), entries, "every decode kernel is marked hot");
        assert_eq!(KERNELS.last().map(|k| k.0), Some(MAX_HEAD_DIM));
    }

    /// Llama-3-8B's decode shapes on an H100-sized GPU (132 SMs): about one block per multiprocessor, splits of no
    /// fewer than 128 keys.
    #[test]
    fn splits_fill_one_block_per_multiprocessor_without_short_splits() {
        let sms = 132;
        // Batch 1: 8 KV heads × 1 row block = 8 blocks per split.
        assert_eq!(split_keys(32768, 8, sms), (16, 2048));
        assert_eq!(split_keys(4096, 8, sms), (16, 256));
        assert_eq!(split_keys(512, 8, sms), (4, 128));
        // Batch 8: 64 blocks per split.
        assert_eq!(split_keys(32768, 64, sms), (2, 16384));
        assert_eq!(split_keys(512, 64, sms), (2, 256));
        // No keys, or fewer than two splits' worth, or more blocks than multiprocessors: one split.
        assert_eq!(split_keys(0, 8, sms), (1, BN));
        assert_eq!(split_keys(200, 8, sms), (1, 256));
        assert_eq!(split_keys(1 << 20, 10_000, sms), (1, 1 << 20));
        assert_eq!(split_keys(1 << 20, 133, sms), (1, 1 << 20));
        for span in [1, 63, 64, 255, 256, 257, 1000, 4097, 100_003] {
            for blocks in [1, 7, 64, 1000] {
                let (n, per) = split_keys(span, blocks, sms);
                assert!(n >= 1 && n * per >= span && (n - 1) * per < span.max(1), "{span} keys, {blocks} blocks");
                assert!(per % BN == 0 && (n == 1 || per >= MIN_KEYS_PER_SPLIT), "{span} keys, {blocks} blocks");
            }
        }
    }
}
