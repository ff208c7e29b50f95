//! The catalogue of CUDA sources: one `kernels/cuda/<op>.cu` per op, embedded in the binary, plus the headers
//! (`common.cuh`, NF4's code table and scales, the flash-attention pieces and templates) spliced in where each source
//! includes them. Entry points, hot markers and the targets a module compiles for are read off or stated here, so the
//! source is the only list of kernel names.

/// The headers a `.cu` may include, spliced in place of each `#include "<name>"` line (NVRTC gets one
/// self-contained source; nvcc finds the headers beside the file); a header's own `#include` lines are not spliced, so
/// a `.cu` names every header it needs, in order. Every source includes `common.cuh`; the NF4 modules add
/// `nf4_common.cuh`, the flash modules `flash_common.cuh` and the mma.sync templates, the Hopper ones `flash_common.cuh`, the wgmma pieces and templates;
/// the activation and matmul modules `activation.cuh`, the norm and matmul modules `rms_norm.cuh`.
const HEADERS: [(&str, &str); 9] = [
    ("common.cuh", include_str!("../../cuda/common.cuh")),
    ("activation.cuh", include_str!("../../cuda/activation.cuh")),
    ("rms_norm.cuh", include_str!("../../cuda/rms_norm.cuh")),
    ("nf4_common.cuh", include_str!("../../cuda/nf4_common.cuh")),
    ("flash_common.cuh", include_str!("../../cuda/flash_common.cuh")),
    ("flash_attention.cuh", include_str!("../../cuda/flash_attention.cuh")),
    ("flash_wgmma.cuh", include_str!("../../cuda/flash_wgmma.cuh")),
    ("flash_attention_sm90.cuh", include_str!("../../cuda/flash_attention_sm90.cuh")),
    ("flash_attention_sm90_backward.cuh", include_str!("../../cuda/flash_attention_sm90_backward.cuh")),
];
/// Written on the line above a group of entry points: ptxas must give every one of them zero spill bytes.
pub const HOT_MARKER: &str = "// qlora-rt: hot";
const ENTRY_PREFIX: &str = "extern \"C\" __global__ void ";

/// One `.cu` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    Elementwise,
    Activation,
    RmsNorm,
    Rope,
    CrossEntropy,
    Embedding,
    Adamw,
    Nf4,
    /// Decoding's product with a packed NF4 weight (CPU twin: `nf4::gemv`).
    Nf4Gemv,
    Matmul,
    Reduce,
    Copy,
    Attention,
    Dora,
    Lora,
    /// Split-KV attention for a few queries per sequence against a KV cache (decoding), every padded head_dim.
    DecodeAttention,
    /// The flash-attention kernels for head_dim ≤ 32, 64, 80, 96, 128, 256: one module each, so a model compiles
    /// only the head size it has.
    FlashD32,
    FlashD64,
    FlashD80,
    FlashD96,
    FlashD128,
    FlashD256,
    /// The Hopper (wgmma) flash-attention kernels for head_dim ≤ 64, 128, 256: sm_90a only.
    FlashSm90D64,
    FlashSm90D128,
    FlashSm90D256,
}

impl Module {
    pub const ALL: [Module; 25] = [
        Module::Elementwise,
        Module::Activation,
        Module::RmsNorm,
        Module::Rope,
        Module::CrossEntropy,
        Module::Embedding,
        Module::Adamw,
        Module::Nf4,
        Module::Nf4Gemv,
        Module::Matmul,
        Module::Reduce,
        Module::Copy,
        Module::Attention,
        Module::Dora,
        Module::Lora,
        Module::DecodeAttention,
        Module::FlashD32,
        Module::FlashD64,
        Module::FlashD80,
        Module::FlashD96,
        Module::FlashD128,
        Module::FlashD256,
        Module::FlashSm90D64,
        Module::FlashSm90D128,
        Module::FlashSm90D256,
    ];

    /// The file stem, which is also the name of the CPU twin's module (`attention` for the flash and decode modules).
    pub fn name(self) -> &'static str {
        match self {
            Module::Elementwise => "elementwise",
            Module::Activation => "activation",
            Module::RmsNorm => "rms_norm",
            Module::Rope => "rope",
            Module::CrossEntropy => "cross_entropy",
            Module::Embedding => "embedding",
            Module::Adamw => "adamw",
            Module::Nf4 => "nf4",
            Module::Nf4Gemv => "nf4_gemv",
            Module::Matmul => "matmul",
            Module::Reduce => "reduce",
            Module::Copy => "copy",
            Module::Attention => "attention",
            Module::Dora => "dora",
            Module::Lora => "lora",
            Module::DecodeAttention => "decode_attention",
            Module::FlashD32 => "flash_attention_d32",
            Module::FlashD64 => "flash_attention_d64",
            Module::FlashD80 => "flash_attention_d80",
            Module::FlashD96 => "flash_attention_d96",
            Module::FlashD128 => "flash_attention_d128",
            Module::FlashD256 => "flash_attention_d256",
            Module::FlashSm90D64 => "flash_attention_sm90_d64",
            Module::FlashSm90D128 => "flash_attention_sm90_d128",
            Module::FlashSm90D256 => "flash_attention_sm90_d256",
        }
    }

    /// The file as written.
    pub fn file_text(self) -> &'static str {
        match self {
            Module::Elementwise => include_str!("../../cuda/elementwise.cu"),
            Module::Activation => include_str!("../../cuda/activation.cu"),
            Module::RmsNorm => include_str!("../../cuda/rms_norm.cu"),
            Module::Rope => include_str!("../../cuda/rope.cu"),
            Module::CrossEntropy => include_str!("../../cuda/cross_entropy.cu"),
            Module::Embedding => include_str!("../../cuda/embedding.cu"),
            Module::Adamw => include_str!("../../cuda/adamw.cu"),
            Module::Nf4 => include_str!("../../cuda/nf4.cu"),
            Module::Nf4Gemv => include_str!("../../cuda/nf4_gemv.cu"),
            Module::Matmul => include_str!("../../cuda/matmul.cu"),
            Module::Reduce => include_str!("../../cuda/reduce.cu"),
            Module::Copy => include_str!("../../cuda/copy.cu"),
            Module::Attention => include_str!("../../cuda/attention.cu"),
            Module::Dora => include_str!("../../cuda/dora.cu"),
            Module::Lora => include_str!("../../cuda/lora.cu"),
            Module::DecodeAttention => include_str!("../../cuda/decode_attention.cu"),
            Module::FlashD32 => include_str!("../../cuda/flash_attention_d32.cu"),
            Module::FlashD64 => include_str!("../../cuda/flash_attention_d64.cu"),
            Module::FlashD80 => include_str!("../../cuda/flash_attention_d80.cu"),
            Module::FlashD96 => include_str!("../../cuda/flash_attention_d96.cu"),
            Module::FlashD128 => include_str!("../../cuda/flash_attention_d128.cu"),
            Module::FlashD256 => include_str!("../../cuda/flash_attention_d256.cu"),
            Module::FlashSm90D64 => include_str!("../../cuda/flash_attention_sm90_d64.cu"),
            Module::FlashSm90D128 => include_str!("../../cuda/flash_attention_sm90_d128.cu"),
            Module::FlashSm90D256 => include_str!("../../cuda/flash_attention_sm90_d256.cu"),
        }
    }

    /// The compute capability (major·10 + minor) whose arch-specific target alone compiles this module: 90 for the
    /// Hopper flash kernels (wgmma and setmaxnreg exist on sm_90a only); None for every other module, which compiles
    /// for each target from sm_80 on.
    pub fn arch_specific_only(self) -> Option<u32> {
        match self {
            Module::FlashSm90D64 | Module::FlashSm90D128 | Module::FlashSm90D256 => Some(90),
            _ => None,
        }
    }

    /// Whether every entry point of this module waits for the previous kernel in the stream before it touches
    /// memory (common.cuh's `grid_dependency_wait`, in every block), so that its launches may overlap that kernel's
    /// end (programmatic dependent launch, `launch!`). The modules of decoding's chain of small kernels, one token at a
    /// time; `nvrtc_compile` checks each entry point's sm_90a code against this.
    pub fn waits_for_previous(self) -> bool {
        matches!(
            self,
            Module::Elementwise
                | Module::Activation
                | Module::RmsNorm
                | Module::Rope
                | Module::Nf4Gemv
                | Module::Matmul
                | Module::Copy
                | Module::DecodeAttention
        )
    }

    /// What NVRTC compiles: the file with each included header's text in place of its `#include` line.
    pub fn source(self) -> String {
        let text = self.file_text();
        assert_eq!(
            text.lines().find_map(included),
            Some("common.cuh"),
            "kernels/cuda/{}.cu: common.cuh first",
            self.name()
        );
        let mut source = String::with_capacity(text.len() + HEADERS.iter().map(|(_, h)| h.len()).sum::<usize>());
        for line in text.split_inclusive('\n') {
            match included(line) {
                Some(name) => {
                    let header = HEADERS.iter().find(|(n, _)| *n == name);
                    let (_, header) =
                        header.unwrap_or_else(|| panic!("kernels/cuda/{}.cu includes {name}", self.name()));
                    source.push_str(header);
                }
                None => source.push_str(line),
            }
        }
        source
    }

    /// Every `extern "C" __global__` function, in file order.
    pub fn entry_points(self) -> Vec<&'static str> {
        self.file_text().lines().filter_map(entry_name).collect()
    }

    /// The entry points on the lines after a [`HOT_MARKER`] line, up to the next blank line.
    pub fn hot_entry_points(self) -> Vec<&'static str> {
        let mut hot = Vec::new();
        let mut in_group = false;
        for line in self.file_text().lines() {
            if line.trim() == HOT_MARKER {
                in_group = true;
            } else if line.trim().is_empty() {
                in_group = false;
            } else if in_group {
                hot.extend(entry_name(line));
            }
        }
        hot
    }
}

/// The header named by an `#include "<name>"` line.
fn included(line: &str) -> Option<&str> {
    line.trim_end().strip_prefix("#include \"")?.strip_suffix('"')
}

/// The name in `extern "C" __global__ void [__launch_bounds__(…)] name(…`.
fn entry_name(line: &str) -> Option<&str> {
    let rest = line.strip_prefix(ENTRY_PREFIX)?;
    let rest = match rest.strip_prefix("__launch_bounds__(") {
        Some(bounds) => bounds.split_once(')')?.1,
        None => rest,
    };
    rest.split('(').next().map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_includes_common_and_has_named_entry_points() {
        for m in Module::ALL {
            let src = m.source();
            assert!(src.contains("struct bf16") && src.lines().all(|l| included(l).is_none()), "{}", m.name());
            let entries = m.entry_points();
            assert!(!entries.is_empty(), "{}: no entry points", m.name());
            for e in &entries {
                assert!(e.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{}: entry {e:?}", m.name());
                // Float kernels are named by type; byte-moving ones (copy.cu) by element size.
                let suffixes = ["_f32", "_bf16", "_f16", "_u8", "_u16", "_u32"];
                assert!(suffixes.iter().any(|s| e.ends_with(s)), "{}: {e} names no dtype", m.name());
            }
            let mut unique = entries.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), entries.len(), "{}: duplicate entry points", m.name());
        }
    }

    #[test]
    fn launch_bounds_are_not_part_of_the_name() {
        let line = "extern \"C\" __global__ void __launch_bounds__(128) flash_forward_d64_bf16(const FlashParams p) {";
        assert_eq!(entry_name(line), Some("flash_forward_d64_bf16"));
        assert_eq!(Module::FlashD64.entry_points().len(), 4);
    }

    #[test]
    fn hot_markers_cover_their_group_only() {
        let hot = Module::RmsNorm.hot_entry_points();
        assert!(hot.contains(&"rms_norm_backward_bf16") && hot.contains(&"add_rms_norm_forward_f32"), "{hot:?}");
        assert!(!hot.iter().any(|e| e.contains("scalar")), "{hot:?}");
        assert!(!Module::Elementwise.hot_entry_points().contains(&"mul_f32"));
        assert!(Module::Elementwise.hot_entry_points().contains(&"add_bf16"));
    }
}
