//! Which flash kernel serves a launch: the mma.sync kernels of every padded head_dim (`FLASH`) and the Hopper wgmma
//! ones (`FLASH_SM90`), written as the `.cu` files instantiate them and checked against those files by the tests.

use super::flash::TmaBoxes;
use super::Half;
use crate::cuda::compile::Target;
use crate::cuda::source::Module;

/// Which flash kernels serve a bf16 or f16 launch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlashPath {
    /// The fastest the device has for the head_dim: on an sm_90a target the wgmma kernel of `FLASH_SM90` where one
    /// serves it, else the mma.sync kernel of `FLASH`; and a forward whose sequences have at most
    /// [`DECODE_MAX_QUERIES`](super::DECODE_MAX_QUERIES) queries each runs the split-KV decode kernels instead.
    #[default]
    Fastest,
    /// The mma.sync kernels of `FLASH` on every device (what GPUs other than Hopper run), at every query count.
    Portable,
    /// Fastest's flash kernels at every query count, never the decode kernels: what decoding ran before them, kept so
    /// that tests and benchmarks can compare the two on the same inputs.
    FastestFlash,
}

/// One flash kernel as launched: its entry point, the rows of the grid's x dimension each block takes (query rows
/// in the forward, keys in the backward), and its block size and dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashKernel {
    pub module: Module,
    pub name: &'static str,
    pub(super) rows: usize,
    pub(super) threads: usize,
    pub(super) smem: usize,
    /// One block per multiprocessor walking the work items (flash_common.cuh `flash_item`) instead of one per item.
    pub(super) persistent: bool,
    /// The kernel loads by TMA and takes flash_wgmma.cuh's `FlashMaps` after the parameters, boxed so
    /// ([`super::flash::tensor_maps`]).
    pub(super) tma: Option<TmaBoxes>,
    /// The grid is (heads, tiles, sequences) rather than (heads, sequences, tiles): the sequence varies slowest
    /// (flash_common.cuh `flash_block<SEQ_MAJOR>`).
    pub(super) seq_major: bool,
    /// The entry point of the same kernel with the sequence slowest, for a backward whose sequences all have the
    /// longest lengths ([`FlashKernel::for_equal_sequences`]).
    pub(super) equal_sequences: Option<&'static str>,
}

impl FlashKernel {
    /// The kernel for a launch whose sequences all have the longest lengths: the entry point with the sequence
    /// slowest in the grid, where there is one (the resident blocks then share one sequence's rows in L2, and equal
    /// sequences lose nothing of the longest-first order), else this one.
    pub fn for_equal_sequences(self) -> FlashKernel {
        match self.equal_sequences {
            Some(name) => FlashKernel { name, seq_major: true, equal_sequences: None, ..self },
            None => self,
        }
    }
}

/// The forward and backward kernels of a bf16 (`half` Bf16) or f16 launch at `head_dim` (checked against
/// [`super::MAX_HEAD_DIM`] by the launchers) on a device compiled for `target`.
pub fn flash_kernels(target: Target, path: FlashPath, head_dim: usize, half: Half) -> [FlashKernel; 2] {
    let portable = Flash::for_head_dim(head_dim);
    let fastest = path != FlashPath::Portable;
    match FLASH_SM90.iter().find(|f| fastest && target.compiles(f.module) && f.serves(head_dim)) {
        Some(f) => [f.forward_kernel(half), f.backward_kernel(half)],
        None => [portable.forward_kernel(half), portable.backward_kernel(half)],
    }
}

/// A block shape: query rows × key rows per block, and warps.
#[derive(Clone, Copy, Debug)]
struct Tile {
    bm: usize,
    bn: usize,
    warps: usize,
}

/// The mma.sync kernels of one padded head_dim (the tiles written in `kernels/cuda/flash_attention_d<D>.cu`).
struct Flash {
    d: usize,
    module: Module,
    forward: [&'static str; 2],
    backward: [&'static str; 2],
    fwd: Tile,
    bwd: Tile,
}

impl Flash {
    /// The smallest padded head_dim that holds `head_dim`.
    fn for_head_dim(head_dim: usize) -> &'static Flash {
        FLASH.iter().find(|f| head_dim <= f.d).expect("head_dim checked against MAX_HEAD_DIM")
    }

    /// flash_forward's dynamic shared memory: Q, K and V tiles of rows D + 8 elements.
    fn forward_smem(&self) -> usize {
        (self.fwd.bm + 2 * self.fwd.bn) * (self.d + 8) * 2
    }

    /// flash_backward's: K, V, two stages of Q and dO, P and dS [BN][BM + 8], two stages of lse and delta.
    fn backward_smem(&self) -> usize {
        let Tile { bm, bn, .. } = self.bwd;
        (2 * bn + 4 * bm) * (self.d + 8) * 2 + 2 * bn * (bm + 8) * 2 + 4 * bm * 4
    }

    fn forward_kernel(&self, half: Half) -> FlashKernel {
        let (name, rows, threads) = (half.pick(self.forward[0], self.forward[1]), self.fwd.bm, 32 * self.fwd.warps);
        FlashKernel {
            module: self.module,
            name,
            rows,
            threads,
            smem: self.forward_smem(),
            persistent: false,
            tma: None,
            seq_major: false,
            equal_sequences: None,
        }
    }

    fn backward_kernel(&self, half: Half) -> FlashKernel {
        let (name, rows, threads) = (half.pick(self.backward[0], self.backward[1]), self.bwd.bn, 32 * self.bwd.warps);
        FlashKernel {
            module: self.module,
            name,
            rows,
            threads,
            smem: self.backward_smem(),
            persistent: false,
            tma: None,
            seq_major: false,
            equal_sequences: None,
        }
    }
}

const fn tile(bm: usize, bn: usize, warps: usize) -> Tile {
    Tile { bm, bn, warps }
}

/// A `FLASH` entry: `flash_attention_d<D>.cu`'s entry points `flash_{forward,backward}_d<D>_{bf16,f16}` with the tiles
/// their templates are instantiated with.
macro_rules! flash {
    ($d:literal, $module:ident, fwd $fwd:expr, bwd $bwd:expr) => {
        Flash {
            d: $d,
            module: Module::$module,
            forward: [concat!("flash_forward_d", $d, "_bf16"), concat!("flash_forward_d", $d, "_f16")],
            backward: [concat!("flash_backward_d", $d, "_bf16"), concat!("flash_backward_d", $d, "_f16")],
            fwd: $fwd,
            bwd: $bwd,
        }
    };
}

static FLASH: [Flash; 6] = [
    flash!(32, FlashD32, fwd tile(128, 64, 4), bwd tile(64, 64, 4)),
    flash!(64, FlashD64, fwd tile(128, 64, 4), bwd tile(64, 64, 4)),
    flash!(80, FlashD80, fwd tile(64, 64, 4), bwd tile(64, 128, 8)),
    flash!(96, FlashD96, fwd tile(64, 64, 4), bwd tile(64, 128, 8)),
    flash!(128, FlashD128, fwd tile(64, 64, 4), bwd tile(64, 64, 8)),
    flash!(256, FlashD256, fwd tile(64, 64, 4), bwd tile(64, 64, 8)),
];

/// A Hopper forward's block, `flash_forward_sm90_ws<T, D, BN, NWG, PING_PONG, 24, LAZY, PERSISTENT, true>`: NWG
/// consumer warpgroups of 64 query rows over tiles of BN keys, fed by one producer thread issuing TMA loads (its
/// warpgroup keeps 24 registers, so the consumers get 240); shared memory `Sm90ForwardWsSmem` (two Q buffers, one
/// without PERSISTENT; two K and two V stages, 1 KB of alignment slack, the mbarriers). LAZY rescales O only when a
/// row's max grows by more than 2^8; PERSISTENT walks the work items with one block per multiprocessor, the next
/// item's loads under this one's end.
#[derive(Clone, Copy, Debug)]
struct Sm90Forward {
    bn: usize,
    nwg: usize,
    ping_pong: bool,
    lazy: bool,
    persistent: bool,
}

impl Sm90Forward {
    /// (the template call the .cu writes, `{T}` standing for the element type; threads; shared memory) at head_dim `d`.
    fn shape(self, d: usize) -> (String, usize, usize) {
        let Sm90Forward { bn, nwg, ping_pong, lazy, persistent } = self;
        (
            format!("flash_forward_sm90_ws<{{T}}, {d}, {bn}, {nwg}, {ping_pong}, 24, {lazy}, {persistent}, true>"),
            128 * (nwg + 1),
            ((if persistent { 2 } else { 1 }) * 64 * nwg + 4 * bn) * d * 2 + 1024 + 128,
        )
    }

    fn rows(self) -> usize {
        64 * self.nwg
    }
}

/// A Hopper backward's block, as one of flash_attention_sm90_backward.cuh's two templates lays it out.
#[derive(Clone, Copy, Debug)]
enum Sm90Backward {
    /// `flash_backward_sm90<T, D, NWG, OVERLAP, STAGED_DQ, false, TMA>`: NWG warpgroups of 64 keys each; shared
    /// memory `Sm90BackwardSmem` (K and V [BN][D], two stages of Q and dO [64][D], dSᵀ [BN][64], two stages of lse
    /// and delta, with a staged dQ its f32 tile [64][D] (rows padded by 32 bytes, or with TMA swizzled as dq_accum's
    /// boxes land), with TMA a second dSᵀ tile and 64 bytes of mbarriers, 1 KB of alignment slack). TMA (only with
    /// the staged dQ) is warp-specialized: a producer warpgroup beside the NWG consumer ones (24 registers; the
    /// consumers 240), one warp loading K, V, Q and dO by TMA and one adding the staged dQ, and mbarriers instead of a
    /// pair's first block barrier.
    Pairs { nwg: usize, overlap: bool, staged_dq: bool, tma: bool },
    /// `flash_backward_sm90_split<T, D>`: two warpgroups sharing 64 keys (dK and dV of D = 256 do not fit one);
    /// shared memory `Sm90BackwardSplitSmem` (Pᵀ as well as dSᵀ [64][64]); it adds dQ through dq_accum's TMA map.
    Split,
}

impl Sm90Backward {
    /// (the template call the .cu writes, `{T}` standing for the element type; keys per block; threads; shared
    /// memory) at head_dim `d`.
    fn shape(self, d: usize, seq: bool) -> (String, usize, usize, usize) {
        match self {
            Sm90Backward::Pairs { nwg, overlap, staged_dq, tma } => {
                let bn = 64 * nwg;
                // The staged dQ's f32 tile: rows padded by 32 bytes, or warp-specialized the swizzled tile of
                // dq_accum's TMA boxes.
                let staged = match (staged_dq, tma) {
                    (false, _) => 0,
                    (true, false) => 64 * (d * 4 + 32),
                    (true, true) => 64 * d * 4,
                };
                let tma_bytes = if tma { bn * 64 * 2 + 64 } else { 0 };
                let smem = 2 * bn * d * 2 + 4 * 64 * d * 2 + bn * 64 * 2 + 4 * 64 * 4 + staged + tma_bytes + 1024;
                // The template's arguments as the .cu writes them: trailing defaults (false) left out.
                let mut args = vec![overlap, staged_dq, false, tma, seq];
                while args.len() > 1 && args.last() == Some(&false) {
                    args.pop();
                }
                let args = args.iter().map(bool::to_string).collect::<Vec<_>>().join(", ");
                // TMA is warp-specialized: a producer warpgroup beside the consumers.
                debug_assert!(staged_dq || !tma, "d{d}: the TMA backward stages dQ");
                let threads = 128 * (nwg + usize::from(tma));
                (format!("flash_backward_sm90<{{T}}, {d}, {nwg}, {args}>"), bn, threads, smem)
            }
            Sm90Backward::Split => {
                let smem = 2 * 64 * d * 2 + 4 * 64 * d * 2 + 2 * 64 * 64 * 2 + 4 * 64 * 4 + 1024;
                let seq = if seq { ", true" } else { "" };
                (format!("flash_backward_sm90_split<{{T}}, {d}{seq}>"), 64, 256, smem)
            }
        }
    }
}

/// The wgmma kernels of one padded head_dim (`kernels/cuda/flash_attention_sm90_d<D>.cu`, sm_90a only).
struct FlashSm90 {
    d: usize,
    /// The smallest head_dim served: below it the mma.sync table pads to a smaller D than this one, so its kernel
    /// does less work (80 and 96 stay there until padding them to 128 is measured to win).
    min_head_dim: usize,
    module: Module,
    forward: [&'static str; 2],
    fwd: Sm90Forward,
    backward: [&'static str; 2],
    /// The backward with the sequence slowest in the grid (`SEQ_MAJOR`), for packs of equal sequences.
    backward_seq: [&'static str; 2],
    bwd: Sm90Backward,
}

impl FlashSm90 {
    fn serves(&self, head_dim: usize) -> bool {
        (self.min_head_dim..=self.d).contains(&head_dim)
    }

    fn forward_kernel(&self, half: Half) -> FlashKernel {
        let (_, threads, smem) = self.fwd.shape(self.d);
        let name = half.pick(self.forward[0], self.forward[1]);
        FlashKernel {
            module: self.module,
            name,
            rows: self.fwd.rows(),
            threads,
            smem,
            persistent: self.fwd.persistent,
            tma: Some(TmaBoxes { q_rows: self.fwd.rows(), kv_rows: self.fwd.bn }),
            seq_major: false,
            equal_sequences: None,
        }
    }

    fn backward_kernel(&self, half: Half) -> FlashKernel {
        let (_, rows, threads, smem) = self.bwd.shape(self.d, false);
        let name = half.pick(self.backward[0], self.backward[1]);
        // The split backward takes the maps too, but reads only dq_accum's (it loads Q, dO, K and V by cp.async).
        let tma = matches!(self.bwd, Sm90Backward::Pairs { tma: true, .. } | Sm90Backward::Split)
            .then_some(TmaBoxes { q_rows: 64, kv_rows: rows });
        let equal_sequences = Some(half.pick(self.backward_seq[0], self.backward_seq[1]));
        FlashKernel {
            module: self.module,
            name,
            rows,
            threads,
            smem,
            persistent: false,
            tma,
            seq_major: false,
            equal_sequences,
        }
    }
}

/// A `FLASH_SM90` entry: `flash_attention_sm90_d<D>.cu`'s entry points `flash_{forward,backward}_sm90_d<D>_{bf16,f16}`
/// and `flash_backward_sm90_seq_d<D>_{bf16,f16}`, with their layouts as the templates are instantiated.
macro_rules! sm90 {
    ($d:literal, $module:ident, from $min:literal, fwd $fwd:expr, bwd $bwd:expr) => {
        FlashSm90 {
            d: $d,
            min_head_dim: $min,
            module: Module::$module,
            forward: [concat!("flash_forward_sm90_d", $d, "_bf16"), concat!("flash_forward_sm90_d", $d, "_f16")],
            fwd: $fwd,
            backward: [concat!("flash_backward_sm90_d", $d, "_bf16"), concat!("flash_backward_sm90_d", $d, "_f16")],
            backward_seq: [
                concat!("flash_backward_sm90_seq_d", $d, "_bf16"),
                concat!("flash_backward_sm90_seq_d", $d, "_f16"),
            ],
            bwd: $bwd,
        }
    };
}

/// The Hopper kernels (variants measured on the H200 in `scripts/flash/variants.py`; kernels/NOTES.md has the numbers):
/// the warp-specialized ping-pong forward loading by TMA, persistent at 64 and 128 (+3 % and +1.5 % for persistence
/// over a block per tile, then 13–17 % for TMA, on the H100) with 3 consumer warpgroups and 96-key tiles at 64 (7 %
/// over 2 × 128) and 2 with 128-key tiles at 128, and a block per tile with 2 warpgroups and 64-key tiles at 256 (two Q
/// buffers do not fit there; 1.37× the all-load forward it replaced), each rescaling O lazily; the backward
/// with one warpgroup per 64 keys at 64 and 128, loading by TMA (6 % and 2.6 % faster than cp.async with a block
/// barrier), warp-specialized (a producer warpgroup loads and adds the staged dQ by one tensor reduce-add per 32
/// columns, FlashAttention-3's layout: at 128 7 % faster than the consumers loading and flushing themselves, and 7 %
/// again over a bulk reduce-add per row; at 64 8 % faster than dQ by atomics; H100 2026-12-07), overlapped at 128
/// (at 64 1 % slower), and two warpgroups sharing 64 keys at 256 (where dK and dV fill the registers).
static FLASH_SM90: [FlashSm90; 3] = [
    sm90!(64, FlashSm90D64, from 33,
        fwd Sm90Forward { bn: 96, nwg: 3, ping_pong: true, lazy: true, persistent: true },
        bwd Sm90Backward::Pairs { nwg: 2, overlap: false, staged_dq: true, tma: true }),
    sm90!(128, FlashSm90D128, from 97,
        fwd Sm90Forward { bn: 128, nwg: 2, ping_pong: true, lazy: true, persistent: true },
        bwd Sm90Backward::Pairs { nwg: 2, overlap: true, staged_dq: true, tma: true }),
    sm90!(256, FlashSm90D256, from 129,
        fwd Sm90Forward { bn: 64, nwg: 2, ping_pong: true, lazy: true, persistent: false },
        bwd Sm90Backward::Split),
];

#[cfg(test)]
mod tests {
    use super::super::MAX_HEAD_DIM;
    use super::*;
    use crate::cuda::compile::Output;

    const SM_90A: Target = Target { arch: 90, arch_specific: true, output: Output::Cubin };
    const SM_80: Target = Target { arch: 80, arch_specific: false, output: Output::Cubin };

    /// The line of `module`'s file that defines entry point `name`.
    fn entry_line(module: Module, name: &str) -> &'static str {
        let text = module.file_text();
        text.lines().find(|l| l.contains(&format!(" {name}("))).unwrap_or_else(|| panic!("{name}: no entry point"))
    }

    /// The tiles must match the template arguments written in each flash_attention_d<D>.cu, and fit a Hopper SM's
    /// 227 KiB of shared memory per block.
    #[test]
    fn flash_table_matches_the_sources() {
        for f in &FLASH {
            for (kernels, t) in [(f.forward, f.fwd), (f.backward, f.bwd)] {
                for (name, ty) in kernels.iter().zip(["bf16", "f16"]) {
                    let line = entry_line(f.module, name);
                    let args = format!("<{ty}, {}, {}, {}, {}", f.d, t.bm, t.bn, t.warps);
                    assert!(line.contains(&args), "{name}: expected template arguments {args} in {line}");
                    assert!(line.contains(&format!("__launch_bounds__({})", 32 * t.warps)), "{name}: block size");
                }
            }
            assert!(f.forward_smem() <= 227 * 1024 && f.backward_smem() <= 227 * 1024, "d{}: shared memory", f.d);
        }
        assert_eq!(FLASH.last().map(|f| f.d), Some(MAX_HEAD_DIM));
    }

    /// The same for the Hopper kernels: template, block size (one block per multiprocessor) and shared memory.
    #[test]
    fn flash_sm90_table_matches_the_sources() {
        for f in &FLASH_SM90 {
            assert_eq!(f.module.arch_specific_only(), Some(90), "{}", f.module.name());
            let ((forward, _, _), (backward, ..), (backward_seq, ..)) =
                (f.fwd.shape(f.d), f.bwd.shape(f.d, false), f.bwd.shape(f.d, true));
            for half in [Half::Bf16, Half::F16] {
                let ty = half.pick("bf16", "f16");
                let bwd = f.backward_kernel(half);
                let seq = bwd.for_equal_sequences();
                assert!(
                    seq.seq_major && !bwd.seq_major && seq.name != bwd.name,
                    "{}: its sequence-major twin",
                    bwd.name
                );
                assert_eq!(
                    FlashKernel { name: bwd.name, seq_major: false, equal_sequences: bwd.equal_sequences, ..seq },
                    bwd
                );
                for (k, template) in [(f.forward_kernel(half), &forward), (bwd, &backward), (seq, &backward_seq)] {
                    let line = entry_line(f.module, k.name);
                    let call = template.replace("{T}", ty);
                    assert!(line.contains(&format!("{call}(")), "{}: expected {call} in {line}", k.name);
                    assert!(line.contains(&format!("__launch_bounds__({}, 1)", k.threads)), "{}: block size", k.name);
                    assert!(k.smem <= 227 * 1024, "{}: shared memory", k.name);
                }
            }
            assert_eq!(f.module.entry_points().len(), 6, "{}: entry points", f.module.name());
        }
    }

    #[test]
    fn head_dims_map_to_the_smallest_padded_kernel() {
        let d = |hd| Flash::for_head_dim(hd).d;
        assert_eq!(
            [d(1), d(32), d(33), d(64), d(72), d(80), d(96), d(100), d(128), d(129), d(256)],
            [32, 32, 64, 64, 80, 80, 96, 128, 128, 256, 256]
        );
    }

    /// Hopper takes the wgmma kernel where one pads no further than the mma.sync table; other targets, and the
    /// portable path, never do.
    #[test]
    fn hopper_picks_wgmma_where_it_serves() {
        let names = |target, path, hd| flash_kernels(target, path, hd, Half::Bf16).map(|k| k.name);
        for (target, path, hd, want) in [
            (SM_90A, FlashPath::Fastest, 64, ["flash_forward_sm90_d64_bf16", "flash_backward_sm90_d64_bf16"]),
            (SM_90A, FlashPath::Fastest, 40, ["flash_forward_sm90_d64_bf16", "flash_backward_sm90_d64_bf16"]),
            (SM_90A, FlashPath::Fastest, 100, ["flash_forward_sm90_d128_bf16", "flash_backward_sm90_d128_bf16"]),
            (SM_90A, FlashPath::Fastest, 256, ["flash_forward_sm90_d256_bf16", "flash_backward_sm90_d256_bf16"]),
            (SM_90A, FlashPath::Fastest, 32, ["flash_forward_d32_bf16", "flash_backward_d32_bf16"]),
            (SM_90A, FlashPath::Fastest, 72, ["flash_forward_d80_bf16", "flash_backward_d80_bf16"]),
            (SM_90A, FlashPath::Portable, 64, ["flash_forward_d64_bf16", "flash_backward_d64_bf16"]),
            (SM_80, FlashPath::Fastest, 128, ["flash_forward_d128_bf16", "flash_backward_d128_bf16"]),
        ] {
            assert_eq!(names(target, path, hd), want, "head_dim {hd} on {target} along {path:?}");
        }
        for hd in [40, 64, 80, 128, 256] {
            assert_eq!(names(SM_90A, FlashPath::FastestFlash, hd), names(SM_90A, FlashPath::Fastest, hd), "{hd}");
        }
        let f16 = flash_kernels(SM_90A, FlashPath::Fastest, 128, Half::F16).map(|k| k.name);
        assert_eq!(f16, ["flash_forward_sm90_d128_f16", "flash_backward_sm90_d128_f16"]);
        // Every head_dim gets a kernel on every path, and only Hopper loads a Hopper module.
        for hd in 1..=MAX_HEAD_DIM {
            for (target, path) in
                [(SM_90A, FlashPath::Fastest), (SM_90A, FlashPath::Portable), (SM_80, FlashPath::Fastest)]
            {
                let wgmma = target == SM_90A && path == FlashPath::Fastest && hd > 32 && (hd <= 64 || hd > 96);
                let [fwd, bwd] = flash_kernels(target, path, hd, Half::Bf16);
                for (k, sm90) in [(fwd, wgmma), (bwd, wgmma)] {
                    assert!(target.compiles(k.module), "{hd}: {} on {target}", k.name);
                    assert_eq!(k.module.arch_specific_only().is_some(), sm90, "{hd}: {} on {target}", k.name);
                }
            }
        }
    }
}
